"""The routed part of MoBA: every selected (query, head, block) attends that block's keys, and the
partial results are merged into the own-block output by log-sum-exp; and its backward.

The keys are a ``KeyBlocks``: K and V token-major with the layout of their blocks. On one device
that is the op's own K/V; under context parallelism with the all-gather exchange, every rank's K/V
gathered (parallel/attention.py), so both run this same code.

On CUDA backends the forward is the fused Triton kernel and the backward's rows come from one
Triton gather per call (fused_routes.py); elsewhere the rows are copied into tiles for the
backend's tile calls (routing.py).
"""

from __future__ import annotations

import functools

import torch

from .layout import BlockLayout
from .routing import HeadGroup, Piece, SelectionCounts, plan_groups, plan_pieces
from .rows import put_rows

_MERGE_TILE_ELEMENTS = 1 << 26


def fused_kernels_apply(backend, q: torch.Tensor, chunk: int) -> bool:
    """Whether the routed rows go through fused_routes.py's Triton kernels."""
    if not backend.triton_routes:
        return False
    try:
        from .fused_routes import supports
    except ImportError:  # no triton: the tiles path serves every input
        return False
    return supports(q, chunk)


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

    def to_tokens(self, grads, heads: int) -> list[torch.Tensor]:
        """Block-major gradients of ``heads`` kv heads -> token-major ``[Tk, heads, D]`` each."""
        layout, device = self.layout, grads[0].device
        block = layout.token_block
        within = torch.arange(layout.num_tokens, device=device) - layout.block_starts_dev[block]
        h = torch.arange(heads, device=device)
        index = ((h[None, :] * layout.num_blocks + block[:, None]) * layout.chunk + within[:, None]).flatten()
        return [g.view(-1, g.shape[-1])[index].view(layout.num_tokens, heads, -1) for g in grads]


class Routes:
    """A selection's head groups, and their kernel calls (pieces) once something needs them: the
    tiles path's forward, and every backward. The fused forward needs none, so on CUDA backends the
    forward never waits for the host; the backward reads the selection counts, long since copied."""

    def __init__(self, groups: list[HeadGroup], counts: SelectionCounts, slots: int, fused: bool,
                 kv_group: int, chunk: int, head_dim: int, tile_width: int | None):
        self.groups, self.counts, self.slots, self.fused = groups, counts, slots, fused
        self._pieces_args = (kv_group, chunk, head_dim, tile_width)
        self._pieces: list[list[Piece]] | None = None

    def num_rows(self) -> int:
        """Selected rows over all groups (reads the counts on the host)."""
        return sum(map(sum, self.counts.wait()))

    def pieces(self) -> list[list[Piece]]:
        if self._pieces is None:
            self._pieces = plan_pieces(self.groups, self.counts, *self._pieces_args)
        return self._pieces


def plan(sel: torch.Tensor, counts: SelectionCounts, keys: KeyBlocks, q: torch.Tensor, backend) -> Routes:
    """``sel [T, Hq, slots]``: block ids into ``keys.layout`` (-1: unused slot)."""
    layout, (_, hkv, d) = keys.layout, keys.k.shape
    groups = plan_groups(sel, counts, hkv, d)
    fused = fused_kernels_apply(backend, q, layout.chunk)
    return Routes(groups, counts, sel.shape[2], fused, q.shape[1] // hkv, layout.chunk, d, backend.tile_width)


class _GroupRows:
    """Index maps of a head group's sorted rows into ``[T*Hq]`` (token-major) and ``[Hq*T]``."""

    def __init__(self, grp: HeadGroup, t: int, hq: int, slots: int):
        nh = grp.h1 - grp.h0
        cell = grp.order // slots  # token * nh + local head
        token = cell // nh
        head = grp.h0 + cell - token * nh
        self.token_major = token * hq + head
        self.head_major = head * t + token


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


def merge(out, lse, h0: int, nh: int, grid_out, grid_lse, slots: int, fused: bool) -> None:
    """In place: heads ``[h0, h0 + nh)`` of ``out [T, Hq, D]``, ``lse [Hq, T]`` merged with a grid of
    ``[T, nh, slots]`` partials."""
    if fused:
        from .fused_routes import merge_into

        merge_into(out, lse, h0, nh, grid_out, grid_lse, slots)
    else:
        heads = slice(h0, h0 + nh)
        out[:, heads], lse[heads] = merge_partials(out[:, heads], lse[heads], grid_out, grid_lse)


def forward(q, out, lse, routes: Routes, keys: KeyBlocks, scale: float, backend) -> None:
    """Merges the routed partials into ``out [T, Hq, D]`` and ``lse [Hq, T]`` (contiguous) in place."""
    t, hq, d = q.shape
    slots, layout = routes.slots, keys.layout
    for i, grp in enumerate(routes.groups):
        nh = grp.h1 - grp.h0
        if routes.fused:
            from .fused_routes import routed_forward

            grid_out, grid_lse = routed_forward(
                q, keys.k, keys.v, grp.order, grp.run_counts, grp.h0, nh, layout.block_starts_dev,
                layout.chunk, slots, scale,
            )
        else:
            kb, vb = keys.block_major
            token_major = _GroupRows(grp, t, hq, slots).token_major
            grid_size = t * nh * slots
            grid_out = q.new_zeros(grid_size + 1, d)  # one more row absorbs padding
            grid_lse = torch.full((grid_size + 1,), float("-inf"), device=q.device)
            for piece in routes.pieces()[i]:
                slot_rows, _, pos = piece.destinations(grp.order, grid_size)
                o_r, l_r = backend.tiles_forward(
                    q.view(-1, d)[token_major[slot_rows]], kb[piece.tile_block], vb[piece.tile_block],
                    piece.tile_rows, piece.width, piece.max_rows, scale,
                )
                put_rows(grid_out, pos, o_r)
                grid_lse[pos] = l_r
                del o_r, l_r
        merge(out, lse, grp.h0, nh, grid_out, grid_lse, slots, routes.fused)
        del grid_out, grid_lse


def backward(dout, q, out, lse, routes: Routes, keys: KeyBlocks, scale: float, backend, dq, dk, dv) -> None:
    """Adds the routed gradients in place: into ``dq [T, Hq, D]`` and ``dk, dv [Tk, Hkv, D]`` (any
    dtype; summed in fp32). Each row's probabilities are taken against the *merged* out and LSE."""
    t, hq, d = q.shape
    group = hq // keys.k.shape[1]
    slots, nb = routes.slots, keys.layout.num_blocks
    kb, vb = keys.block_major
    if routes.fused:
        from .fused_routes import gather_rows
    dkv = None  # fp32 block-major gradients of the kv heads of the current head group(s)
    for grp, pieces in zip(routes.groups, routes.pieces()):
        nh = grp.h1 - grp.h0
        kv0, kv1 = grp.h0 // group, -(-grp.h1 // group)
        if dkv is None:
            dkv = torch.zeros(2, (kv1 - kv0) * nb, keys.layout.chunk, d, dtype=torch.float32, device=q.device)
        rows = None if routes.fused else _GroupRows(grp, t, hq, slots)
        grid_size = t * nh * slots
        grid_dq = dq.new_zeros(grid_size + 1, d)
        for piece in pieces:
            slot_rows, valid, pos = piece.destinations(grp.order, grid_size)
            if routes.fused:  # padding rows get a zero dO: they must carry no gradient into dK/dV
                dout_rows, q_rows, out_rows, lse_rows = gather_rows(
                    dout, q, out, lse, grp.order, slot_rows, valid, grp.h0, nh, slots
                )
            else:
                tm = rows.token_major[slot_rows]
                dout_rows, q_rows, out_rows = (x.view(-1, d)[tm] for x in (dout, q, out))
                if valid is not None:
                    dout_rows = torch.where(valid[:, None], dout_rows, 0)
                lse_rows = lse.view(-1)[rows.head_major[slot_rows]]
                del tm
            dq_r, dk_r, dv_r = backend.tiles_backward(
                dout_rows, q_rows, kb[piece.tile_block], vb[piece.tile_block], out_rows, lse_rows,
                piece.tile_rows, piece.width, piece.max_rows, scale,
            )
            put_rows(grid_dq, pos, dq_r)
            local = piece.tile_block - kv0 * nb
            dkv[0].index_add_(0, local, dk_r.float())
            dkv[1].index_add_(0, local, dv_r.float())
            del dq_r, dk_r, dv_r, dout_rows, q_rows, out_rows, lse_rows
        per_slot = grid_dq[:-1].view(t, nh, slots, d)
        dq[:, grp.h0 : grp.h1] = dq[:, grp.h0 : grp.h1].float() + per_slot.sum(2, dtype=torch.float32)
        del grid_dq, per_slot
        if grp.h1 % group == 0 or grp.h1 == hq:  # the kv heads' last query head is done
            for grad, acc in zip((dk, dv), keys.to_tokens(dkv, kv1 - kv0)):
                grad[:, kv0:kv1] = grad[:, kv0:kv1].float() + acc
            dkv = None
