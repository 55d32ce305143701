"""Megatron's load-balanced context-parallel sharding, seen from MoBA's blocks.

A sequence is cut into ``2 * cp`` equal chunks; rank ``r`` holds chunks ``r`` and ``2cp - 1 - r``
(megatron.core.utils.get_batch_on_this_cp_rank), in that order. MoBA needs every chunk to hold whole
blocks, so a block never straddles two ranks.
"""

from __future__ import annotations

import torch


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
