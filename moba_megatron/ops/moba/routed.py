"""The routed part of MoBA: every selected row attends its block's keys, the partial results are
merged into the own-block output by log-sum-exp; and its backward.

One machinery serves every caller. The rows are a ``routing.Routes`` over a ``[T, heads]`` view
of the queries: on one device (and under context parallelism with the all-gather exchange) every
query head, with up to ``topk - 1`` slots each; in the routed exchange, the rows a rank received, as
``T`` cells of one head and one slot. The keys are a ``KeyBlocks``: K and V token-major with the
layout of their blocks (the op's own, or every rank's gathered).

On CUDA backends the forward and, for blocks below the backend's ``tiles_backward_min_chunk``, the
backward run in fused_routes.py's Triton kernels (nothing waits for the host). Elsewhere the rows
are cut into tiles for the backend's tile calls. Where the backend has Triton, a call's rows and key
tiles come from one gather each, and a head group's gradients are summed from the calls' outputs in
one pass for dq and one for dK/dV; else by index copies, a grid of dq rows and ``index_add_``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .layout import BlockLayout
from .routing import HeadGroup, Routes, token_windows

_MERGE_TILE_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class Kernels:
    """Which routed kernels run: the Triton forward + merge (``fused``), the Triton backward
    (``fused_backward``), else the backend's tiles with rows ``width`` wide (None: varlen)."""

    fused: bool
    fused_backward: bool
    tile_width: int | None

    @staticmethod
    def choose(backend, q: torch.Tensor, chunk: int) -> "Kernels":
        fused = False
        if backend.triton_routes:
            try:
                from .fused_routes import supports
            except ImportError:  # no triton: the tiles path serves every input
                supports = None
            fused = supports is not None and supports(q, chunk)
        min_chunk = backend.tiles_backward_min_chunk
        fused_backward = fused and (min_chunk is None or chunk < min_chunk)
        return Kernels(fused, fused_backward, backend.tile_width_for(chunk))


class KeyBlocks:
    """K and V ``[Tk, Hkv, D]`` and the layout of their blocks (``layout.num_tokens == Tk``)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout):
        self.k, self.v, self.layout = k, v, layout

    @functools.cached_property
    def block_major(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as ``[Hkv * blocks, C, D]``: each (kv head, block) one contiguous tile of keys.
        Partial last blocks are padded with whatever follows them; they are never selected."""
        layout, (_, hkv, d) = self.layout, self.k.shape
        tokens = torch.arange(layout.chunk, device=self.k.device) + layout.block_starts_dev[:, None]
        tokens.clamp_(max=layout.num_tokens - 1)
        idx = (tokens[None] * hkv + torch.arange(hkv, device=self.k.device)[:, None, None]).flatten()
        return tuple(x.view(-1, d)[idx].view(hkv * layout.num_blocks, layout.chunk, d) for x in (self.k, self.v))


def merge_partials(out, lse, grid_out, grid_lse):
    """Merge each cell's own-block result with its per-slot partials by log-sum-exp.

    ``out [T, nh, D]``, ``lse [nh, T]``; the grid holds ``[T, nh, slots]`` partials (LSE -inf where
    a slot is unused). Done in token tiles to bound the fp32 temporaries."""
    t, nh, d = out.shape
    g_out = grid_out[:-1].view(t, nh, -1, d)
    g_lse = grid_lse[:-1].view(t, nh, -1)
    merged = torch.empty_like(out)
    merged_lse = torch.empty(t, nh, dtype=torch.float32, device=out.device)
    tile = max(1, _MERGE_TILE_ELEMENTS // (nh * g_out.shape[2] * d))
    for t0 in range(0, t, tile):
        t1 = min(t, t0 + tile)
        lse_all = torch.cat([lse[:, t0:t1].t()[..., None], g_lse[t0:t1]], dim=-1)
        total = torch.logsumexp(lse_all, dim=-1)
        w = torch.exp(lse_all - total[..., None])
        acc = out[t0:t1].float() * w[..., :1]
        acc += torch.einsum("tns,tnsd->tnd", w[..., 1:], g_out[t0:t1].float())
        merged[t0:t1] = acc
        merged_lse[t0:t1] = total
    return merged, merged_lse.t()


def put_rows(dst: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``dst[index] = rows`` for whole rows, moved as the widest element type that tiles a row:
    index_put works element by element, so 16-byte elements make it ~8x less work than bf16."""
    width = dst.shape[-1] * dst.element_size()
    for wide in (torch.complex128, torch.int64, torch.int32):
        if width % wide.itemsize == 0:
            dst.view(wide)[index] = rows.view(wide)
            return
    dst[index] = rows


def _fold_into(dst: torch.Tensor, parts: torch.Tensor) -> None:
    """``dst [T, n, D] += parts [T, n, S, D]`` summed over S, in fp32, rounded once into dst's dtype."""
    dst += parts.sum(2, dtype=torch.float32)


def _cells(routes: Routes, rid: torch.Tensor):
    """Of rows ``rid``, as int64: the query cell (``t * Hq + h`` of the real heads), the head-major cell
    (``h * T + t``), and the slot, token and (virtual) head of the row view."""
    rid = rid.long()
    cell = rid // routes.slots
    t, vh = cell // routes.heads, cell % routes.heads
    h = vh // routes.parts
    return t * (routes.heads // routes.parts) + h, h * routes.num_tokens + t, rid % routes.slots, t, vh


def _grid_places(routes: Routes, grp: HeadGroup, tok, head, slot, valid):
    """Each kernel row's place in head group ``grp``'s grid of ``[T * nh * slots + 1]`` rows; padding
    rows (``valid`` False) repeat a real row's place, so they go to the spare last row."""
    nh, slots = grp.h1 - grp.h0, routes.slots
    dst = (tok * nh + head - grp.h0) * slots + slot
    return dst if valid is None else torch.where(valid, dst, routes.num_tokens * nh * slots)


def attend(q, routes: Routes, grp: HeadGroup, keys: KeyBlocks, scale: float, backend, kernels: Kernels,
           window: tuple[int, int] | None = None):
    """Partial output and LSE of head group ``grp``'s rows, in merge-grid layout
    ``[T * nh * slots + 1, D]`` and ``[T * nh * slots + 1]`` fp32 (the last row is spare); with a
    ``window (t0, t1)`` (the fused kernels only), of its rows of those tokens, ``T`` then ``t1 - t0``."""
    t, _, d = q.shape
    layout, nh, slots = keys.layout, grp.h1 - grp.h0, routes.slots
    if kernels.fused:
        from .fused_routes import routed_forward

        return routed_forward(q, keys.k, keys.v, routes, grp, layout.block_starts_dev, layout.chunk, scale,
                              window or (0, t))
    assert window is None or window == (0, t), "token windows are the fused forward's"
    kb, vb = keys.block_major
    grid_out = q.new_zeros(t * nh * slots + 1, d)
    grid_lse = torch.full((grid_out.shape[0],), float("-inf"), device=q.device)
    for piece in routes.pieces(kernels.tile_width, layout.chunk, d)[routes.groups.index(grp)]:
        sorted_rows, valid = piece.slots()
        cell, _, slot, tok, head = _cells(routes, routes.order[sorted_rows])
        o, l = backend.tiles_forward(
            q.view(-1, d)[cell], kb[piece.tile_block], vb[piece.tile_block], piece.tile_rows, piece.width,
            piece.max_rows, scale,
        )
        dst = _grid_places(routes, grp, tok, head, slot, valid)
        put_rows(grid_out, dst, o)
        grid_lse[dst] = l
    return grid_out, grid_lse


def merge(out, lse, h0: int, nh: int, grid_out, grid_lse, slots: int, fused: bool, parts: int = 1,
          window: tuple[int, int] | None = None) -> None:
    """In place: heads ``[h0, h0 + nh)`` of the row view (real head ``h // parts``; a part of one head
    where ``parts > 1``) of ``out [T, Hq, D]``, ``lse [Hq, T]`` merged with a grid of ``[T, nh, slots]``
    partials (``[t1 - t0, nh, slots]`` of the tokens of a ``window``, fused only)."""
    if fused:
        from .fused_routes import merge_into

        merge_into(out, lse, h0, nh, grid_out, grid_lse, slots, parts, window)
    else:
        assert window is None or window == (0, out.shape[0]), "token windows are the fused forward's"
        assert parts == 1 or nh == 1, "a head's parts merge one after the other"
        heads = slice(h0 // parts, h0 // parts + nh)
        out[:, heads], lse[heads] = merge_partials(out[:, heads], lse[heads], grid_out, grid_lse)


def forward(q, out, lse, routes: Routes, keys: KeyBlocks, scale: float, backend, kernels: Kernels) -> None:
    """Merges the routed partials into ``out [T, Hq, D]`` and ``lse [Hq, T]`` (contiguous) in place. The
    fused kernels take a head group's tokens in windows whose merge grid fits the state budget."""
    t, _, d = q.shape
    for grp in routes.groups:
        nh = grp.h1 - grp.h0
        for window in token_windows(t, nh * routes.slots, d) if kernels.fused else [None]:
            grid_out, grid_lse = attend(q, routes, grp, keys, scale, backend, kernels, window)
            merge(out, lse, grp.h0, nh, grid_out, grid_lse, routes.slots, kernels.fused, routes.parts, window)
            del grid_out, grid_lse


def plan_backward(routes: Routes, chunk: int, head_dim: int, kernels: Kernels) -> None:
    """Plans the backward's tile calls, where it takes tiles. Call it once the forward's kernels are
    queued: the host then waits for the run bounds (copied right after the sort) and plans (about 1
    ms a head group) while the GPU runs them. Planned at the start of the backward, the GPU would
    wait for it."""
    if not kernels.fused_backward:
        routes.pieces(kernels.tile_width, chunk, head_dim)


def backward(dout, q, out, lse, routes: Routes, keys: KeyBlocks, scale: float, backend, kernels: Kernels,
             dq, dk, dv) -> None:
    """Adds the routed gradients in place: into ``dq`` (shaped like q ``[T, heads, D]``; fp32 for the
    fused backward, any dtype on the tile path, which adds each head once in fp32) and
    ``dk, dv [Tk, Hkv, D]`` (any dtype). Each row's probabilities are taken against the *merged*
    out and LSE."""
    layout, d = keys.layout, q.shape[-1]
    if kernels.fused_backward:
        from .fused_routes import routed_backward

        routed_backward(dout, q, keys.k, keys.v, out, lse, routes, layout.block_starts_dev, layout.chunk, scale,
                        dq, dk, dv)
        return
    if kernels.fused:
        from .fused_routes import fold_into, fold_key_tiles, fold_rows, gather_key_tiles, gather_tile_rows, row_sources
    else:
        fold_into = _fold_into
        kb, vb = keys.block_major
    t, slots = q.shape[0], routes.slots
    dkv, kv0 = None, 0  # fp32 token-major dK, dV of kv heads [kv0, ...) until they are complete
    for grp, pieces in zip(routes.groups, routes.pieces(kernels.tile_width, layout.chunk, d)):
        first_kv, kv1, starts, completes = routes.kv_heads_of(grp)
        # The Triton path sums a head group's key tiles straight into dk, dv where the group holds every
        # run of its kv heads; else into fp32 accumulators until the kv heads' last group.
        direct = kernels.fused and dkv is None and starts and completes
        if dkv is None and not direct:
            kv0 = first_kv
            dkv = torch.zeros(2, layout.num_tokens, kv1 - kv0, d, dtype=torch.float32, device=q.device)
        # Each row's dq is summed into dq once its head group is done, in fp32 (no fp32 atomics into a
        # [T, heads, D] accumulator, which contend and must be zero-filled). The Triton path reads
        # the rows from the calls' outputs through a map of their places; the other stores them at
        # their (token, head, slot) places of a grid (unused places stay zero; the last row is spare).
        nh = grp.h1 - grp.h0
        if kernels.fused:
            sources, dq_parts, key_parts = row_sources(t, nh, slots, q.device), [], []
        else:
            grid_dq = q.new_zeros(t * nh * slots + 1, d)
        for index, piece in enumerate(pieces):
            if kernels.fused:  # padding rows get a zero dO: they must carry no gradient into dK/dV
                dout_rows, q_rows, out_rows, lse_rows = gather_tile_rows(dout, q, out, lse, routes, piece, grp,
                                                                         sources, index)
                k_tiles, v_tiles = gather_key_tiles(keys.k, keys.v, piece.tile_block, layout.block_starts_dev,
                                                    layout.chunk)
            else:
                sorted_rows, valid = piece.slots()
                cell, head_major, slot, tok, head = _cells(routes, routes.order[sorted_rows])
                dout_rows, q_rows, out_rows = (x.view(-1, d)[cell] for x in (dout, q, out))
                if valid is not None:
                    dout_rows = torch.where(valid[:, None], dout_rows, 0)
                lse_rows = lse.view(-1)[head_major]
                k_tiles, v_tiles = kb[piece.tile_block], vb[piece.tile_block]
            dq_r, dk_r, dv_r = backend.tiles_backward(
                dout_rows, q_rows, k_tiles, v_tiles, out_rows, lse_rows, piece.tile_rows, piece.width, piece.max_rows,
                scale,
            )
            if kernels.fused:  # dk_r, dv_r are [tiles, C, D], shaped like the key tiles
                dq_parts.append(dq_r.contiguous())
                key_parts.append((dk_r.contiguous(), dv_r.contiguous()))
            else:
                put_rows(grid_dq, _grid_places(routes, grp, tok, head, slot, valid), dq_r.to(grid_dq.dtype))
                tokens = layout.block_starts_dev[piece.tile_block % layout.num_blocks, None] + torch.arange(
                    layout.chunk, device=q.device)
                at = (tokens * (kv1 - kv0) + (piece.tile_block // layout.num_blocks - kv0)[:, None]).flatten()
                for acc, g in zip(dkv, (dk_r, dv_r)):
                    acc.view(-1, d).index_add_(0, at, g.reshape(-1, d).float())
            del dq_r, dk_r, dv_r, dout_rows, q_rows, out_rows, lse_rows, k_tiles, v_tiles
        if kernels.fused:
            fold_rows(dq[:, routes.real_heads(grp)], sources, dq_parts)
            key_dst = (dk, dv, 0) if direct else (dkv[0], dkv[1], kv0)
            fold_key_tiles(*key_dst, key_parts, [p.key_blocks for p in pieces], layout.block_starts_dev, layout.chunk)
            del sources, dq_parts, key_parts
        else:
            fold_into(dq[:, routes.real_heads(grp)], grid_dq[:-1].view(t, nh, slots, d))
            del grid_dq
        if dkv is not None and completes:  # the kv heads' last runs are done
            fold_into(dk[:, kv0:kv1], dkv[0].unsqueeze(2))
            fold_into(dv[:, kv0:kv1], dkv[1].unsqueeze(2))
            dkv = None
