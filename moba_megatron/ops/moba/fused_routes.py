"""MoBA's routed forward in Triton: the queries that chose a block attend it straight out of q, k, v,
and the partial results are merged with the own-block ones in one pass; and the backward's
per-call row gathers as one kernel.

The tiles path (routing.py + a varlen backend) copies every selected query row into tile order,
runs the kernel and scatters the partial results back into the merge grid. These kernels read each
query row through the head group's sorted row order (``routing.plan_groups``) and write its partial
output and LSE at the row's own place in the grid, so nothing is copied outside them.

Rows sorted by (head, block) form one *run* per (query head, block): the queries of that head that
chose that block. A program takes up to ``BM`` rows of one run against the block's keys. Tile tables
are built on the device from the per-run counts, so nothing waits for the host.

Only the forward is fused (the backward's tiles are gathered by ``gather_rows`` in one launch per
call instead of eight): a Triton backward (dK/dV per block over its run, dq per row tile) was
measured at 1.3x (block 2048 / top-k 3) and 1.9x (4096 / 12) the time of the cuDNN tiles' backward
including their copies, on an H100 (benchmarks/RESULTS.md), so the backward stays on the tiles.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634

# (rows per tile, keys per step, warps, pipeline stages), tried in order: the first was the fastest
# on an H100 at block 2048 / top-k 3 and 4096 / 12 (benchmarks/tune_fused_routes.py); the second
# needs less shared memory, for GPUs that cannot hold the first.
FORWARD_CONFIGS = [(128, 128, 8, 3), (64, 64, 4, 2)]
MERGE_ROWS = 32
GATHER_ROWS = 64
_config_in_use: dict[tuple, tuple] = {}


def supports(q: torch.Tensor, chunk: int) -> bool:
    """A head dim Triton tiles natively and whole 16-key steps. (Device and dtype are the backend's
    business: only CUDA half-precision backends route here.)"""
    d = q.shape[-1]
    return chunk % 16 == 0 and 16 <= d <= 128 and d & (d - 1) == 0


@triton.jit
def _forward_kernel(Q, K, V, O, L, order, tile_run, tile_row0, tile_rows, block_start,
                    stride_qt, stride_qh, stride_kt, stride_kh, nh, h0, group, slots, nb, scale_log2,
                    CHUNK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    tile = tl.program_id(0)
    count = tl.load(tile_rows + tile)
    if count > 0:
        run = tl.load(tile_run + tile)
        offs = tl.arange(0, BM)
        mask = offs < count
        rid = tl.load(order + tl.load(tile_row0 + tile) + offs, mask=mask, other=0)  # grid row: (t, head, slot)
        t = rid // slots // nh
        h = h0 + run // nb
        d = tl.arange(0, D)
        q = tl.load(Q + t[:, None] * stride_qt + h * stride_qh + d[None, :], mask=mask[:, None], other=0.0)
        kv_base = (h // group) * stride_kh + d[None, :]
        key0 = tl.load(block_start + run % nb)
        m = tl.full([BM], float("-inf"), tl.float32)
        l = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        for n0 in range(0, CHUNK, BN):
            keys = (key0 + n0 + tl.arange(0, BN))[:, None] * stride_kt + kv_base
            k = tl.load(K + keys)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(V + keys)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        tl.store(O + rid[:, None] * D + d[None, :], (acc / l[:, None]).to(O.dtype.element_ty), mask=mask[:, None])
        tl.store(L + rid, (m + tl.log2(l)) / 1.4426950408889634, mask=mask)


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
        g = tl.load(GO + row[:, None] * D + d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + w[:, None] * g
        l = l * alpha + w
        m = m_new
    tl.store(out_ptr, (acc / l[:, None]).to(OUT.dtype.element_ty), mask=mask[:, None])
    tl.store(LSE + h * T + t, m + tl.log(l), mask=mask)


@triton.jit
def _gather_kernel(Q, DO, O, LSE, QR, DOR, OR, LR, order, sorted_rows, valid, n, T, stride_t, stride_h, nh, h0, slots,
                   HAS_VALID: tl.constexpr, D: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    mask = rows < n
    rid = tl.load(order + tl.load(sorted_rows + rows, mask=mask, other=0), mask=mask, other=0)
    cell = rid // slots
    t = cell // nh
    h = h0 + cell % nh
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


def _tiles(run_counts: torch.Tensor, rows: int, block_m: int):
    """Per tile of at most ``block_m`` rows of one run: (run, first sorted row, rows), int32, sized
    for the most tiles ``rows`` rows could need (tiles past the last have 0 rows)."""
    runs = run_counts.numel()
    run_start = run_counts.cumsum(0) - run_counts
    per_run = (run_counts + block_m - 1) // block_m
    ends = per_run.cumsum(0)
    index = torch.arange(-(-rows // block_m) + runs, device=run_counts.device)
    run = torch.searchsorted(ends, index, right=True)
    safe = run.clamp(max=runs - 1)
    row0 = run_start[safe] + (index - (ends[safe] - per_run[safe])) * block_m
    count = torch.where(run < runs, torch.clamp(run_start[safe] + run_counts[safe] - row0, max=block_m), 0)
    return tuple(x.to(torch.int32) for x in (safe, row0, count))


def routed_forward(q, k, v, order, run_counts, h0: int, nh: int, block_starts, chunk: int, slots: int, scale: float):
    """Partial output and LSE of every selected row of query heads ``[h0, h0 + nh)``, in merge-grid
    layout: ``[T * nh * slots + 1, D]`` and ``[T * nh * slots + 1]`` fp32 (-inf where a slot is
    unused; the last row is spare). ``order`` holds the grid rows sorted by (head, block), the
    selected ones first; ``run_counts [nh * blocks]`` (device) how many rows each run has."""
    t, hq, d = q.shape
    out = q.new_zeros(t * nh * slots + 1, d)
    lse = torch.full((out.shape[0],), float("-inf"), dtype=torch.float32, device=q.device)
    if order.numel() == 0:
        return out, lse
    args = (q, k, v, out, lse, order)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    scalars = (nh, h0, hq // k.shape[1], slots, block_starts.numel(), scale * _LOG2E)
    key = (q.device, q.dtype, d, chunk)
    for config in [_config_in_use[key]] if key in _config_in_use else FORWARD_CONFIGS:
        bm, bn, warps, stages = config
        tile_run, tile_row0, tile_rows = _tiles(run_counts, order.numel(), bm)
        try:
            _forward_kernel[(tile_run.numel(),)](
                *args, tile_run, tile_row0, tile_rows, block_starts, *strides, *scalars,
                CHUNK=chunk, D=d, BM=bm, BN=math.gcd(bn, chunk), num_warps=warps, num_stages=stages,
            )
        except triton.runtime.errors.OutOfResources:
            if config == FORWARD_CONFIGS[-1]:
                raise
            continue
        _config_in_use[key] = config
        break
    return out, lse


def merge_into(out, lse, h0: int, nh: int, grid_out, grid_lse, slots: int) -> None:
    """``out [T, Hq, D]`` and ``lse [Hq, T]`` (contiguous) of heads ``[h0, h0 + nh)`` merged in place
    with the grid ``routed_forward`` filled."""
    t, _, d = out.shape
    assert lse.is_contiguous() and out.stride(2) == 1
    _merge_kernel[(triton.cdiv(t * nh, MERGE_ROWS),)](
        out, lse, grid_out, grid_lse, t, out.stride(0), out.stride(1), nh, h0, slots, D=d, BR=MERGE_ROWS, num_warps=4,
    )


def gather_rows(dout, q, out, lse, order, sorted_rows, valid, h0: int, nh: int, slots: int):
    """The backward's kernel rows in one pass: rows ``order[sorted_rows]`` of ``dout, q, out``
    (``[T, Hq, D]``, same strides) and of ``lse [Hq, T]``; ``dout`` rows are zero where ``valid`` is
    False (padding). Returns ``(dout_rows, q_rows, out_rows, lse_rows)``."""
    assert dout.stride() == q.stride() == out.stride() and lse.is_contiguous()
    n, (t, _, d) = sorted_rows.numel(), q.shape
    dout_rows, q_rows, out_rows = (x.new_empty(n, d) for x in (dout, q, out))
    lse_rows = lse.new_empty(n)
    has_valid = valid is not None
    _gather_kernel[(triton.cdiv(n, GATHER_ROWS),)](
        q, dout, out, lse, q_rows, dout_rows, out_rows, lse_rows, order, sorted_rows,
        valid.view(torch.uint8) if has_valid else sorted_rows, n, t, q.stride(0), q.stride(1), nh, h0, slots,
        HAS_VALID=has_valid, D=d, BR=GATHER_ROWS, num_warps=4,
    )
    return dout_rows, q_rows, out_rows, lse_rows
