"""The all-gather of block key sums: every rank gates its queries against every block."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .sharding import local_block_ids


def gather_block_sums(local_sums: torch.Tensor, seq_len: int, chunk: int, group=None) -> torch.Tensor:
    """``[local blocks, Hkv, D]`` on each rank -> ``[all blocks, Hkv, D]`` in global block order.

    Tiny (blocks x Hkv x D fp32); one all-gather over the context-parallel group."""
    cp_size = dist.get_world_size(group)
    parts = [torch.empty_like(local_sums) for _ in range(cp_size)]
    dist.all_gather(parts, local_sums.contiguous(), group=group)
    total = torch.empty((local_sums.shape[0] * cp_size, *local_sums.shape[1:]), dtype=local_sums.dtype, device=local_sums.device)
    for rank, part in enumerate(parts):
        total[local_block_ids(seq_len, cp_size, rank, chunk)] = part
    return total
