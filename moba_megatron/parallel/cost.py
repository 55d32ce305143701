"""Bytes each rank sends per layer in the forward, by context-parallel exchange mode, and the
``moba_cp_comm="auto"`` choice made from them (docs/context-parallel.md)."""

from __future__ import annotations


def cp_comm_bytes(mode: str, seq_len: int, cp_size: int, topk: int, num_heads: int, num_kv_heads: int,
                  head_dim: int, element_bytes: int = 2) -> float:
    """``routed``: selected queries out and outputs back for the share of selected blocks held by
    another rank, plus their fp32 LSE; ``allgather``: this rank's K and V to every other rank."""
    local = seq_len / cp_size
    if mode == "routed":
        remote = (cp_size - 1) / cp_size
        rows = remote * (topk - 1) * local * num_heads
        return rows * (2 * head_dim * element_bytes + 4)
    if mode == "allgather":
        return 2 * (cp_size - 1) * local * num_kv_heads * head_dim * element_bytes
    raise ValueError(f"unknown context-parallel exchange mode {mode!r}; use 'routed' or 'allgather'")


def choose_cp_comm(seq_len: int, cp_size: int, topk: int, num_heads: int, num_kv_heads: int, head_dim: int) -> str:
    """The mode that moves fewer bytes (ties: allgather, the simpler one)."""
    counts = {
        mode: cp_comm_bytes(mode, seq_len, cp_size, topk, num_heads, num_kv_heads, head_dim)
        for mode in ("allgather", "routed")
    }
    return min(counts, key=counts.get)
