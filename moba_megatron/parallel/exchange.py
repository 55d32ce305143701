"""The collectives of MoBA context parallelism, over the context-parallel process group.

Each helper also returns the bytes this rank sent to other ranks, for the benchmark's accounting.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .sharding import ShardBlocks


def gather_block_sums(local_sums: torch.Tensor, shard: ShardBlocks, group=None) -> torch.Tensor:
    """``[local blocks, Hkv, D]`` on each rank -> ``[all blocks, Hkv, D]`` in global block order.

    Tiny (blocks x Hkv x D fp32); one all-gather."""
    gathered, _ = all_gather(local_sums, shard.cp_size, group)
    gathered = gathered.view(-1, *local_sums.shape[1:])  # rank-major: every rank's blocks in turn
    total = torch.empty_like(gathered)
    total[shard.all_block_ids] = gathered
    return total


def all_gather(x: torch.Tensor, cp_size: int, group=None) -> tuple[torch.Tensor, int]:
    """``x`` from every rank, stacked rank-major: ``[cp, *x.shape]``."""
    out, sent, work = start_all_gather(x, cp_size, group)
    work.wait()
    return out, sent


def start_all_gather(x: torch.Tensor, cp_size: int, group=None):
    """``all_gather`` in the background: returns ``(out, bytes sent, work)``; ``out`` holds the
    result once ``work.wait()`` returns (on GPUs: once the caller's stream has waited on it)."""
    out = x.new_empty((cp_size * x.shape[0], *x.shape[1:]))
    work = dist.all_gather_into_tensor(out, x.contiguous(), group=group, async_op=True)
    return out.view(cp_size, *x.shape), x.numel() * x.element_size() * (cp_size - 1), work


def reduce_scatter(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """``x [cp, ...]`` summed over ranks; this rank keeps slice ``rank``."""
    cp = x.shape[0]
    out = x.new_empty(x.shape[1:])
    dist.reduce_scatter_tensor(out.view(-1, *x.shape[2:]), x.contiguous().view(-1, *x.shape[2:]), group=group)
    return out, out.numel() * out.element_size() * (cp - 1)


class AllToAll:
    """A fixed pattern of an all-to-all: how many rows this rank sends to and receives from each
    rank. Built once per exchange (one small all-to-all of the counts, read on the host), then
    used for every tensor of rows moved the same way, forward or ``back``."""

    def __init__(self, send_counts: torch.Tensor, rank: int, group=None):
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        self.send, self.recv = send_counts.tolist(), recv_counts.tolist()
        self.rank, self.group = rank, group

    def __call__(self, rows: torch.Tensor, back: bool = False) -> tuple[torch.Tensor, int]:
        send, recv = (self.recv, self.send) if back else (self.send, self.recv)
        out = rows.new_empty((sum(recv), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), recv, send, group=self.group)
        per_row = math.prod(rows.shape[1:]) * rows.element_size()
        return out, (sum(send) - send[self.rank]) * per_row
