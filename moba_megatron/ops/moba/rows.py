"""Attention of loose query rows against a store of key blocks.

Context parallelism hands the op a flat list of rows: one query vector each, with the key block it
selected (``kv_head * store_blocks + block`` into a block-major store ``[Hkv * blocks, C, D]``).
``plan_rows`` sorts them by block and packs them into kernel calls as the single-device routing does;
``rows_forward`` returns each row's partial output and LSE in the input order, and ``rows_backward``
differentiates them against the merged output and LSE, returning fp32 gradients of the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .routing import Piece, pack_tiles


@dataclass(frozen=True)
class RowPlan:
    num_rows: int
    order: torch.Tensor  # [rows] int64: input row of each sorted row
    pieces: list[Piece]


def plan_rows(keys: torch.Tensor, num_keys: int, tile_width: int | None, chunk: int, head_dim: int) -> RowPlan:
    """Reads the per-block row counts on the host once (kernel shapes depend on them)."""
    counts = torch.bincount(keys, minlength=num_keys).tolist()
    order = torch.sort(keys, stable=True).indices
    runs = ((n, block) for block, n in enumerate(counts) if n)
    return RowPlan(keys.numel(), order, pack_tiles(runs, tile_width, chunk, head_dim, keys.device))


def put_rows(dst: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``dst[index] = rows`` for whole rows, moved as the widest element type that tiles a row:
    index_put works element by element, so 16-byte elements make it ~8x less work than bf16."""
    width = dst.shape[-1] * dst.element_size()
    for wide in (torch.complex128, torch.int64, torch.int32):
        if width % wide.itemsize == 0:
            dst.view(wide)[index] = rows.view(wide)
            return
    dst[index] = rows


def _kernel_rows(plan: RowPlan, piece: Piece):
    """Input row of every kernel row, its destination (padding -> the spare row ``num_rows``), and
    which kernel rows are real (None: all)."""
    slots, valid = piece.slots()
    src = plan.order[slots]
    dst = src if valid is None else torch.where(valid, src, plan.num_rows)
    return src, dst, valid


def _take(x: torch.Tensor, index: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of ``x[index]``, without materializing ``x[index]``."""
    return x[rows] if index is None else x[index[rows]]


def rows_forward(backend, plan: RowPlan, q, k_store, v_store, scale: float, index=None):
    """Rows of ``q [n, D]`` (or of ``q[index]``, never materialized) -> partial ``out [n, D]`` and
    ``lse [n]`` fp32 of each row over its block."""
    n, d = plan.num_rows, q.shape[-1]
    out = q.new_zeros(n + 1, d)
    lse = torch.full((n + 1,), float("-inf"), dtype=torch.float32, device=q.device)
    for piece in plan.pieces:
        src, dst, _ = _kernel_rows(plan, piece)
        o, l = backend.tiles_forward(
            _take(q, index, src), k_store[piece.tile_block], v_store[piece.tile_block],
            piece.tile_rows, piece.width, piece.max_rows, scale,
        )
        put_rows(out, dst, o)
        lse[dst] = l
    return out[:n], lse[:n]


def rows_backward(backend, plan: RowPlan, dout, q, out, lse, k_store, v_store, scale: float,
                  index=None, lse_index=None):
    """Gradients of the rows (``dq [n, D]``) and of the stores (fp32, shaped like them), with each
    row's probabilities taken against its *merged* output and LSE. Rows are those of ``dout, q,
    out`` (``[n, D]``) and ``lse`` (``[n]``), or of ``x[index]`` and ``lse[lse_index]``."""
    n, d = plan.num_rows, q.shape[-1]
    dq = q.new_zeros(n + 1, d)
    dk = torch.zeros(k_store.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v_store.shape, dtype=torch.float32, device=q.device)
    for piece in plan.pieces:
        src, dst, valid = _kernel_rows(plan, piece)
        dout_p = _take(dout, index, src)
        if valid is not None:  # padding must carry no gradient into dK/dV
            dout_p = torch.where(valid[:, None], dout_p, 0)
        dq_p, dk_p, dv_p = backend.tiles_backward(
            dout_p, _take(q, index, src), k_store[piece.tile_block], v_store[piece.tile_block],
            _take(out, index, src), _take(lse, lse_index, src), piece.tile_rows, piece.width, piece.max_rows, scale,
        )
        put_rows(dq, dst, dq_p)
        dk.index_add_(0, piece.tile_block, dk_p.float())
        dv.index_add_(0, piece.tile_block, dv_p.float())
    return dq[:n], dk, dv
