"""Attention of loose query rows against key blocks: the rows context parallelism's routed exchange
brings to the rank that owns their blocks.

Each row is one query vector with the key block it selected (``kv_head * blocks + block`` of a
``routed.KeyBlocks``). ``plan_rows`` sorts them by that key and packs them into kernel calls as the
single-device routing does; ``rows_forward`` returns each row's partial output and LSE in the input
order, and ``rows_backward`` differentiates them against the merged output and LSE (K and V
gradients summed into fp32 block-major accumulators).

With ``fused`` (CUDA backends, see ``routed.fused_kernels_apply``) the rows go through
fused_routes.py's kernels as a head group of one head and one slot: row i is grid cell i, and the
row's kv head comes from its run (q is viewed with a zero head stride, so every head reads row i).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .routing import Piece, pack_tiles


@dataclass(frozen=True)
class RowPlan:
    num_rows: int
    order: torch.Tensor  # [rows] int64: input row of each sorted row
    run_counts: torch.Tensor  # [kv heads * blocks] rows per key, on the device
    pieces: list[Piece]


def plan_rows(keys: torch.Tensor, num_keys: int, tile_width: int | None, chunk: int, head_dim: int) -> RowPlan:
    """Reads the per-block row counts on the host once (kernel shapes depend on them)."""
    run_counts = torch.bincount(keys, minlength=num_keys)
    order = torch.sort(keys, stable=True).indices
    runs = ((n, block) for block, n in enumerate(run_counts.tolist()) if n)
    return RowPlan(keys.numel(), order, run_counts, pack_tiles(runs, tile_width, chunk, head_dim, keys.device))


def put_rows(dst: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``dst[index] = rows`` for whole rows, moved as the widest element type that tiles a row:
    index_put works element by element, so 16-byte elements make it ~8x less work than bf16."""
    width = dst.shape[-1] * dst.element_size()
    for wide in (torch.complex128, torch.int64, torch.int32):
        if width % wide.itemsize == 0:
            dst.view(wide)[index] = rows.view(wide)
            return
    dst[index] = rows


def rows_forward(backend, plan: RowPlan, q, keys, scale: float, fused: bool):
    """Rows ``q [n, D]`` -> partial ``out [n, D]`` and ``lse [n]`` fp32 of each row over its block."""
    n, d = plan.num_rows, q.shape[-1]
    if fused:
        from .fused_routes import routed_forward

        hkv = keys.k.shape[1]
        out, lse = routed_forward(
            q[:, None].expand(n, hkv, d), keys.k, keys.v, plan.order, plan.run_counts, 0, 1,
            keys.layout.block_starts_dev, keys.layout.chunk, 1, scale,
        )
        return out[:n], lse[:n]
    kb, vb = keys.block_major
    out = q.new_zeros(n + 1, d)
    lse = torch.full((n + 1,), float("-inf"), dtype=torch.float32, device=q.device)
    for piece in plan.pieces:
        slots, _, dst = piece.destinations(plan.order, plan.num_rows)
        o, l = backend.tiles_forward(
            q[plan.order[slots]], kb[piece.tile_block], vb[piece.tile_block], piece.tile_rows, piece.width, piece.max_rows, scale
        )
        put_rows(out, dst, o)
        lse[dst] = l
    return out[:n], lse[:n]


def rows_backward(backend, plan: RowPlan, dout, q, out, lse, keys, scale: float, fused: bool, dk, dv):
    """The rows' ``dq [n, D]``; K and V gradients are added into ``dk, dv`` (fp32, block-major like
    ``keys.block_major``). Each row's probabilities are taken against its *merged* output and LSE.
    Rows are those of ``dout, q, out`` (``[n, D]``) and ``lse`` (``[n]``)."""
    n, d = plan.num_rows, q.shape[-1]
    kb, vb = keys.block_major
    dq = q.new_zeros(n + 1, d)
    if fused:
        from .fused_routes import gather_rows
    for piece in plan.pieces:
        slots, valid, dst = piece.destinations(plan.order, plan.num_rows)
        if fused:  # padding rows get a zero dO: they must carry no gradient into dK/dV
            dout_p, q_p, out_p, lse_p = gather_rows(
                dout[:, None], q[:, None], out[:, None], lse[None], plan.order, slots, valid, 0, 1, 1
            )
        else:
            src = plan.order[slots]
            dout_p, q_p, out_p, lse_p = dout[src], q[src], out[src], lse[src]
            if valid is not None:
                dout_p = torch.where(valid[:, None], dout_p, 0)
        dq_p, dk_p, dv_p = backend.tiles_backward(
            dout_p, q_p, kb[piece.tile_block], vb[piece.tile_block], out_p, lse_p,
            piece.tile_rows, piece.width, piece.max_rows, scale,
        )
        put_rows(dq, dst, dq_p)
        dk.index_add_(0, piece.tile_block, dk_p.float())
        dv.index_add_(0, piece.tile_block, dv_p.float())
    return dq[:n]
