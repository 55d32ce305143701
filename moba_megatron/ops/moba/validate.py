"""Input checks for ``moba_attn_varlen``: every problem is a ValueError naming the argument and the fix."""

from __future__ import annotations

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(
                f"{name} must be packed THD [tokens, heads, head_dim], got shape {tuple(x.shape)}; "
                "flatten batch and sequence into one token axis and pass cu_seqlens"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on tokens and head_dim"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v dtype {q.dtype} is not supported; use float32, bfloat16 or float16")
    if q.device != k.device or q.device != v.device:
        raise ValueError(
            f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; move them"
        )
    hq, hkv = q.shape[1], k.shape[1]
    if hq == 0 or hkv == 0:
        raise ValueError(f"q and k need at least one head, got {hq} query and {hkv} key/value heads")
    if q.shape[2] == 0:
        raise ValueError(f"head_dim must be >= 1, got q {tuple(q.shape)}; each head needs at least one channel")
    if hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA"
        )


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def host_cu_seqlens(cu_seqlens, num_tokens: int, device: torch.device) -> list[int]:
    """Validate ``cu_seqlens`` and return it as a host list (the op's one read of it)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be an int32 torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}; use cu_seqlens.to(torch.int32)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with batch+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device.type != "cpu" and cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}; move it")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
    if cu[-1] != num_tokens:
        raise ValueError(
            f"cu_seqlens must end at the number of tokens ({num_tokens}), got {cu[-1]}"
        )
    return cu


def check_max_seqlen(max_seqlen, cu: list[int]) -> None:
    longest = max((b - a for a, b in zip(cu[:-1], cu[1:])), default=0)
    if isinstance(max_seqlen, torch.Tensor):
        max_seqlen = int(max_seqlen)
    if not isinstance(max_seqlen, int) or max_seqlen < longest:
        raise ValueError(
            f"max_seqlen must be an int >= the longest sequence ({longest}), got {max_seqlen!r}"
        )


def check_scale(softmax_scale) -> None:
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive float or None, got {softmax_scale!r}")
