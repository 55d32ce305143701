"""MoBA's routed attention in Triton: the rows that chose a block attend it straight out of q, k, v
(forward and backward), the partial results are merged with the own-block ones in one pass, and,
for the backends whose backward runs on tiles, each call's rows and key tiles are gathered in one
launch each, and once a head group's calls are done their gradients are summed where the calls left
them, in one pass for dq and one for dK/dV (no atomics, no copies into grids). K and V reach the
kernels that stream over a block's keys through TMA descriptors.

Rows come sorted into *runs* (``routing.Routes``): the rows of one run attend one key block of one
kv head. A row id ``r`` names its cell and slot, ``cell = r // slots`` with ``cell = t * heads + h``
(token t, head h of the row view: query head ``h // parts``, see ``routing``). Nothing here waits
for the host: run bounds live on the device, and a forward program finds its run by binary search
over the runs' tile counts.

- forward: one program per tile of up to ``BM`` rows of a run, against the block's keys; it writes
  the rows' partial output and LSE at their cells' places in the head group's merge grid.
- backward: one program per (kv head, block, ``BN`` keys of it) walks every row that chose the
  block: dK and dV of those keys stay in registers and are added once into the own-block gradients
  (no atomics, no fp32 copies of K/V). Each row's dq is added into an fp32 accumulator with atomics:
  from that kernel for small blocks, from a second one walking the block's keys per tile of rows
  for large blocks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

_LOG2E = 1.4426950408889634

# (rows per tile, keys per step, warps, pipeline stages), tried in order: the first is the fastest
# at large blocks (benchmarks/tune_fused_routes.py); the second needs less shared memory, for GPUs
# that cannot hold the first.
FORWARD_CONFIGS = [(128, 128, 8, 3), (64, 64, 4, 2)]
# Head dims of at most 64: half the keys a step and half the warps keep more tiles in flight.
FORWARD_CONFIGS_HEAD_DIM_64 = [(128, 64, 4, 3), (64, 64, 4, 2)]
# (rows per step, keys per program, warps, pipeline stages) of the backward's dK/dV kernel, and
# (rows per program, keys per step, warps, stages) of its dq kernel, tried in order.
# Blocks of at most 256 keys (``_SMALL_BLOCKS``) take other dK/dV tiles than larger ones: more keys a
# program, since a small block has few keys to split. At head dims of at most 64, twice the rows a
# step and a third stage; blocks of 64 keys, whose programs hold all of them, half the warps
# (benchmarks/tune_fused_routes.py).
BACKWARD_CONFIGS = [(64, 64, 4, 3), (32, 32, 4, 1)]
BACKWARD_CONFIGS_SMALL_BLOCKS = [(32, 128, 8, 2), (32, 64, 4, 1)]
BACKWARD_CONFIGS_SMALL_BLOCKS_HEAD_DIM_64 = [(64, 128, 8, 3), (32, 64, 4, 1)]
BACKWARD_CONFIGS_BLOCKS_64_HEAD_DIM_64 = [(64, 64, 4, 3), (32, 64, 4, 1)]
_SMALL_BLOCKS = 256
# Head dims of at most 64 fit twice the rows a step in the same registers; at 128 the larger tile
# spills and is slower.
BACKWARD_CONFIGS_HEAD_DIM_64 = [(128, 64, 4, 2), (64, 64, 4, 2), (32, 32, 4, 1)]
BACKWARD_DQ_CONFIGS = [(64, 64, 4, 2), (32, 32, 4, 1)]
MERGE_ROWS = 32
WINDOW_RUNS = 128  # runs a program of the window search bounds
GATHER_ROWS = 64
FOLD_ROWS = 32
PLACE_ROWS = 1024
# Keys per program of the dK/dV fold, whose grid is only (key blocks, C / FOLD_KEYS): few keys a
# program give the grid enough programs to fill the GPU.
FOLD_KEYS = 16
_config_in_use: dict[tuple, tuple] = {}


def supports(q: torch.Tensor, chunk: int) -> bool:
    """A head dim Triton tiles natively and whole 16-key steps. (Device and dtype are the backend's
    business: only CUDA half-precision backends route here.)"""
    d = q.shape[-1]
    return chunk % 16 == 0 and 16 <= d <= 128 and d & (d - 1) == 0


@triton.jit
def _row_place(rid, slots, heads):
    """Token (int64: it scales strides), head and slot of row ``rid``. Row ids are int32 where they
    fit (``routing.Routes.order``): int64 division is emulated in software, and slow."""
    cell = rid // slots
    return (cell // heads).to(tl.int64), cell % heads, rid % slots


@triton.jit
def _find_run(tile_ends, nruns, p):
    """The run whose tiles hold program ``p``: the first r with tile_ends[r] > p (nruns if none)."""
    lo = 0
    hi = nruns
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(tile_ends + mid) <= p:
            lo = mid + 1
        else:
            hi = mid
    return lo


@triton.jit
def _tile_of_run(tile_ends, begin, end, order, r, p, BM: tl.constexpr):
    """Program ``p``'s rows: a tile of the ``r``-th run of ``tile_ends``, whose sorted rows are
    ``[begin[r], end[r])``. Returns the rows' ids and which of the ``BM`` places hold one."""
    before = tl.load(tile_ends + r - 1, mask=r > 0, other=0)
    row0 = tl.load(begin + r) + (p - before) * BM
    offs = tl.arange(0, BM)
    mask = row0 + offs < tl.load(end + r)
    return tl.load(order + row0 + offs, mask=mask, other=0), mask


@triton.jit
def _first_at_least(order, lo, hi, bound, cell_rows, STEPS: tl.constexpr):
    """Of rows ``[lo, hi)`` of ``order`` (tokens ascending), the first whose token is at least ``bound``."""
    for _ in range(STEPS):
        open_ = lo < hi
        mid = (lo + hi) // 2
        token = tl.load(order + mid, mask=open_, other=0) // cell_rows
        lo = tl.where(open_ & (token < bound), mid + 1, lo)
        hi = tl.where(open_ & (token >= bound), mid, hi)
    return lo


@triton.jit
def _window_kernel(order, run_start, BEGIN, END, run0, run_step, nruns, t0, t1, cell_rows,
                   STEPS: tl.constexpr, BR: tl.constexpr):
    """``BEGIN[r], END[r]``: where the rows of the ``r``-th run (run ``run0 + r * run_step``) with a
    token in ``[t0, t1)`` begin and end. A run's rows are in row order, so their tokens
    (``row // cell_rows``) ascend."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    valid = r < nruns
    run = run0 + r * run_step
    first = tl.load(run_start + run, mask=valid, other=0)
    last = tl.load(run_start + run + 1, mask=valid, other=0)
    tl.store(BEGIN + r, _first_at_least(order, first, last, t0, cell_rows, STEPS), mask=valid)
    tl.store(END + r, _first_at_least(order, first, last, t1, cell_rows, STEPS), mask=valid)


@triton.jit
def _forward_kernel(Q, K_DESC, V_DESC, O, L, order, begin, end, tile_ends, block_start,
                    stride_qt, stride_qh, run0, run_step, nruns, heads, parts, h0, nh, slots, nb, subgroups, t0,
                    scale_log2, CHUNK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    p = tl.program_id(0)
    r = _find_run(tile_ends, nruns, p)
    if r < nruns:
        run = run0 + r * run_step
        rid, mask = _tile_of_run(tile_ends, begin, end, order, r, p, BM)
        t, h, s = _row_place(rid, slots, heads)
        d = tl.arange(0, D)
        q = tl.load(Q + t[:, None] * stride_qt + (h // parts)[:, None] * stride_qh + d[None, :], mask=mask[:, None],
                    other=0.0)
        key_block = run // subgroups  # kv_head * nb + block
        col = (key_block // nb) * D  # the kv head's columns of K, V viewed as [Tk, Hkv * D]
        key0 = tl.load(block_start + key_block % nb).to(tl.int32)
        m = tl.full([BM], float("-inf"), tl.float32)
        l = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        for n0 in range(0, CHUNK, BN):
            k = K_DESC.load([key0 + n0, col])
            scores = tl.dot(q, tl.trans(k)) * scale_log2
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp2(m - m_new)
            prob = tl.exp2(scores - m_new[:, None])
            l = l * alpha + tl.sum(prob, 1)
            v = V_DESC.load([key0 + n0, col])
            acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v)
            m = m_new
        g = ((t - t0) * nh + h - h0) * slots + s  # the row's place in the window's merge grid
        tl.store(O + g[:, None] * D + d[None, :], (acc / l[:, None]).to(O.dtype.element_ty), mask=mask[:, None])
        tl.store(L + g, (m + tl.log2(l)) / 1.4426950408889634, mask=mask)


@triton.jit
def _backward_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, order, run_start, block_start,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_dqt, stride_dqh, stride_dkt, stride_dkh,
                     num_tokens, heads, slots, nb, subgroups, scale, scale_log2,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, WITH_DQ: tl.constexpr):
    """dK and dV of ``BN`` keys of one block of one kv head, over every row that chose the block;
    with ``WITH_DQ`` also the rows' dq against these keys (added with atomics)."""
    # Blocks in order, kv heads within: under causal attention earlier blocks are chosen by more rows,
    # so the longest programs start first and the last wave is short.
    hkv = tl.num_programs(0) // nb
    kvh = tl.program_id(0) % hkv
    block = tl.program_id(0) // hkv
    first_run = (kvh * nb + block) * subgroups  # the block's runs are adjacent: one span of rows
    start = tl.load(run_start + first_run)
    end = tl.load(run_start + first_run + subgroups)
    if end > start:  # blocks nobody chose (partial last blocks among them) are left alone
        d = tl.arange(0, D)
        keys = tl.load(block_start + block) + tl.program_id(1) * BN + tl.arange(0, BN)
        k = tl.load(K + keys[:, None] * stride_kt + kvh * stride_kh + d[None, :])
        v = tl.load(V + keys[:, None] * stride_kt + kvh * stride_kh + d[None, :])
        dk = tl.zeros([BN, D], tl.float32)
        dv = tl.zeros([BN, D], tl.float32)
        offs = tl.arange(0, BM)
        for row0 in range(start, end, BM):
            mask = row0 + offs < end
            rid = tl.load(order + row0 + offs, mask=mask, other=0)
            t, h, _ = _row_place(rid, slots, heads)
            src = t[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :]
            q = tl.load(Q + src, mask=mask[:, None], other=0.0)
            do = tl.load(DO + src, mask=mask[:, None], other=0.0)
            lse = tl.load(LSE + h * num_tokens + t, mask=mask, other=0.0)
            delta = tl.load(DELTA + h * num_tokens + t, mask=mask, other=0.0)
            prob = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None] * 1.4426950408889634)
            prob = tl.where(mask[:, None], prob, 0.0)
            dv += tl.dot(tl.trans(prob.to(do.dtype)), do)
            ds = prob * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            if WITH_DQ:
                dq = tl.dot(ds.to(k.dtype), k) * scale
                tl.atomic_add(DQ + t[:, None] * stride_dqt + h[:, None] * stride_dqh + d[None, :], dq,
                              mask=mask[:, None], sem="relaxed")
        dst = keys[:, None] * stride_dkt + kvh * stride_dkh + d[None, :]
        tl.store(DK + dst, (tl.load(DK + dst).to(tl.float32) + dk * scale).to(DK.dtype.element_ty))
        tl.store(DV + dst, (tl.load(DV + dst).to(tl.float32) + dv).to(DV.dtype.element_ty))


@triton.jit
def _backward_dq_kernel(Q, K_DESC, V_DESC, DO, LSE, DELTA, DQ, order, run_start, tile_ends, block_start,
                        stride_qt, stride_qh, stride_dqt, stride_dqh,
                        nruns, num_tokens, heads, slots, nb, subgroups, scale, scale_log2,
                        CHUNK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """dq of a tile of up to ``BM`` rows of one run against its whole block (the backward of
    blocks too large for one program's keys): one atomic add per row element."""
    p = tl.program_id(0)
    run = _find_run(tile_ends, nruns, p)
    if run < nruns:
        rid, mask = _tile_of_run(tile_ends, run_start, run_start + 1, order, run, p, BM)
        t, h, _ = _row_place(rid, slots, heads)
        d = tl.arange(0, D)
        src = t[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :]
        q = tl.load(Q + src, mask=mask[:, None], other=0.0)
        do = tl.load(DO + src, mask=mask[:, None], other=0.0)
        lse = tl.load(LSE + h * num_tokens + t, mask=mask, other=0.0)
        delta = tl.load(DELTA + h * num_tokens + t, mask=mask, other=0.0)
        key_block = run // subgroups  # kv_head * nb + block
        col = (key_block // nb) * D
        key0 = tl.load(block_start + key_block % nb).to(tl.int32)
        dq = tl.zeros([BM, D], tl.float32)
        for n0 in range(0, CHUNK, BN):
            k = K_DESC.load([key0 + n0, col])
            v = V_DESC.load([key0 + n0, col])
            prob = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None] * 1.4426950408889634)
            ds = prob * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        tl.atomic_add(DQ + t[:, None] * stride_dqt + h[:, None] * stride_dqh + d[None, :], dq * scale,
                      mask=mask[:, None], sem="relaxed")


@triton.jit
def _row_dot_kernel(A, B, OUT, cells, heads, num_tokens, stride_t, stride_h, D: tl.constexpr, BR: tl.constexpr):
    """``OUT[h * T + t] = a[t, h] . b[t, h]`` in fp32 (the backward's dO . O)."""
    c = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    mask = c < cells
    t = c // heads
    h = c % heads
    src = t[:, None] * stride_t + h[:, None] * stride_h + tl.arange(0, D)[None, :]
    a = tl.load(A + src, mask=mask[:, None], other=0.0).to(tl.float32)
    b = tl.load(B + src, mask=mask[:, None], other=0.0).to(tl.float32)
    tl.store(OUT + h * num_tokens + t, tl.sum(a * b, 1), mask=mask)


@triton.jit
def _merge_kernel(OUT, LSE, GO, GL, T, t0, nt, stride_ot, stride_oh, nh, h0, parts, slots,
                  D: tl.constexpr, BR: tl.constexpr):
    """In place: each (token, head) cell of tokens ``[t0, t0 + nt)``: its own-block out/LSE merged with
    its slots' partials. Offsets are int64: a grid of all heads (context parallelism's routed
    exchange) passes 2^31."""
    cells = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    mask = cells < nt * nh
    t = t0 + cells // nh
    h = (h0 + cells % nh) // parts
    d = tl.arange(0, D)
    out_ptr = OUT + t[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :]
    m = tl.load(LSE + h * T + t, mask=mask, other=0.0)  # the own block is never empty
    l = tl.full([BR], 1.0, tl.float32)
    acc = tl.load(out_ptr, mask=mask[:, None], other=0.0).to(tl.float32)
    for s in range(slots):
        row = cells * slots + s
        part = tl.load(GL + row, mask=mask, other=float("-inf"))
        m_new = tl.maximum(m, part)
        alpha = tl.exp(m - m_new)
        w = tl.exp(part - m_new)
        # Unused slots' partials were never written (routed_forward leaves the grid uninitialised).
        used = mask & (part > float("-inf"))
        g = tl.load(GO + row[:, None] * D + d[None, :], mask=used[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + w[:, None] * g
        l = l * alpha + w
        m = m_new
    tl.store(out_ptr, (acc / l[:, None]).to(OUT.dtype.element_ty), mask=mask[:, None])
    tl.store(LSE + h * T + t, m + tl.log(l), mask=mask)


@triton.jit
def _gather_kernel(Q, DO, O, LSE, QR, DOR, OR, LR, SRC, order, tile_row0, tile_rows, width, T, stride_t, stride_h,
                   heads, parts, slots, h0, nh, code, D: tl.constexpr, BR: tl.constexpr):
    """Kernel rows ``[first, first + BR)`` of a call of tiles padded to ``width`` rows (``BR`` divides
    it, so they lie in one tile): row i is sorted row ``tile_row0 + i % width`` of its tile or, past
    the tile's rows (padding), the tile's last row again, with a zero dO. Each real row also leaves
    ``code + i`` at its (token, head, slot) place of ``SRC``, where the fold of dq finds it."""
    first = tl.program_id(0).to(tl.int64) * BR
    tile = first // width
    pos = first % width + tl.arange(0, BR)
    count = tl.load(tile_rows + tile)
    real = pos < count
    rid = tl.load(order + tl.load(tile_row0 + tile) + tl.minimum(pos, tl.maximum(count - 1, 0)))
    t, h, s = _row_place(rid, slots, heads)
    rows = first + tl.arange(0, BR)
    d = tl.arange(0, D)
    hr = h // parts
    src = t[:, None] * stride_t + hr[:, None] * stride_h + d[None, :]
    dst = rows[:, None] * D + d[None, :]
    tl.store(QR + dst, tl.load(Q + src))
    tl.store(OR + dst, tl.load(O + src))
    tl.store(DOR + dst, tl.load(DO + src, mask=real[:, None], other=0.0))
    tl.store(LR + rows, tl.load(LSE + hr * T + t))
    tl.store(SRC + (t * nh + h - h0) * slots + s, code + rows, mask=real)


@triton.jit
def _gather_key_tiles_kernel(K, V, KT, VT, tile_block, block_start, nb, num_tokens, stride_kt, stride_kh, stride_vt,
                             stride_vh, CHUNK: tl.constexpr, D: tl.constexpr, BK: tl.constexpr):
    """``KT[i, j] = K[block_start[b] + j, kvh]`` (and V) for key j of tile i, whose keys are block b of kv
    head kvh (``tile_block[i] = kvh * nb + b``)."""
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BK + tl.arange(0, BK)
    kb = tl.load(tile_block + i)
    token = tl.minimum(tl.load(block_start + kb % nb) + j, num_tokens - 1)  # selected blocks are full
    d = tl.arange(0, D)[None, :]
    dst = (i * CHUNK + j)[:, None] * D + d
    tl.store(KT + dst, tl.load(K + (token * stride_kt + (kb // nb) * stride_kh)[:, None] + d))
    tl.store(VT + dst, tl.load(V + (token * stride_vt + (kb // nb) * stride_vh)[:, None] + d))


@triton.jit
def _fold_key_tiles_kernel(DK, DV, PARTS, offsets, entries, bounds, blocks, block_start, nb, kv0,
                           stride_t, stride_h, CHUNK: tl.constexpr, D: tl.constexpr, BK: tl.constexpr):
    """``DK[block_start[b] + j, kvh - kv0] +=`` the sum of key j's gradient over the tiles of key block
    ``blocks[e] = kvh * nb + b`` (tile ``code & (2^40 - 1)`` of call ``i = code >> 40``, whose dK and dV
    lie at ``PARTS + offsets[2 * i]`` and ``PARTS + offsets[2 * i + 1]``, for each code of
    ``entries[bounds[e]:bounds[e + 1]]``), in fp32, rounded once. Each key has one program: no atomics."""
    e = tl.program_id(0)
    j = tl.program_id(1) * BK + tl.arange(0, BK)
    d = tl.arange(0, D)[None, :]
    acc_k = tl.zeros([BK, D], tl.float32)
    acc_v = tl.zeros([BK, D], tl.float32)
    for x in range(tl.load(bounds + e), tl.load(bounds + e + 1)):
        code = tl.load(entries + x)
        rows = (((code & 0xFFFFFFFFFF) * CHUNK + j) * D)[:, None] + d
        acc_k += tl.load(PARTS + tl.load(offsets + 2 * (code >> 40)) + rows).to(tl.float32)
        acc_v += tl.load(PARTS + tl.load(offsets + 2 * (code >> 40) + 1) + rows).to(tl.float32)
    kb = tl.load(blocks + e)
    dst = ((tl.load(block_start + kb % nb) + j) * stride_t + (kb // nb - kv0) * stride_h)[:, None] + d
    tl.store(DK + dst, (tl.load(DK + dst).to(tl.float32) + acc_k).to(DK.dtype.element_ty))
    tl.store(DV + dst, (tl.load(DV + dst).to(tl.float32) + acc_v).to(DV.dtype.element_ty))


@triton.jit
def _fold_kernel(DST, PARTS, cells, n, slots, stride_t, stride_h, D: tl.constexpr, BR: tl.constexpr):
    """``DST[t, h] += sum_s PARTS[t, h, s]`` for ``cells = T * n`` cells, in fp32, rounded once."""
    c = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    mask = c[:, None] < cells
    d = tl.arange(0, D)[None, :]
    dst = DST + (c // n)[:, None] * stride_t + (c % n)[:, None] * stride_h + d
    total = tl.load(dst, mask=mask).to(tl.float32)
    for s in range(slots):
        total += tl.load(PARTS + (c * slots + s)[:, None] * D + d, mask=mask).to(tl.float32)
    tl.store(dst, total.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _fold_rows_kernel(DST, SRC, ROWS, offsets, cells, n, slots, stride_t, stride_h,
                      D: tl.constexpr, BR: tl.constexpr):
    """``DST[t, h] += sum_s`` of the row each (t, h, s) place of ``SRC`` names (``piece << 40 | row``:
    row ``row`` of the call output at ``ROWS + offsets[piece]``; -1: none), in fp32, rounded once."""
    c = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    mask = c < cells
    d = tl.arange(0, D)[None, :]
    dst = DST + (c // n)[:, None] * stride_t + (c % n)[:, None] * stride_h + d
    total = tl.load(dst, mask=mask[:, None]).to(tl.float32)
    for s in range(slots):
        code = tl.load(SRC + c * slots + s, mask=mask, other=-1)
        used = code >= 0
        base = tl.load(offsets + (code >> 40), mask=used, other=0)
        row = code & 0xFFFFFFFFFF
        total += tl.load(ROWS + base[:, None] + row[:, None] * D + d, mask=used[:, None], other=0.0).to(tl.float32)
    tl.store(dst, total.to(DST.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _place_rows_kernel(ORDER, ROWS, BASE, n, per_token, token_stride, offset, BR: tl.constexpr):
    """``ORDER[BASE + i] = r + r // per_token * token_stride + offset`` for ``r = ROWS[i]``."""
    i = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    mask = i < n
    r = tl.load(ROWS + i, mask=mask, other=0)
    rid = r + r // per_token * token_stride + offset
    tl.store(ORDER + tl.load(BASE) + i, rid.to(ORDER.dtype.element_ty), mask=mask)


def _launch(key, configs, launch):
    """Run ``launch(config)`` with the first configuration this GPU can hold, and remember it."""
    for config in [_config_in_use[key]] if key in _config_in_use else configs:
        try:
            launch(config)
        except triton.runtime.errors.OutOfResources:
            if config == configs[-1]:
                raise
            continue
        _config_in_use[key] = config
        return


def key_descriptors(k: torch.Tensor, v: torch.Tensor, bn: int):
    """TMA descriptors of ``bn`` keys x one kv head of K and V ``[Tk, Hkv, D]``, viewed as
    ``[Tk, Hkv * D]``: Hopper's copy engine then streams the key blocks, off the threads that compute.
    The copy engine wants 16-byte aligned bases."""
    descs = []
    for x in (k, v):
        if not (x.is_contiguous() and x.data_ptr() % 16 == 0):
            x = x.clone(memory_format=torch.contiguous_format)
        descs.append(TensorDescriptor.from_tensor(x.view(x.shape[0], -1), [bn, x.shape[-1]]))
    return descs


def routed_forward(q, k, v, routes, grp, block_starts, chunk: int, scale: float, window: tuple[int, int]):
    """Partial output and LSE of the rows of head group ``grp`` (``routing.HeadGroup``) whose token lies
    in ``window = (t0, t1)``, in merge-grid layout: ``[(t1 - t0) * nh * slots + 1, D]`` and
    ``[(t1 - t0) * nh * slots + 1]`` fp32 (the last row is spare). Where a slot is unused its LSE is
    -inf and its output row uninitialised. ``q [T, Hq, D]``: the real heads of the row view's
    ``routes.heads`` (``routes.parts`` a head)."""
    d = q.shape[-1]
    t0, t1 = window
    nh, slots = grp.h1 - grp.h0, routes.slots
    out = q.new_empty((t1 - t0) * nh * slots + 1, d)  # only the rows' places are written: read them by LSE
    lse = torch.full((out.shape[0],), float("-inf"), dtype=torch.float32, device=q.device)
    nruns, step, run0 = grp.num_runs, grp.run_step, grp.run0
    if nruns == 0 or routes.order.numel() == 0 or t1 == t0:
        return out, lse
    begin = torch.empty(nruns, dtype=torch.int64, device=q.device)
    end = torch.empty_like(begin)
    _window_kernel[(triton.cdiv(nruns, WINDOW_RUNS),)](
        routes.order, routes.run_start, begin, end, run0, step, nruns, t0, t1, routes.heads * slots,
        STEPS=40, BR=WINDOW_RUNS,  # 40 halvings: any run of up to 2^40 rows
    )
    counts = end - begin
    scalars = (run0, step, nruns, routes.heads, routes.parts, grp.h0, nh, slots, routes.num_blocks, routes.subgroups,
               t0, scale * _LOG2E)

    def launch(config):
        bm, bn, warps, stages = config
        bn = math.gcd(bn, chunk)
        tile_ends = torch.cumsum(torch.div(counts + bm - 1, bm, rounding_mode="floor"), 0)
        programs = -(-(t1 - t0) * nh * slots // bm) + nruns  # at least the tiles there are; the rest exit at once
        _forward_kernel[(programs,)](
            q, *key_descriptors(k, v, bn), out, lse, routes.order, begin, end, tile_ends, block_starts,
            q.stride(0), q.stride(1), *scalars,
            CHUNK=chunk, D=d, BM=bm, BN=bn, num_warps=warps, num_stages=stages,
        )

    configs = FORWARD_CONFIGS_HEAD_DIM_64 if d <= 64 else FORWARD_CONFIGS
    _launch(("forward", q.device, q.dtype, d, chunk), configs, launch)
    return out, lse


def _backward_configs(chunk: int, head_dim: int) -> list[tuple]:
    """The dK/dV kernel's tile configurations for this block size and head dim, tried in order."""
    if chunk > _SMALL_BLOCKS:
        return BACKWARD_CONFIGS_HEAD_DIM_64 if head_dim <= 64 else BACKWARD_CONFIGS
    if head_dim > 64:
        return BACKWARD_CONFIGS_SMALL_BLOCKS
    return BACKWARD_CONFIGS_BLOCKS_64_HEAD_DIM_64 if chunk <= 64 else BACKWARD_CONFIGS_SMALL_BLOCKS_HEAD_DIM_64


def routed_backward(dout, q, k, v, out, lse, routes, block_starts, chunk: int, scale: float, dq, dk, dv) -> None:
    """Adds every routed row's gradients in place: dq into ``dq`` (fp32, shaped like q) and dK, dV
    into ``dk, dv`` (any dtype, shaped like k). ``dout, q, out [T, heads, D]`` share strides and
    ``lse [heads, T]`` is the merged LSE the rows' probabilities are taken against.

    Blocks of at most two programs' keys get their dq in the dK/dV kernel (at most two atomic adds
    per row element); larger blocks in a second kernel per tile of rows, so the atomics do not grow
    with the block."""
    t, heads, d = q.shape
    assert dout.stride() == q.stride() and dq.dtype == torch.float32 and dk.stride() == dv.stride()
    # Its rows are the query heads' own: slots are split into parts only for backwards that keep
    # per-slot rows (routing.route_selection's split_slots).
    assert routes.parts == 1, "the Triton backward takes whole slots"
    if routes.order.numel() == 0 or t == 0:
        return
    delta = torch.empty(heads, t, dtype=torch.float32, device=q.device)
    _row_dot_kernel[(triton.cdiv(t * heads, 32),)](
        dout, out, delta, t * heads, heads, t, out.stride(0), out.stride(1), D=d, BR=32, num_warps=4
    )
    hkv, nb = k.shape[1], routes.num_blocks
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), dq.stride(0), dq.stride(1))
    configs = _backward_configs(chunk, d)
    key = ("backward", q.device, q.dtype, d, chunk)
    with_dq = chunk <= 2 * math.gcd(_config_in_use.get(key, configs[0])[1], chunk)

    def launch(config):
        bm, bn, warps, stages = config
        bn = math.gcd(bn, chunk)
        _backward_kernel[(hkv * nb, chunk // bn)](
            q, k, v, dout, lse, delta, dq, dk, dv, routes.order, routes.run_start, block_starts,
            *common, dk.stride(0), dk.stride(1), t, routes.heads, routes.slots, nb, routes.subgroups,
            scale, scale * _LOG2E,
            D=d, BM=bm, BN=bn, WITH_DQ=with_dq, num_warps=warps, num_stages=stages,
        )

    _launch(key, configs, launch)
    if with_dq:
        return

    def launch_dq(config):
        bm, bn, warps, stages = config
        counts = routes.run_start[1:] - routes.run_start[:-1]
        tile_ends = torch.cumsum(torch.div(counts + bm - 1, bm, rounding_mode="floor"), 0)
        programs = -(-routes.order.numel() // bm) + routes.num_runs
        bn = math.gcd(bn, chunk)
        _backward_dq_kernel[(programs,)](
            q, *key_descriptors(k, v, bn), dout, lse, delta, dq, routes.order, routes.run_start, tile_ends,
            block_starts, q.stride(0), q.stride(1), dq.stride(0), dq.stride(1),
            routes.num_runs, t, routes.heads, routes.slots, nb, routes.subgroups, scale,
            scale * _LOG2E,
            CHUNK=chunk, D=d, BM=bm, BN=bn, num_warps=warps, num_stages=stages,
        )

    _launch(("backward_dq", q.device, q.dtype, d, chunk), BACKWARD_DQ_CONFIGS, launch_dq)


def place_rows(order: torch.Tensor, rows: torch.Tensor, base: torch.Tensor, per_token: int, token_stride: int,
               offset: int) -> None:
    """``routing.place_rows`` in one pass (reads the sort's int64 rows once, writes the order once)."""
    if rows.numel():
        _place_rows_kernel[(triton.cdiv(rows.numel(), PLACE_ROWS),)](
            order, rows, base, rows.numel(), per_token, token_stride, offset, BR=PLACE_ROWS, num_warps=4
        )


def merge_into(out, lse, h0: int, nh: int, grid_out, grid_lse, slots: int, parts: int = 1,
               window: tuple[int, int] | None = None) -> None:
    """``out [T, Hq, D]`` and ``lse [Hq, T]`` (contiguous) of heads ``[h0, h0 + nh)`` of the row view
    (real head ``h // parts``) and the tokens of ``window`` (all: None) merged in place with the grid
    ``routed_forward`` filled."""
    assert parts == 1 or nh == 1, "a head's parts merge one after the other"
    t, _, d = out.shape
    t0, t1 = window or (0, t)
    assert lse.is_contiguous() and out.stride(2) == 1
    _merge_kernel[(triton.cdiv((t1 - t0) * nh, MERGE_ROWS),)](
        out, lse, grid_out, grid_lse, t, t0, t1 - t0, out.stride(0), out.stride(1), nh, h0, parts, slots, D=d,
        BR=MERGE_ROWS, num_warps=4,
    )


def _to_device(values: list[int], device) -> torch.Tensor:
    """An int64 table on the device, copied without making the host wait for the GPU."""
    table = torch.tensor(values, dtype=torch.int64)
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table


def _offsets_from(parts: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The part lowest in memory, and where each part starts from it, in elements: one kernel then
    reads tensors that the calls allocated one by one, where they lie, without copying them."""
    assert all(p.is_contiguous() and p.dtype == parts[0].dtype for p in parts)
    base = min(parts, key=lambda p: p.data_ptr())
    gaps = [p.data_ptr() - base.data_ptr() for p in parts]
    assert all(g % base.element_size() == 0 for g in gaps)
    return base, _to_device([g // base.element_size() for g in gaps], device)


def row_sources(t: int, nh: int, slots: int, device) -> torch.Tensor:
    """The dq fold's map of one head group: at each (token, head, slot) place, which call output row
    holds that row's dq (filled by ``gather_tile_rows``; -1 where the slot is unused)."""
    return torch.full((t * nh * slots,), -1, dtype=torch.int64, device=device)


def gather_tile_rows(dout, q, out, lse, routes, piece, grp, sources, index: int):
    """The rows of call ``piece`` (the ``index``-th of head group ``grp``), padded as it is, in one
    pass: of ``dout, q, out`` (``[T, heads, D]``, same strides) and of ``lse [heads, T]``; padding rows
    repeat their tile's last row with a zero dO. Records where each real row's dq will be in
    ``sources``. Returns ``(dout_rows, q_rows, out_rows, lse_rows)``."""
    assert dout.stride() == q.stride() == out.stride() and lse.is_contiguous()
    assert piece.width is not None, "the Triton tile backward takes padded tiles"
    n, (t, _, d) = piece.width * piece.num_tiles, q.shape
    assert n < 1 << 40
    dout_rows, q_rows, out_rows = (x.new_empty(n, d) for x in (dout, q, out))
    lse_rows = lse.new_empty(n)
    br = min(GATHER_ROWS, piece.width & -piece.width)  # a power of two dividing the width
    _gather_kernel[(n // br,)](
        q, dout, out, lse, q_rows, dout_rows, out_rows, lse_rows, sources, routes.order, piece.tile_row0,
        piece.tile_rows, piece.width, t, q.stride(0), q.stride(1), routes.heads, routes.parts, routes.slots, grp.h0,
        grp.h1 - grp.h0, index << 40, D=d, BR=br, num_warps=4,
    )
    return dout_rows, q_rows, out_rows, lse_rows


def gather_key_tiles(k, v, tile_block, block_starts, chunk: int):
    """K and V tiles ``[tiles, C, D]`` of a call, straight from ``k, v [Tk, Hkv, D]``: tile i holds block
    ``tile_block[i] % nb`` of kv head ``tile_block[i] // nb``, in one pass (indexing a block-major copy
    would read and write every tile twice)."""
    (tk, _, d), tiles = k.shape, tile_block.numel()
    assert k.stride(2) == v.stride(2) == 1
    k_tiles, v_tiles = (x.new_empty(tiles, chunk, d) for x in (k, v))
    bk = math.gcd(64, chunk)
    if tiles:
        _gather_key_tiles_kernel[(tiles, chunk // bk)](
            k, v, k_tiles, v_tiles, tile_block, block_starts, block_starts.numel(), tk, k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), CHUNK=chunk, D=d, BK=bk, num_warps=4,
        )
    return k_tiles, v_tiles


def fold_rows(dst: torch.Tensor, sources: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """``dst [T, n, D] +=`` the sum over slots of the call output rows ``sources [T * n * S]`` names
    (``piece << 40 | row`` of ``parts[piece] [rows, D]``), in fp32, rounded once into dst's dtype.

    cuDNN allocates each call's dq; the fold reads every part where it lies (offsets from the part
    lowest in memory) rather than copying the rows into a grid first, which would store every row
    and zero-fill the grid once more."""
    t, n, d = dst.shape
    if t * n == 0 or not parts:
        return
    assert dst.stride(2) == 1
    base, offsets = _offsets_from(parts, dst.device)
    _fold_rows_kernel[(triton.cdiv(t * n, FOLD_ROWS),)](
        dst, sources, base, offsets, t * n, n, sources.numel() // (t * n), dst.stride(0), dst.stride(1),
        D=d, BR=FOLD_ROWS, num_warps=4,
    )


def fold_key_tiles(dk, dv, kv0: int, parts, piece_blocks, block_starts, chunk: int) -> None:
    """``dk, dv [Tk, nkv, D]`` (token-major, kv heads from ``kv0``; any float dtype) += the key
    gradients of every tile of a head group's calls: ``parts[i] = (dk_tiles, dv_tiles) [tiles, C, D]``
    of call i, whose tile j holds key block ``piece_blocks[i][j] = kvh * nb + b``. Each key's tiles are
    summed in fp32 and added once: no fp32 atomics into accumulators, and no accumulators to zero-fill
    and fold afterwards."""
    d = dk.shape[-1]
    assert dk.stride() == dv.stride() and dk.stride(2) == 1
    codes = sorted((block, i << 40 | j) for i, blocks in enumerate(piece_blocks) for j, block in enumerate(blocks))
    if not codes:
        return
    blocks, bounds = [], []
    for x, (block, _) in enumerate(codes):
        if not blocks or blocks[-1] != block:
            blocks.append(block)
            bounds.append(x)
    bounds.append(len(codes))
    flat = [x for pair in parts for x in pair]
    base, offsets = _offsets_from(flat, dk.device)
    table = _to_device([code for _, code in codes] + bounds + blocks, dk.device)
    n, m = len(codes), len(blocks)
    bk = math.gcd(FOLD_KEYS, chunk)
    _fold_key_tiles_kernel[(m, chunk // bk)](
        dk, dv, base, offsets, table[:n], table[n : n + m + 1], table[n + m + 1 :], block_starts,
        block_starts.numel(), kv0, dk.stride(0), dk.stride(1), CHUNK=chunk, D=d, BK=bk, num_warps=4,
    )


def fold_into(dst: torch.Tensor, parts: torch.Tensor) -> None:
    """``dst += parts.sum(2)`` in fp32, rounded once into dst's dtype, for ``dst [T, n, D]`` (a slice of
    heads, so strided) and contiguous ``parts [T, n, S, D]`` of any float dtype, in one pass (PyTorch's
    strided mixed-dtype add makes several)."""
    t, n, d = dst.shape
    assert parts.shape[:2] == dst.shape[:2] and parts.is_contiguous() and dst.stride(2) == 1
    if t * n:
        _fold_kernel[(triton.cdiv(t * n, FOLD_ROWS),)](
            dst, parts, t * n, n, parts.shape[2], dst.stride(0), dst.stride(1), D=d, BR=FOLD_ROWS, num_warps=4
        )
