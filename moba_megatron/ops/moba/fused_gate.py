"""MoBA's gate in Triton: score every query against the block key sums and keep its best blocks,
with no ``[T, blocks]`` score tensor and no sort outside the kernel; only the selection comes out.
Two kernels, by the number of selections:

- **Few selections** (up to ``THRESHOLD_ABOVE_SELECTED``; up to ``INSERTION_MAX_SELECTED`` where there
  are too many candidates for the other kernel), any number of blocks: a program takes ``BM``
  consecutive queries of one head and walks the blocks from the first block of the earliest query's
  sequence to the own block of the last query, ``BN`` blocks at a time, scoring on tensor cores and
  keeping a running top-n. Each (score, block) pair is packed into one int64 whose order is "higher
  score, then lower block" (ties go to the lower block). The ``n`` kept keys are renewed by
  inserting the new ones best first in place of the worst kept, for as many rounds as some query of
  the tile still improves: few once the first blocks are seen. Scores: q (bf16/fp16, exact in tf32)
  against fp32 sums through three-pass tf32 products (``tf32x3``), about 2^-22 relative to
  sum |q_d s_d|.
- **More selections** (up to ``MAX_SELECTED``) over at most ``THRESHOLD_MAX_CANDIDATES`` candidate
  blocks: insertion takes a round per kept key renewed, and at many selections most new keys renew
  one (and past 128 it would keep more keys than a program's registers hold). A program holds every
  candidate score of its queries in registers (fp32 products on the CUDA cores, one key-sum row per
  head dim), finds each query's n-th best score by bisection over the scores' bits, and keeps the
  scores above it and, of those equal to it, the lowest blocks (programs of few queries stop bisecting
  once exactly n scores of each query are above the bound). Each query's candidates sit at columns
  relative to the first block of its own sequence, so ``max_candidates`` columns hold every query's
  candidates.

Beyond both, ``gating.select_blocks`` scores in PyTorch. Where both kernels apply, the one that was
faster on an H100 runs (benchmarks/RESULTS.md): insertion at 47 selections of 128 candidates,
threshold at 95 of 512. Either way, selections equal fp32 scoring except between blocks whose fp32
scores differ by ~1e-6 relative (docs/semantics.md allows 1e-5).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_QUERIES = 64
BLOCK_CANDIDATES = 32
INSERTION_MAX_SELECTED = 128
THRESHOLD_ABOVE_SELECTED = 64
MAX_SELECTED = 512
THRESHOLD_MAX_CANDIDATES = 4096
# Candidate scores a program of the threshold kernel holds: [queries, candidates] fp32 in registers,
# with 4 warps (8192 with 8 warps ran 1.6-2.2x slower on an H100).
THRESHOLD_SCORES = 2048
# Programs of at most this many queries (512 candidates and more) stop bisecting once every query's
# count is exact: on an H100, 32K / 64 / 96's gate from 5.1 to 4.3 ms. With more queries the slowest
# row's steps and the loop's test cost more than they save (512 / 96: 11.3 to 12.6 ms).
STOP_EARLY_QUERIES = 4


def default_kernel(num_selected: int, max_candidates: int) -> str:
    """The kernel that selects these unless one is named: the faster where both take them."""
    threshold = num_selected > THRESHOLD_ABOVE_SELECTED and max_candidates <= THRESHOLD_MAX_CANDIDATES
    return "threshold" if threshold else "insertion"


def kernels_for(num_selected: int, max_candidates: int) -> list[str]:
    """The kernels that take this many selections of up to this many candidates."""
    return [name for name, fits in (("insertion", num_selected <= INSERTION_MAX_SELECTED),
                                    ("threshold", num_selected <= MAX_SELECTED
                                     and max_candidates <= THRESHOLD_MAX_CANDIDATES)) if fits]


def supports(q: torch.Tensor, num_selected: int, max_candidates: int) -> bool:
    d = q.shape[-1]
    if not (16 <= d <= 256 and d & (d - 1) == 0):
        return False
    return bool(kernels_for(num_selected, max_candidates))


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


@triton.jit
def _threshold_kernel(Q, ST, TOKEN_BLOCK, TOKEN_FIRST, SEL, T, stride_qt, stride_qh, stride_sh, stride_sd,
                      group, slots, D: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr, STOP_EARLY: tl.constexpr):
    """Each query's ``slots`` best candidates, from all its candidate scores held at once.
    ``ST [Hkv, D, blocks]`` fp32: the block key sums, transposed so a head dim's row is contiguous."""
    h = tl.program_id(1)
    t = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    tmask = t < T
    last = tl.minimum(t, T - 1)  # rows past the end repeat the last query (never stored)
    own = tl.load(TOKEN_BLOCK + last).to(tl.int32)
    first = tl.load(TOKEN_FIRST + last).to(tl.int32)
    col = tl.arange(0, NB)
    block = first[:, None] + col[None, :]  # each query's candidates, from its sequence's first
    valid = block < own[:, None]
    s_head = ST + (h // group) * stride_sh
    q_rows = Q + last * stride_qt + h * stride_qh
    scores = tl.zeros([BM, NB], tl.float32)
    first0 = tl.min(first, 0)
    if first0 == tl.max(first, 0):  # one sequence: the queries share their candidates' key sums
        used = col < tl.max(own, 0) - first0
        for d in range(D):
            sd = tl.load(s_head + d * stride_sd + first0 + col, mask=used, other=0.0)
            scores += tl.load(q_rows + d).to(tl.float32)[:, None] * sd[None, :]
    else:
        for d in range(D):
            sd = tl.load(s_head + d * stride_sd + block, mask=valid, other=0.0)
            scores += tl.load(q_rows + d).to(tl.float32)[:, None] * sd
    scores = tl.where(scores == 0.0, 0.0, scores)  # -0.0 ranks as +0.0
    bits = scores.to(tl.int32, bitcast=True)
    key = tl.where(valid, bits ^ ((bits >> 31) & 0x7FFFFFFF), -(2**31))  # IEEE order -> int order
    need = tl.minimum(tl.sum(valid.to(tl.int32), 1), slots)
    # The need-th largest key: the largest x with at least ``need`` keys >= x, or, stopping early, any x
    # with exactly ``need`` keys >= x (the same keys are chosen).
    lo = tl.full([BM], -(2**31), tl.int64)
    hi = tl.full([BM], 2**31 - 1, tl.int64)
    # Two loops with their own step, not one shared jit step: sharing it made the 32-halving loop 40%
    # slower on an H100 (32K / 128 / 48: 3.2 to 4.6 ms).
    if STOP_EARLY:
        while tl.max((lo < hi).to(tl.int32), 0) > 0:
            mid = (lo + hi + 1) >> 1  # in int64: lo + hi overflows int32
            count = tl.sum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), 1)
            enough = count >= need
            lo = tl.where(enough, mid, lo)
            hi = tl.where(count == need, mid, tl.where(enough, hi, mid - 1))  # exact: lo = hi = mid
    else:
        for _ in range(32):
            mid = (lo + hi + 1) >> 1
            enough = tl.sum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), 1) >= need
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
    above = valid & (key > lo[:, None])
    tied = valid & (key == lo[:, None])
    room = need - tl.sum(above.to(tl.int32), 1)
    chosen = (above | (tied & (tl.cumsum(tied.to(tl.int32), 1) <= room[:, None]))) & (need > 0)[:, None]
    place = tl.cumsum(chosen.to(tl.int32), 1) - 1  # ascending blocks, in ascending places
    dst = SEL + (t[:, None] * tl.num_programs(1) + h) * slots + place
    tl.store(dst, block, mask=chosen & tmask[:, None])


def select_blocks_fused(q: torch.Tensor, block_sums: torch.Tensor, token_block: torch.Tensor,
                        token_first_block: torch.Tensor, num_selected: int, max_candidates: int,
                        kernel: str | None = None) -> torch.Tensor:
    """``gating.select_blocks`` in one kernel: ``[T, Hq, num_selected]`` int32 block ids in ascending
    order, -1 where a query has fewer candidates. ``max_candidates``: the most candidate blocks any
    query has. ``kernel``: "insertion" or "threshold" where it takes the inputs (benchmarks and tests
    compare them); default: ``default_kernel``."""
    t, hq, d = q.shape
    hkv = block_sums.shape[1]
    if kernel is None:
        kernel = default_kernel(num_selected, max_candidates)
    elif kernel not in kernels_for(num_selected, max_candidates):
        raise ValueError(f"the {kernel!r} gate kernel does not take {num_selected} selections of up to "
                         f"{max_candidates} candidates: use one of {kernels_for(num_selected, max_candidates)}")
    if kernel == "threshold":
        sel = torch.full((t, hq, num_selected), -1, dtype=torch.int32, device=q.device)
        if t == 0:
            return sel
        sums_t = block_sums.permute(1, 2, 0).contiguous()  # [Hkv, D, blocks]
        nb = max(2, triton.next_power_of_2(max_candidates))
        bm = max(1, min(64, THRESHOLD_SCORES // nb))
        _threshold_kernel[(triton.cdiv(t, bm), hq)](
            q, sums_t, token_block, token_first_block, sel, t, q.stride(0), q.stride(1), sums_t.stride(0),
            sums_t.stride(1), hq // hkv, num_selected, D=d, BM=bm, NB=nb, STOP_EARLY=bm <= STOP_EARLY_QUERIES,
            num_warps=4,
        )
        return sel
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
