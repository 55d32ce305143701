"""The keys just before each of a context-parallel rank's chunks (halos), for the key convolution.

Megatron's load-balanced split gives rank r chunks r and 2cp-1-r, so the W - 1 keys before a chunk
live on a neighbouring rank (or, for chunk cp, on the same rank). Every rank's chunk tails are
all-gathered (W - 1 tokens each: tiny), each rank takes the two it needs, and in the backward the
halos' gradients flow back to the ranks that hold those keys.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherTails(torch.autograd.Function):
    """All-gather ``tails`` from every rank; the backward sums each rank's gradient where it is held."""

    @staticmethod
    def forward(ctx, tails: torch.Tensor, group, cp_size: int, cp_rank: int):
        ctx.group, ctx.cp_rank = group, cp_rank
        parts = [torch.empty_like(tails) for _ in range(cp_size)]
        dist.all_gather(parts, tails.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.cp_rank], None, None, None


def _owner(chunk: int, cp_size: int) -> tuple[int, int]:
    """(rank, which of its two chunks) holding ``chunk`` under Megatron's load-balanced split."""
    return (chunk, 0) if chunk < cp_size else (2 * cp_size - 1 - chunk, 1)


def chunk_halos(k: torch.Tensor, width: int, cp_size: int, cp_rank: int, group=None):
    """The halos ``[W - 1, B, H, D]`` of this rank's two chunks of ``k [2L, B, H, D]`` (chunk r,
    then chunk 2cp-1-r): the last W - 1 keys of the chunk before each, None for the sequence's first
    chunk (nothing precedes it). Every rank must call it."""
    half = k.shape[0] // 2
    if width - 1 > half:
        raise ValueError(f"moba_key_conv {width} needs {width - 1} keys before each context-parallel chunk, "
                         f"but a chunk holds {half}; use a narrower convolution or fewer ranks")
    tails = torch.stack([k[half - width + 1 : half], k[2 * half - width + 1 :]])
    gathered = _GatherTails.apply(tails, group, cp_size, cp_rank)
    halos = []
    for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank):
        if chunk == 0:
            halos.append(None)
            continue
        rank, which = _owner(chunk - 1, cp_size)
        halos.append(gathered[rank, which])
    return halos
