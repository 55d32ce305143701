"""The key convolution: a short causal depthwise convolution over each sequence's keys (docs/semantics.md).

For kv head g, channel c and width W: ``k'[t] = sum_{j < W} w[g, c, j] * k[t - j]``, where a term
before the sequence's first token is zero. It mixes each key with the few before it, so a block's
mean key carries what its neighbourhood holds and the gate finds a needle's block more easily (as
FlashMoBA's short convolution on keys). Plain PyTorch: W elementwise steps, whose cost is small next
to the attention; autograd gives the gradients of the keys and of ``w``.
"""

from __future__ import annotations

import torch


def check_key_conv_width(width, chunk: int | None = None) -> int:
    """``width`` 0 (off) or 2..``chunk``: a ValueError naming the problem and the fix otherwise."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 0 or width == 1:
        raise ValueError(f"moba_key_conv must be 0 (off) or a width >= 2, got {width!r}; "
                         "a width of 1 would only scale the keys")
    if chunk is not None and width > chunk:
        raise ValueError(f"moba_key_conv {width} is wider than moba_chunk_size {chunk}; "
                         "use a width of at most the block size")
    return width


def identity_key_conv_weight(kv_heads: int, head_dim: int, width: int, **factory) -> torch.Tensor:
    """``[kv_heads, head_dim, width]``: the identity (``w[..., 0] = 1``, the rest 0), so a model with
    the convolution starts with exactly the outputs it had without it."""
    weight = torch.zeros(kv_heads, head_dim, width, **factory)
    weight[..., 0] = 1
    return weight


def key_conv(k: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, halo: torch.Tensor | None = None):
    """The convolution of keys ``k [T, B, H, D]`` (time first; B independent rows) with ``weight
    [H, D, W]``. ``positions [T]`` is each token's place in its sequence (0 at a sequence's first
    token, so packed sequences stay apart). ``halo [W - 1, B, H, D]``: the keys just before ``k[0]``
    when ``k`` starts inside a sequence (a context-parallel chunk); None reads zeros there."""
    width = weight.shape[-1]
    ext = torch.cat([halo if halo is not None else k.new_zeros(width - 1, *k.shape[1:]), k])
    out = k * weight[..., 0]
    t = k.shape[0]
    for j in range(1, width):
        valid = (positions >= j).to(k.dtype).view(t, *([1] * (k.dim() - 1)))
        out = out + ext[width - 1 - j : width - 1 - j + t] * valid * weight[..., j]
    return out


def sequence_positions(cu_seqlens: list[int], device=None) -> torch.Tensor:
    """Each token's place in its sequence, for packed sequences with boundaries ``cu_seqlens``."""
    starts = torch.tensor(cu_seqlens[:-1], dtype=torch.long)
    lengths = torch.tensor([b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])], dtype=torch.long)
    positions = torch.arange(cu_seqlens[-1], dtype=torch.long) - starts.repeat_interleave(lengths)
    return positions.to(device)
