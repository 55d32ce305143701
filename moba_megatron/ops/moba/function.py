"""The MoBA autograd Function and its public entry point ``moba_attn_varlen``.

Forward: (1) every query attends its own block causally, one varlen call over all blocks;
(2) the gate picks ``topk - 1`` earlier blocks per (query, head); (3) routed calls attend the
selected blocks non-causally (see routing.py; on CUDA backends, the fused Triton kernels of
fused_routes.py); (4) the partial outputs are merged by log-sum-exp.
Backward: each part's kernel backward runs against the *merged* output and LSE, which gives the
exact gradient of the single softmax over the union of selected keys.

Host synchronizations: the forward reads ``cu_seqlens`` once and the per-block selection counts
once (kernel launch shapes depend on them); the backward has none.
"""

from __future__ import annotations

import torch

from ..varlen import VarlenBackend, get_backend
from .gating import block_key_sums, select_blocks
from .layout import BlockLayout, block_layout
from .routing import HeadGroup, Piece, SelectionCounts, plan_routes
from .rows import put_rows
from .validate import check_max_seqlen, check_positive_int, check_qkv, check_scale, host_cu_seqlens

_MERGE_TILE_ELEMENTS = 1 << 26


class _GroupRows:
    """Index maps of a head group's sorted rows into ``[T*Hq]`` (token-major) and ``[Hq*T]``."""

    def __init__(self, grp: HeadGroup, t: int, hq: int, slots: int):
        nh = grp.h1 - grp.h0
        cell = grp.order // slots  # token * nh + local head
        token = cell // nh
        head = grp.h0 + cell - token * nh
        self.token_major = token * hq + head
        self.head_major = head * t + token
        self.grid_size = t * nh * slots  # one more grid row absorbs padding


def _block_major(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``[T, Hkv, D] -> [Hkv * blocks, C, D]``: each (kv head, block) as one contiguous tile of keys.

    Partial last blocks are padded with whatever follows them; they are never selected."""
    t, hkv, d = x.shape
    idx = _block_token_index(layout, hkv, x.device)
    return x.view(-1, d)[idx].view(hkv * layout.num_blocks, layout.chunk, d)


def _block_token_index(layout: BlockLayout, hkv: int, device) -> torch.Tensor:
    tokens = (layout.block_starts_dev[:, None] + torch.arange(layout.chunk, device=device)).clamp_(max=layout.num_tokens - 1)
    heads = torch.arange(hkv, device=device)
    return (tokens[None, :, :] * hkv + heads[:, None, None]).flatten()


def _token_major_index(layout: BlockLayout, hkv: int, device) -> torch.Tensor:
    """For every (token, kv head), its row in the block-major ``[Hkv * blocks * C]`` layout."""
    block = layout.token_block
    within = torch.arange(layout.num_tokens, device=device) - layout.block_starts_dev[block]
    heads = torch.arange(hkv, device=device)
    return ((heads[None, :] * layout.num_blocks + block[:, None]) * layout.chunk + within[:, None]).flatten()


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


def _piece_rows(grp: HeadGroup, grid_size: int, piece: Piece):
    """Sorted-row index of each kernel row, and its grid position (padding -> the spare row)."""
    slots, valid = piece.slots()
    pos = grp.order[slots]
    if valid is not None:
        pos = torch.where(valid, pos, grid_size)
    return slots, valid, pos


def _fused_routes_supported(q: torch.Tensor, chunk: int) -> bool:
    try:
        from .fused_routes import supports
    except ImportError:  # no triton: the tiles path serves every input
        return False
    return supports(q, chunk)


class MoBAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: BlockLayout, topk: int, scale: float, backend: VarlenBackend):
        t, hq, d = q.shape
        hkv = k.shape[1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        slots = min(topk - 1, layout.max_candidates)
        mb = layout.max_block_len
        if slots > 0:  # gate first: the own-block call below then hides the wait for counts
            sel = select_blocks(q, block_key_sums(k, layout), layout, slots)
            counts = SelectionCounts(sel, layout.num_blocks)
        out, lse = backend.forward(q, k, v, layout.cu_blocks, layout.cu_blocks, mb, mb, True, scale)
        groups: list[HeadGroup] = []
        if slots > 0:
            groups = plan_routes(sel, counts, layout, hkv, d, backend.tile_width)
            del sel
        fused = bool(groups) and backend.triton_routes and _fused_routes_supported(q, layout.chunk)
        if fused:
            from . import fused_routes

            for grp in groups:
                grid_out, grid_lse = fused_routes.routed_forward(
                    q, k, v, grp.order, grp.run_counts, grp.h0, grp.h1 - grp.h0, layout.block_starts_dev,
                    layout.chunk, slots, scale,
                )
                fused_routes.merge_into(out, lse, grp.h0, grp.h1 - grp.h0, grid_out, grid_lse, slots)
                del grid_out, grid_lse
        elif groups:
            q_flat = q.view(-1, d)
            kb, vb = _block_major(k, layout), _block_major(v, layout)
            for grp in groups:
                rows = _GroupRows(grp, t, hq, slots)
                grid_out = q.new_zeros(rows.grid_size + 1, d)
                grid_lse = torch.full((rows.grid_size + 1,), float("-inf"), device=q.device)
                for piece in grp.pieces:
                    slot_rows, _, pos = _piece_rows(grp, rows.grid_size, piece)
                    o_r, l_r = backend.tiles_forward(
                        q_flat[rows.token_major[slot_rows]], kb[piece.tile_block], vb[piece.tile_block],
                        piece.tile_rows, piece.width, piece.max_rows, scale,
                    )
                    put_rows(grid_out, pos, o_r)
                    grid_lse[pos] = l_r
                    del o_r, l_r
                heads = slice(grp.h0, grp.h1)
                out[:, heads], lse[heads] = merge_partials(out[:, heads], lse[heads], grid_out, grid_lse)
                del grid_out, grid_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.groups, ctx.slots, ctx.fused = layout, groups, slots, fused
        ctx.scale, ctx.backend = scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        layout, groups, slots, scale, backend = ctx.layout, ctx.groups, ctx.slots, ctx.scale, ctx.backend
        t, hq, d = q.shape
        hkv = k.shape[1]
        group = hq // hkv
        nb = layout.num_blocks
        dout = dout.contiguous()
        mb = layout.max_block_len
        dq, dk, dv = backend.backward(
            dout, q, k, v, out, lse, layout.cu_blocks, layout.cu_blocks, mb, mb, True, scale
        )
        if not groups:
            return dq, dk, dv, None, None, None, None
        q_flat, dout_flat, out_flat = q.view(-1, d), dout.view(-1, d), out.view(-1, d)
        lse_flat = lse.view(-1)
        fused = ctx.fused
        if fused:
            from . import fused_routes
        kb, vb = _block_major(k, layout), _block_major(v, layout)
        dkv = None  # fp32 block-major gradients of the kv heads of the current head group(s)
        for grp in groups:
            nh = grp.h1 - grp.h0
            kv0, kv1 = grp.h0 // group, -(-grp.h1 // group)
            if dkv is None:
                dkv = torch.zeros(2, (kv1 - kv0) * nb, layout.chunk, d, dtype=torch.float32, device=q.device)
            rows = None if fused else _GroupRows(grp, t, hq, slots)
            grid_size = t * nh * slots
            grid_dq = dq.new_zeros(grid_size + 1, d)
            for piece in grp.pieces:
                slot_rows, valid, pos = _piece_rows(grp, grid_size, piece)
                if fused:  # padding rows get a zero dO: they must carry no gradient into dK/dV
                    dout_rows, q_rows, out_rows, lse_rows = fused_routes.gather_rows(
                        dout, q, out, lse, grp.order, slot_rows, valid, grp.h0, nh, slots
                    )
                else:
                    tm = rows.token_major[slot_rows]
                    dout_rows, q_rows, out_rows = dout_flat[tm], q_flat[tm], out_flat[tm]
                    if valid is not None:
                        dout_rows = torch.where(valid[:, None], dout_rows, 0)
                    lse_rows = lse_flat[rows.head_major[slot_rows]]
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
                index = _token_major_index(layout, kv1 - kv0, q.device)
                for grad, acc in ((dk, dkv[0]), (dv, dkv[1])):
                    grad[:, kv0:kv1] = grad[:, kv0:kv1].float() + acc.view(-1, d)[index].view(t, kv1 - kv0, d)
                dkv = None
        return dq, dk, dv, None, None, None, None


def moba_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """MoBA attention over a packed (THD) batch.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA without repeating K/V).
        cu_seqlens: ``[B + 1]`` int32 sequence boundaries, ending at T.
        max_seqlen: the longest sequence (an upper bound is accepted).
        moba_chunk_size: block size C; blocks restart at each sequence start.
        moba_topk: blocks per query *including its own*; 1 means own block only.
        softmax_scale: default ``D ** -0.5``.
        backend: ``"cudnn"``, ``"flash_attn"``, ``"torch_flash"``, ``"torch"``, or None for the
            best one available for these inputs.

    Returns ``[T, Hq, D]``, differentiable with respect to q, k and v.
    """
    check_qkv(q, k, v)
    check_positive_int("moba_chunk_size", moba_chunk_size)
    check_positive_int("moba_topk", moba_topk)
    check_scale(softmax_scale)
    cu = host_cu_seqlens(cu_seqlens, q.shape[0], q.device)
    check_max_seqlen(max_seqlen, cu)
    impl = get_backend(backend, q, k)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    if q.shape[0] == 0:
        return q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())
    layout = block_layout(tuple(cu), moba_chunk_size, q.device)
    return MoBAFunction.apply(q, k, v, layout, moba_topk, scale, impl)
