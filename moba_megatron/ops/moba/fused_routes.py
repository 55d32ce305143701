"""MoBA's routed attention in Triton: the rows that chose a block attend it straight out of q, k, v
(forward and backward), the partial results are merged with the own-block ones in one pass, and,
for the backends whose backward runs on tiles, the tiles' rows are gathered in one launch and their
gradients put back in one launch each (dq rows stored at their places in a per-slot grid, dK/dV
tiles added into fp32 accumulators), then summed into the gradients in one pass. K and V reach the
kernels that stream over a block's keys through TMA descriptors.

Rows come sorted into *runs* (``routing.Routes``): the rows of one run attend one key block of one
kv head. A row id ``r`` names its cell and slot, ``cell = r // slots`` with ``cell = t * heads + h``
(token t, head h of the row view). Nothing here waits for the host: run bounds live on the device,
and a forward program finds its run by binary search over the runs' tile counts.

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

# (rows per tile, keys per step, warps, pipeline stages), tried in order: the first was the fastest
# on an H100 at block 2048 / top-k 3 and 4096 / 12 (benchmarks/tune_fused_routes.py); the second
# needs less shared memory, for GPUs that cannot hold the first.
FORWARD_CONFIGS = [(128, 128, 8, 3), (64, 64, 4, 2)]
# Head dims of at most 64: half the keys a step and half the warps, 1.19 against 1.40 ms for the
# routed forward at 32K / 2048 / 3, 12 heads of 64 (H200; the whole op 7.10 against 7.32 ms).
FORWARD_CONFIGS_HEAD_DIM_64 = [(128, 64, 4, 3), (64, 64, 4, 2)]
# (rows per step, keys per program, warps, pipeline stages) of the backward's dK/dV kernel, and
# (rows per program, keys per step, warps, stages) of its dq kernel, tried in order.
# Blocks of at most 256 keys (``_SMALL_BLOCKS``) take other dK/dV tiles than larger ones (H200, block
# 128 / top-k 8 and 512 / 3; benchmarks/tune_fused_routes.py).
BACKWARD_CONFIGS = [(64, 64, 4, 2), (32, 32, 4, 1)]
BACKWARD_CONFIGS_SMALL_BLOCKS = [(32, 128, 8, 2), (32, 64, 4, 1)]
_SMALL_BLOCKS = 256
# Head dims of at most 64 fit twice the rows a step: 7.37 against 10.03 ms for the whole op at
# 32K / 2048 / 3, 12 heads of 64 (H200); at 128 the larger tile is slower (5.93 against 4.77 ms
# at 32K / 512 / 3).
BACKWARD_CONFIGS_HEAD_DIM_64 = [(128, 64, 4, 2), (64, 64, 4, 2), (32, 32, 4, 1)]
BACKWARD_DQ_CONFIGS = [(64, 64, 4, 2), (32, 32, 4, 1)]
MERGE_ROWS = 32
GATHER_ROWS = 64
FOLD_ROWS = 32
_config_in_use: dict[tuple, tuple] = {}


def supports(q: torch.Tensor, chunk: int) -> bool:
    """A head dim Triton tiles natively and whole 16-key steps. (Device and dtype are the backend's
    business: only CUDA half-precision backends route here.)"""
    d = q.shape[-1]
    return chunk % 16 == 0 and 16 <= d <= 128 and d & (d - 1) == 0


@triton.jit
def _row_place(rid, slots, heads):
    cell = rid // slots
    return cell // heads, cell % heads, rid % slots


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
def _tile_of_run(tile_ends, run_start, order, r, run, p, BM: tl.constexpr):
    """Program ``p``'s rows: a tile of run ``run``, the ``r``-th run of ``tile_ends``. Returns the
    rows' ids and which of the ``BM`` places hold one."""
    before = tl.load(tile_ends + r - 1, mask=r > 0, other=0)
    row0 = tl.load(run_start + run) + (p - before) * BM
    offs = tl.arange(0, BM)
    mask = row0 + offs < tl.load(run_start + run + 1)
    return tl.load(order + row0 + offs, mask=mask, other=0), mask


@triton.jit
def _forward_kernel(Q, K_DESC, V_DESC, O, L, order, run_start, tile_ends, block_start,
                    stride_qt, stride_qh, run0, nruns, heads, h0, nh, slots, nb, per_kv,
                    scale_log2, CHUNK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    p = tl.program_id(0)
    r = _find_run(tile_ends, nruns, p)
    if r < nruns:
        run = run0 + r
        rid, mask = _tile_of_run(tile_ends, run_start, order, r, run, p, BM)
        t, h, s = _row_place(rid, slots, heads)
        d = tl.arange(0, D)
        q = tl.load(Q + t[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :], mask=mask[:, None], other=0.0)
        col = (run // per_kv) * D  # the kv head's columns of K, V viewed as [Tk, Hkv * D]
        key0 = tl.load(block_start + run % nb).to(tl.int32)
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
        g = (t * nh + h - h0) * slots + s  # the row's place in the head group's merge grid
        tl.store(O + g[:, None] * D + d[None, :], (acc / l[:, None]).to(O.dtype.element_ty), mask=mask[:, None])
        tl.store(L + g, (m + tl.log2(l)) / 1.4426950408889634, mask=mask)


@triton.jit
def _backward_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, order, run_start, block_start,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_dqt, stride_dqh, stride_dkt, stride_dkh,
                     num_tokens, heads, slots, nb, subgroups, scale, scale_log2,
                     D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, WITH_DQ: tl.constexpr):
    """dK and dV of ``BN`` keys of one block of one kv head, over every row that chose the block;
    with ``WITH_DQ`` also the rows' dq against these keys (added with atomics)."""
    kvh = tl.program_id(0) // nb
    block = tl.program_id(0) % nb
    first_run = kvh * subgroups * nb + block
    rows = tl.full([], 0, tl.int64)
    for sub in range(subgroups):
        run = first_run + sub * nb
        rows += tl.load(run_start + run + 1) - tl.load(run_start + run)
    if rows > 0:  # blocks nobody chose (partial last blocks among them) are left alone
        d = tl.arange(0, D)
        keys = tl.load(block_start + block) + tl.program_id(1) * BN + tl.arange(0, BN)
        k = tl.load(K + keys[:, None] * stride_kt + kvh * stride_kh + d[None, :])
        v = tl.load(V + keys[:, None] * stride_kt + kvh * stride_kh + d[None, :])
        dk = tl.zeros([BN, D], tl.float32)
        dv = tl.zeros([BN, D], tl.float32)
        offs = tl.arange(0, BM)
        for sub in range(subgroups):
            run = first_run + sub * nb
            end = tl.load(run_start + run + 1)
            for row0 in range(tl.load(run_start + run), end, BM):
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
                        nruns, num_tokens, heads, slots, nb, per_kv, scale, scale_log2,
                        CHUNK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """dq of a tile of up to ``BM`` rows of one run against its whole block (the backward of
    blocks too large for one program's keys): one atomic add per row element."""
    p = tl.program_id(0)
    run = _find_run(tile_ends, nruns, p)
    if run < nruns:
        rid, mask = _tile_of_run(tile_ends, run_start, order, run, run, p, BM)
        t, h, _ = _row_place(rid, slots, heads)
        d = tl.arange(0, D)
        src = t[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :]
        q = tl.load(Q + src, mask=mask[:, None], other=0.0)
        do = tl.load(DO + src, mask=mask[:, None], other=0.0)
        lse = tl.load(LSE + h * num_tokens + t, mask=mask, other=0.0)
        delta = tl.load(DELTA + h * num_tokens + t, mask=mask, other=0.0)
        col = (run // per_kv) * D
        key0 = tl.load(block_start + run % nb).to(tl.int32)
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
def _merge_kernel(OUT, LSE, GO, GL, T, stride_ot, stride_oh, nh, h0, slots,
                  D: tl.constexpr, BR: tl.constexpr):
    """In place: each (token, head) cell's own-block out/LSE merged with its slots' partials.
    Offsets are int64: a grid of all heads (context parallelism's routed exchange) passes 2^31."""
    cells = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    mask = cells < T * nh
    t = cells // nh
    h = h0 + cells % nh
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
def _gather_kernel(Q, DO, O, LSE, QR, DOR, OR, LR, order, sorted_rows, valid, n, T, stride_t, stride_h, heads, slots,
                   HAS_VALID: tl.constexpr, D: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    mask = rows < n
    rid = tl.load(order + tl.load(sorted_rows + rows, mask=mask, other=0), mask=mask, other=0)
    t, h, _ = _row_place(rid, slots, heads)
    d = tl.arange(0, D)
    src = t[:, None] * stride_t + h[:, None] * stride_h + d[None, :]
    dst = rows[:, None] * D + d[None, :]
    m2 = mask[:, None]
    tl.store(QR + dst, tl.load(Q + src, mask=m2), mask=m2)
    tl.store(OR + dst, tl.load(O + src, mask=m2), mask=m2)
    do = tl.load(DO + src, mask=m2, other=0.0)
    if HAS_VALID:
        do = tl.where(tl.load(valid + rows, mask=mask, other=0)[:, None] != 0, do, 0.0)
    tl.store(DOR + dst, do, mask=m2)
    tl.store(LR + rows, tl.load(LSE + h * T + t, mask=mask), mask=mask)


@triton.jit
def _put_rows_kernel(GRID, ROWS, order, sorted_rows, valid, n, h0, nh, heads, slots,
                     HAS_VALID: tl.constexpr, D: tl.constexpr, BR: tl.constexpr):
    """``GRID[(t * nh + h - h0) * slots + s] = ROWS[i]`` for kernel row i, whose row id
    ``order[sorted_rows[i]]`` is slot s of cell (t, h): each row has a place of its own, so no atomics."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    mask = rows < n
    if HAS_VALID:
        mask &= tl.load(valid + rows, mask=mask, other=0) != 0
    rid = tl.load(order + tl.load(sorted_rows + rows, mask=mask, other=0), mask=mask, other=0)
    t, h, s = _row_place(rid, slots, heads)
    d = tl.arange(0, D)
    g = (t * nh + h - h0) * slots + s
    x = tl.load(ROWS + rows[:, None] * D + d[None, :], mask=mask[:, None])
    tl.store(GRID + g[:, None] * D + d[None, :], x, mask=mask[:, None])


@triton.jit
def _add_key_tiles_kernel(ACC_K, ACC_V, TK, TV, tile_block, block_start, kv0, nb, stride_at, stride_ah,
                          CHUNK: tl.constexpr, D: tl.constexpr, BK: tl.constexpr):
    """``ACC[block_start[b] + j, kvh - kv0] += T[i, j]`` in fp32 for key j of tile i, whose keys are
    block b of kv head kvh (``tile_block[i] = kvh * nb + b``)."""
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BK + tl.arange(0, BK)
    kb = tl.load(tile_block + i)
    dst = ((tl.load(block_start + kb % nb) + j) * stride_at + (kb // nb - kv0) * stride_ah)[:, None] + tl.arange(0, D)[None, :]
    src = (i * CHUNK + j)[:, None] * D + tl.arange(0, D)[None, :]
    tl.atomic_add(ACC_K + dst, tl.load(TK + src).to(tl.float32), sem="relaxed")
    tl.atomic_add(ACC_V + dst, tl.load(TV + src).to(tl.float32), sem="relaxed")


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
    ``[Tk, Hkv * D]``: Hopper's copy engine then streams the key blocks (42.3 against 47.2 ms for the
    routed forward at 128K / 4096 / 12 on an H200, 174 against 193 with 32 heads over 8). The copy
    engine wants 16-byte aligned bases."""
    descs = []
    for x in (k, v):
        if not (x.is_contiguous() and x.data_ptr() % 16 == 0):
            x = x.clone(memory_format=torch.contiguous_format)
        descs.append(TensorDescriptor.from_tensor(x.view(x.shape[0], -1), [bn, x.shape[-1]]))
    return descs


def routed_forward(q, k, v, routes, grp, block_starts, chunk: int, scale: float):
    """Partial output and LSE of every row of head group ``grp`` (``routing.HeadGroup``), in merge-grid
    layout: ``[T * nh * slots + 1, D]`` and ``[T * nh * slots + 1]`` fp32 (the last row is spare).
    Where a slot is unused its LSE is -inf and its output row uninitialised. ``q [T, heads, D]`` is
    the rows' view (``routes.heads``)."""
    t, _, d = q.shape
    nh, slots = grp.h1 - grp.h0, routes.slots
    out = q.new_empty(t * nh * slots + 1, d)  # only the rows' places are written: read them by LSE
    lse = torch.full((out.shape[0],), float("-inf"), dtype=torch.float32, device=q.device)
    nruns = grp.run1 - grp.run0
    if nruns == 0 or routes.order.numel() == 0:
        return out, lse
    counts = routes.run_start[grp.run0 + 1 : grp.run1 + 1] - routes.run_start[grp.run0 : grp.run1]
    scalars = (grp.run0, nruns, routes.heads, grp.h0, nh, slots, routes.num_blocks, routes.subgroups * routes.num_blocks,
               scale * _LOG2E)

    def launch(config):
        bm, bn, warps, stages = config
        bn = math.gcd(bn, chunk)
        tile_ends = torch.cumsum(torch.div(counts + bm - 1, bm, rounding_mode="floor"), 0)
        programs = -(-t * nh * slots // bm) + nruns  # at least the tiles there are; the rest exit at once
        _forward_kernel[(programs,)](
            q, *key_descriptors(k, v, bn), out, lse, routes.order, routes.run_start, tile_ends, block_starts,
            q.stride(0), q.stride(1), *scalars,
            CHUNK=chunk, D=d, BM=bm, BN=bn, num_warps=warps, num_stages=stages,
        )

    configs = FORWARD_CONFIGS_HEAD_DIM_64 if d <= 64 else FORWARD_CONFIGS
    _launch(("forward", q.device, q.dtype, d, chunk), configs, launch)
    return out, lse


def routed_backward(dout, q, k, v, out, lse, routes, block_starts, chunk: int, scale: float, dq, dk, dv) -> None:
    """Adds every routed row's gradients in place: dq into ``dq`` (fp32, shaped like q) and dK, dV
    into ``dk, dv`` (any dtype, shaped like k). ``dout, q, out [T, heads, D]`` share strides and
    ``lse [heads, T]`` is the merged LSE the rows' probabilities are taken against.

    Blocks of at most two programs' keys get their dq in the dK/dV kernel (at most two atomic adds
    per row element); larger blocks in a second kernel per tile of rows, so the atomics do not grow
    with the block."""
    t, heads, d = q.shape
    assert dout.stride() == q.stride() and dq.dtype == torch.float32 and dk.stride() == dv.stride()
    if routes.order.numel() == 0 or t == 0:
        return
    delta = torch.empty(heads, t, dtype=torch.float32, device=q.device)
    _row_dot_kernel[(triton.cdiv(t * heads, 32),)](
        dout, out, delta, t * heads, heads, t, out.stride(0), out.stride(1), D=d, BR=32, num_warps=4
    )
    hkv, nb = k.shape[1], routes.num_blocks
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), dq.stride(0), dq.stride(1))
    configs = (BACKWARD_CONFIGS_SMALL_BLOCKS if chunk <= _SMALL_BLOCKS
               else BACKWARD_CONFIGS_HEAD_DIM_64 if d <= 64 else BACKWARD_CONFIGS)
    key = ("backward", q.device, q.dtype, d, chunk)
    with_dq = chunk <= 2 * math.gcd(_config_in_use.get(key, configs[0])[1], chunk)

    def launch(config):
        bm, bn, warps, stages = config
        bn = math.gcd(bn, chunk)
        _backward_kernel[(hkv * nb, chunk // bn)](
            q, k, v, dout, lse, delta, dq, dk, dv, routes.order, routes.run_start, block_starts,
            *common, dk.stride(0), dk.stride(1), t, heads, routes.slots, nb, routes.subgroups, scale, scale * _LOG2E,
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
            routes.num_runs, t, heads, routes.slots, nb, routes.subgroups * nb, scale, scale * _LOG2E,
            CHUNK=chunk, D=d, BM=bm, BN=bn, num_warps=warps, num_stages=stages,
        )

    _launch(("backward_dq", q.device, q.dtype, d, chunk), BACKWARD_DQ_CONFIGS, launch_dq)


def merge_into(out, lse, h0: int, nh: int, grid_out, grid_lse, slots: int) -> None:
    """``out [T, Hq, D]`` and ``lse [Hq, T]`` (contiguous) of heads ``[h0, h0 + nh)`` merged in place
    with the grid ``routed_forward`` filled."""
    t, _, d = out.shape
    assert lse.is_contiguous() and out.stride(2) == 1
    _merge_kernel[(triton.cdiv(t * nh, MERGE_ROWS),)](
        out, lse, grid_out, grid_lse, t, out.stride(0), out.stride(1), nh, h0, slots, D=d, BR=MERGE_ROWS, num_warps=4,
    )


def gather_rows(dout, q, out, lse, routes, sorted_rows, valid):
    """The tile backward's rows in one pass: rows ``routes.order[sorted_rows]`` of ``dout, q, out``
    (``[T, heads, D]``, same strides) and of ``lse [heads, T]``; ``dout`` rows are zero where
    ``valid`` is False (padding). Returns ``(dout_rows, q_rows, out_rows, lse_rows)``."""
    assert dout.stride() == q.stride() == out.stride() and lse.is_contiguous()
    n, (t, _, d) = sorted_rows.numel(), q.shape
    dout_rows, q_rows, out_rows = (x.new_empty(n, d) for x in (dout, q, out))
    lse_rows = lse.new_empty(n)
    has_valid = valid is not None
    _gather_kernel[(triton.cdiv(n, GATHER_ROWS),)](
        q, dout, out, lse, q_rows, dout_rows, out_rows, lse_rows, routes.order, sorted_rows,
        valid.view(torch.uint8) if has_valid else sorted_rows, n, t, q.stride(0), q.stride(1), routes.heads,
        routes.slots, HAS_VALID=has_valid, D=d, BR=GATHER_ROWS, num_warps=4,
    )
    return dout_rows, q_rows, out_rows, lse_rows


def put_grid_rows(grid, rows, routes, sorted_rows, valid, h0: int, nh: int) -> None:
    """Each kernel row of ``rows [n, D]`` stored at its (token, head, slot) place of the grid ``[T * nh *
    slots (+ 1), D]`` of heads ``[h0, h0 + nh)`` (row id ``routes.order[sorted_rows[i]]``), except where
    ``valid`` is False (padding)."""
    n, d = rows.shape
    if n == 0:
        return
    rows = rows.contiguous()
    has_valid = valid is not None
    _put_rows_kernel[(triton.cdiv(n, GATHER_ROWS),)](
        grid, rows, routes.order, sorted_rows, valid.view(torch.uint8) if has_valid else sorted_rows, n,
        h0, nh, routes.heads, routes.slots, HAS_VALID=has_valid, D=d, BR=GATHER_ROWS, num_warps=4,
    )


def add_key_tiles(acc_k, acc_v, dk_tiles, dv_tiles, tile_block, block_starts, kv0: int, num_blocks: int) -> None:
    """``acc_k, acc_v [Tk, nkv, D]`` (fp32, token-major, kv heads from ``kv0``) += the tiles' key gradients
    ``[tiles, C, D]``; tile i holds block ``tile_block[i] % num_blocks`` of kv head ``tile_block[i] // num_blocks``."""
    tiles, chunk, d = dk_tiles.shape
    if tiles == 0:
        return
    assert acc_k.stride() == acc_v.stride()
    dk_tiles, dv_tiles = dk_tiles.contiguous(), dv_tiles.contiguous()
    bk = math.gcd(64, chunk)
    _add_key_tiles_kernel[(tiles, chunk // bk)](
        acc_k, acc_v, dk_tiles, dv_tiles, tile_block, block_starts, kv0, num_blocks, acc_k.stride(0), acc_k.stride(1),
        CHUNK=chunk, D=d, BK=bk, num_warps=4,
    )


def fold_into(dst: torch.Tensor, parts: torch.Tensor) -> None:
    """``dst += parts.sum(2)`` in fp32, rounded once into dst's dtype, for ``dst [T, n, D]`` (a slice of
    heads, so strided) and contiguous ``parts [T, n, S, D]`` of any float dtype, in one pass (PyTorch's
    strided mixed-dtype add of one fp32 head took 96 against 36 us at 128K, H200)."""
    t, n, d = dst.shape
    assert parts.shape[:2] == dst.shape[:2] and parts.is_contiguous() and dst.stride(2) == 1
    if t * n:
        _fold_kernel[(triton.cdiv(t * n, FOLD_ROWS),)](
            dst, parts, t * n, n, parts.shape[2], dst.stride(0), dst.stride(1), D=d, BR=FOLD_ROWS, num_warps=4
        )
