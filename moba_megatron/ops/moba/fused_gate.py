"""MoBA's gate as one Triton kernel: score every query against the block key sums on tensor cores and
keep a running top-n per (query, head) while streaming over the candidate blocks. No score tensor
is written and no sort runs outside the kernel; only the selection comes out.

A program takes ``BM`` consecutive queries of one head and walks the blocks from the first block of
the earliest query's sequence to the own block of the last query, ``BN`` blocks at a time. Each
(score, block) pair is packed into one int64 whose order is "higher score, then lower block" (ties
go to the lower block). The ``n`` kept keys are renewed by inserting the new ones best first in
place of the worst kept, for as many rounds as some query of the tile still improves: few once the
first blocks are seen. (No sort: n is small, and sorting networks cost more, under Triton's
interpreter most of all.)

Scores: q (bf16/fp16, exact in tf32) against fp32 sums through three-pass tf32 products
(``tf32x3``), about 2^-22 relative to sum |q_d s_d|: selections equal fp32 scoring except between
blocks whose fp32 scores differ by ~1e-6 relative (docs/semantics.md allows 1e-5).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_QUERIES = 64
BLOCK_CANDIDATES = 32


def supports(q: torch.Tensor, num_selected: int) -> bool:
    d = q.shape[-1]
    return 16 <= d <= 256 and d & (d - 1) == 0 and num_selected <= 64


@triton.jit
def _gate_kernel(Q, S, TOKEN_BLOCK, TOKEN_FIRST, SEL, T, stride_qt, stride_qh, stride_sb, stride_sh,
                 group, slots, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SP: tl.constexpr,
                 PRECISION: tl.constexpr):
    h = tl.program_id(1)
    t = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    tmask = t < T
    own = tl.load(TOKEN_BLOCK + t, mask=tmask, other=0)
    first = tl.load(TOKEN_FIRST + t, mask=tmask, other=0)
    lo = tl.min(tl.where(tmask, first, 2**62), 0)
    hi = tl.max(tl.where(tmask, own, 0), 0)  # candidates lie strictly before a query's own block
    d = tl.arange(0, D)
    q = tl.load(Q + t[:, None] * stride_qt + h * stride_qh + d[None, :], mask=tmask[:, None], other=0.0)
    q = q.to(tl.float32)
    s_base = S + (h // group) * stride_sh + d[None, :]
    col = tl.arange(0, SP)[None, :]
    # The kept keys (any order); -2^63: an empty place, 2^63-1: a place past ``slots``, never used.
    best = tl.where(col < slots, -(2**63), 2**63 - 1).to(tl.int64) + tl.zeros([BM, SP], tl.int64)
    for j0 in range(lo, hi, BN):
        j = j0 + tl.arange(0, BN)
        sums = tl.load(s_base + j[:, None] * stride_sb, mask=(j < hi)[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(sums), input_precision=PRECISION)
        scores = tl.where(scores == 0.0, 0.0, scores)  # -0.0 ranks as +0.0
        bits = scores.to(tl.int32, bitcast=True)
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # IEEE order -> two's complement order
        key = (bits.to(tl.int64) << 32) | (0x7FFFFFFF - j[None, :])
        valid = (j[None, :] >= first[:, None]) & (j[None, :] < own[:, None])
        key = tl.where(valid, key, -(2**63))
        # Insert the new keys best first while one beats a query's worst kept key: as many rounds
        # as the most keys any query of the tile takes in (few, once the first blocks are seen).
        top = tl.max(key, 1)
        worst = tl.min(best, 1)
        while tl.max((top > worst).to(tl.int32), 0) > 0:
            place = tl.min(tl.where(best == worst[:, None], col, SP), 1)  # one place holding the worst
            take = (col == place[:, None]) & (top > worst)[:, None]
            best = tl.where(take, top[:, None], best)
            key = tl.where(key == top[:, None], -(2**63), key)
            top = tl.max(key, 1)
            worst = tl.min(best, 1)
    # Block ids in ascending order (slots rounds of min-and-remove), -1 for the slots left empty.
    empty = (best == -(2**63)) | (best == 2**63 - 1)
    ids = tl.where(empty, 2**31 - 1, 0x7FFFFFFF - (best & 0xFFFFFFFF)).to(tl.int32)
    out = tl.full([BM, SP], -1, tl.int32)
    for i in range(slots):
        low = tl.min(ids, 1)[:, None]
        out = tl.where(col == i, tl.where(low == 2**31 - 1, -1, low), out)
        ids = tl.where(ids == low, 2**31 - 1, ids)
    dst = SEL + (t[:, None] * tl.num_programs(1) + h) * slots + col
    tl.store(dst, out, mask=tmask[:, None] & (col < slots))


def select_blocks_fused(q: torch.Tensor, block_sums: torch.Tensor, token_block: torch.Tensor,
                        token_first_block: torch.Tensor, num_selected: int) -> torch.Tensor:
    """``gating.select_blocks`` in one kernel: ``[T, Hq, num_selected]`` int32 block ids in ascending
    order, -1 where a query has fewer candidates."""
    t, hq, d = q.shape
    hkv = block_sums.shape[1]
    sel = torch.empty(t, hq, num_selected, dtype=torch.int32, device=q.device)
    if t == 0 or num_selected == 0:
        return sel.fill_(-1)
    sums = block_sums.contiguous()
    precision = "ieee" if q.dtype == torch.float32 else "tf32x3"
    _gate_kernel[(triton.cdiv(t, BLOCK_QUERIES), hq)](
        q, sums, token_block, token_first_block, sel, t, q.stride(0), q.stride(1),
        sums.stride(0), sums.stride(1), hq // hkv, num_selected,
        D=d, BM=BLOCK_QUERIES, BN=BLOCK_CANDIDATES, SP=max(2, triton.next_power_of_2(num_selected)),
        PRECISION=precision, num_warps=4,
    )
    return sel
