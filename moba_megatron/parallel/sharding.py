"""Megatron's load-balanced context-parallel sharding, seen from MoBA's blocks.

A sequence is cut into ``2 * cp`` equal chunks; rank ``r`` holds chunks ``r`` and ``2cp - 1 - r``
(megatron.core.utils.get_batch_on_this_cp_rank), in that order. MoBA needs every chunk to hold whole
blocks, so a block never straddles two ranks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..ops.moba.layout import BlockLayout, block_layout


def zigzag_chunks(cp_size: int, cp_rank: int) -> tuple[int, int]:
    return cp_rank, 2 * cp_size - 1 - cp_rank


def check_cp_split(seq_len: int, cp_size: int, chunk: int) -> int:
    """Tokens per chunk; a ValueError naming the numbers and a fix when blocks would straddle ranks."""
    parts = 2 * cp_size
    if seq_len % parts:
        raise ValueError(
            f"seq_len {seq_len} must split into 2 x context_parallel_size = {parts} equal chunks; "
            f"use a multiple of {parts}"
        )
    per_chunk = seq_len // parts
    if per_chunk % chunk:
        valid = parts * chunk
        raise ValueError(
            f"seq_len / (2 x context_parallel_size) = {seq_len} / {parts} = {per_chunk} tokens per chunk is "
            f"not a multiple of moba_chunk_size {chunk}; use a seq_len that is a multiple of {valid} "
            f"(e.g. {max(valid, seq_len // valid * valid)}) or a moba_chunk_size dividing {per_chunk}"
        )
    return per_chunk


def local_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions of this rank's tokens, in local order."""
    per_chunk = seq_len // (2 * cp_size)
    return torch.cat(
        [torch.arange(c * per_chunk, (c + 1) * per_chunk, device=device) for c in zigzag_chunks(cp_size, cp_rank)]
    )


def local_block_ids(seq_len: int, cp_size: int, cp_rank: int, chunk: int) -> list[int]:
    """Global ids of the MoBA blocks this rank holds, in local order."""
    per_chunk = check_cp_split(seq_len, cp_size, chunk)
    blocks = per_chunk // chunk
    return [c * blocks + b for c in zigzag_chunks(cp_size, cp_rank) for b in range(blocks)]


@dataclass(frozen=True)
class ShardBlocks:
    """The MoBA blocks of one rank's share of a batch of equal-length sequences.

    Local tokens are sample-major (``batch`` samples of ``seq_len / cp`` tokens, each the rank's two
    chunks in order), so every local block is a full block of ``chunk`` consecutive local tokens.
    Queries see *global* block ids (``sample * blocks_per_sequence + position``), which is what
    gating ranks and what the ranks agree on; ``owner`` maps a global id to the rank holding it and
    its index there. Provides what ``select_blocks`` reads from a layout.
    """

    batch: int
    seq_len: int
    cp_size: int
    cp_rank: int
    chunk: int
    local: BlockLayout  # the rank's own blocks, for the own-block attention and the block sums
    gathered: BlockLayout  # every rank's tokens gathered rank-major (the all-gather exchange's K/V)
    block_ids: list[int]  # global id of each local block
    all_block_ids: torch.Tensor  # [cp * local blocks] global ids of every rank's blocks, rank-major
    token_block: torch.Tensor  # [local tokens] global id of each token's block
    token_first_block: torch.Tensor  # [local tokens] global id of its sequence's first block

    @property
    def blocks_per_sequence(self) -> int:
        return self.seq_len // self.chunk

    @property
    def local_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def num_blocks(self) -> int:
        return self.batch * self.blocks_per_sequence

    @property
    def max_candidates(self) -> int:
        return self.blocks_per_sequence - 1

    def candidate_range(self, t0: int, t1: int) -> tuple[int, int]:
        first, last = t0 // self.chunk, (t1 - 1) // self.chunk
        per = self.blocks_per_sequence
        return self.block_ids[first] // per * per, max(self.block_ids[first : last + 1])

    def owner(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global block ids -> (owning rank, index among that rank's local blocks)."""
        per_chunk = self.blocks_per_sequence // (2 * self.cp_size)
        sample, pos = block // self.blocks_per_sequence, block % self.blocks_per_sequence
        part, within = pos // per_chunk, pos % per_chunk
        first_half = part < self.cp_size
        rank = torch.where(first_half, part, 2 * self.cp_size - 1 - part)
        index = sample * 2 * per_chunk + torch.where(first_half, within, per_chunk + within)
        return rank, index

    def gathered_blocks(self, block: torch.Tensor) -> torch.Tensor:
        """Global block ids (-1: none) -> their block in ``gathered`` (-1 stays)."""
        rank, index = self.owner(block.long().clamp(min=0))
        return torch.where(block >= 0, rank * self.local_blocks + index, -1)


@functools.lru_cache(maxsize=16)
def shard_blocks(batch: int, seq_len: int, cp_size: int, cp_rank: int, chunk: int, device: torch.device) -> ShardBlocks:
    """Build (and cache: every layer sees the same split) a rank's ``ShardBlocks``; raises the
    ``check_cp_split`` error when blocks would straddle ranks."""
    check_cp_split(seq_len, cp_size, chunk)
    per = seq_len // chunk
    local_len = seq_len // cp_size

    def ids(rank: int) -> list[int]:
        return [s * per + b for s in range(batch) for b in local_block_ids(seq_len, cp_size, rank, chunk)]

    mine = ids(cp_rank)
    every = torch.tensor([b for r in range(cp_size) for b in ids(r)], dtype=torch.int64)
    token_block = torch.tensor(mine, dtype=torch.int64).repeat_interleave(chunk)
    return ShardBlocks(
        batch=batch,
        seq_len=seq_len,
        cp_size=cp_size,
        cp_rank=cp_rank,
        chunk=chunk,
        local=block_layout(tuple(range(0, batch * local_len + 1, chunk)), chunk, device),
        gathered=block_layout(tuple(range(0, cp_size * batch * local_len + 1, chunk)), chunk, device),
        block_ids=mine,
        all_block_ids=every.to(device),
        token_block=token_block.to(device),
        token_first_block=(token_block // per * per).to(device),
    )
