"""Where the MoBA blocks of a packed batch lie.

Blocks of ``chunk`` tokens start at each sequence start; only a sequence's last block may be
partial. Blocks are numbered globally across the batch, in token order.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    chunk: int
    num_tokens: int
    block_starts: list[int]  # global token index where each block starts
    block_lens: list[int]
    block_first: list[int]  # for each block, the global id of its sequence's first block
    max_block_len: int
    max_candidates: int  # most completed blocks any query has before its own
    cu_blocks: torch.Tensor  # [num_blocks + 1] int32, block boundaries (the own-block varlen call)
    block_starts_dev: torch.Tensor  # [num_blocks] int64, block_starts on the device
    token_block: torch.Tensor  # [T] int64, global block id of each token
    token_first_block: torch.Tensor  # [T] int64, first block of each token's sequence

    @property
    def num_blocks(self) -> int:
        return len(self.block_starts)

    def candidate_range(self, t0: int, t1: int) -> tuple[int, int]:
        """Block ids ``[lo, hi)`` that hold every gating candidate of the tokens ``[t0, t1)``."""
        if not self.block_starts:
            return 0, 0
        first = bisect.bisect_right(self.block_starts, t0) - 1
        last = bisect.bisect_right(self.block_starts, t1 - 1) - 1
        return self.block_first[first], last  # candidates lie strictly before a query's own block


@functools.lru_cache(maxsize=16)
def block_layout(cu_seqlens: tuple[int, ...], chunk: int, device: torch.device) -> BlockLayout:
    """Build the layout from host-side ``cu_seqlens`` (already validated).

    Cached: every layer of a model sees the same batch layout, and building it costs host time
    while the GPU waits."""
    starts: list[int] = []
    lens: list[int] = []
    first: list[int] = []
    max_candidates = 0
    for s0, s1 in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        first_block = len(starts)
        n_blocks = -(-(s1 - s0) // chunk)
        for b in range(n_blocks):
            starts.append(s0 + b * chunk)
            lens.append(min(chunk, s1 - s0 - b * chunk))
            first.append(first_block)
        max_candidates = max(max_candidates, n_blocks - 1)
    num_tokens = cu_seqlens[-1]
    ids = torch.arange(len(starts), dtype=torch.int64)
    token_block = torch.repeat_interleave(ids, torch.tensor(lens, dtype=torch.int64), output_size=num_tokens)
    token_first = torch.tensor(first, dtype=torch.int64)[token_block] if starts else token_block
    # One host-to-device copy for the per-token and per-block tables.
    table = torch.cat([token_block, token_first, torch.tensor(starts + [num_tokens], dtype=torch.int64)])
    table = table.to(device, non_blocking=True)
    nb = len(starts)
    return BlockLayout(
        chunk=chunk,
        num_tokens=num_tokens,
        block_starts=starts,
        block_lens=lens,
        block_first=first,
        max_block_len=max(lens, default=0),
        max_candidates=max_candidates,
        cu_blocks=table[2 * num_tokens :].to(torch.int32),
        block_starts_dev=table[2 * num_tokens : 2 * num_tokens + nb],
        token_block=table[:num_tokens],
        token_first_block=table[num_tokens : 2 * num_tokens],
    )
