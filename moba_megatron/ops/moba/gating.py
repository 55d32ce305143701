"""MoBA gating: score each query against the completed blocks before its own and pick the best.

The gate is ``q . mean(k over block)`` in fp32. Every candidate block is a completed block of
exactly ``chunk`` keys, so ranking by the block's key *sum* gives the same order as the mean while
staying exact for inputs the sum can hold exactly; that is what is ranked here.

Here, in PyTorch, scores are computed in token tiles in exact fp32, so no ``[blocks, heads, tokens]``
tensor is ever materialized: the CPU path and the reference of the fused Triton gate
(fused_gate.py), which the CUDA backends use.
"""

from __future__ import annotations

import torch

from .layout import BlockLayout

_TILE_ELEMENTS = 1 << 25  # scores per tile (fp32 scores + int64 keys: ~400 MB)
_INVALID = torch.iinfo(torch.int64).min
_NO_BLOCK = torch.iinfo(torch.int32).max


def block_key_sums(k: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Sum of the keys of every block, ``[num_blocks, Hkv, D]`` fp32.

    Sums of partial last blocks are left out of the gather's bounds check on purpose: those
    blocks are never candidates, so their value is never read.
    """
    nb = layout.num_blocks
    _, hkv, d = k.shape
    sums = torch.empty(nb, hkv, d, dtype=torch.float32, device=k.device)
    if nb == 0:
        return sums
    starts = layout.block_starts_dev
    offsets = torch.arange(layout.chunk, device=k.device)
    tile = max(1, _TILE_ELEMENTS // (layout.chunk * hkv * d))
    last = layout.num_tokens - 1
    for b0 in range(0, nb, tile):
        idx = (starts[b0 : b0 + tile, None] + offsets).clamp_(max=last)
        sums[b0 : b0 + tile] = torch.sum(k[idx], dim=1, dtype=torch.float32)
    return sums


def _sortable(scores: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Pack (score, block id) into one int64 whose order is: higher score first, then lower id."""
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 folds -0.0 into +0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # IEEE order -> two's complement order
    return (bits.to(torch.int64) << 32) | (0x7FFFFFFF - block_ids)


def _top(keys: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys.topk(n, dim=-1)`` (unsorted). For the few selections of small top-k, n passes of max
    are ~3x faster on GPUs than topk's radix select; keys (a temporary) are overwritten."""
    if n > 4:
        return keys.topk(n, dim=-1, sorted=False)
    best, where = [], []
    for i in range(n):
        b, w = keys.max(dim=-1, keepdim=True)
        best.append(b)
        where.append(w)
        if i + 1 < n:
            keys.scatter_(-1, w, _INVALID)
    return torch.cat(best, -1), torch.cat(where, -1)


def select_blocks(q: torch.Tensor, block_sums: torch.Tensor, layout, num_selected: int, *,
                  fused: bool = False) -> torch.Tensor:
    """The ``num_selected`` best earlier blocks of every (query, head).

    ``layout`` says where the queries' blocks are: a single-device ``BlockLayout``, or a context-
    parallel rank's ``ShardBlocks`` (local queries, global block ids). It provides ``token_block``
    and ``token_first_block`` (per query, on the device), ``max_candidates`` and ``candidate_range``.

    Returns ``[T, Hq, num_selected]`` int32 global block ids in ascending order, padded with -1
    where a query has fewer candidates. Ties go to the lower block index. ``fused``: score and
    select in the Triton kernel of fused_gate.py where it takes the inputs.
    """
    if fused and _fused_gate_supports(q, num_selected, layout.max_candidates):
        from .fused_gate import select_blocks_fused

        return select_blocks_fused(q, block_sums, layout.token_block, layout.token_first_block, num_selected,
                                   layout.max_candidates)
    t, hq, d = q.shape
    hkv = block_sums.shape[1]
    sel = torch.full((t, hq, num_selected), -1, dtype=torch.int32, device=q.device)
    if num_selected == 0 or t == 0:
        return sel
    span = layout.max_candidates + 1
    tile = max(1, _TILE_ELEMENTS // (hq * span))
    for t0 in range(0, t, tile):
        t1 = min(t, t0 + tile)
        lo, hi = layout.candidate_range(t0, t1)
        if hi <= lo:
            continue
        qt = q[t0:t1].float().reshape(t1 - t0, hkv, hq // hkv, d)
        scores = torch.einsum("thgd,bhd->thgb", qt, block_sums[lo:hi]).reshape(t1 - t0, hq, hi - lo)
        ids = torch.arange(lo, hi, device=q.device)
        own = layout.token_block[t0:t1, None]
        first = layout.token_first_block[t0:t1, None]
        valid = (ids >= first) & (ids < own)
        keys = torch.where(valid[:, None, :], _sortable(scores, ids), _INVALID)
        n = min(num_selected, hi - lo)
        best, where = _top(keys, n)
        chosen = torch.where(best != _INVALID, where + lo, _NO_BLOCK).sort(dim=-1).values
        sel[t0:t1, :, :n] = torch.where(chosen == _NO_BLOCK, -1, chosen).to(torch.int32)
    return sel


def kv_head_selector(q: torch.Tensor, block_sums: torch.Tensor, layout, num_selected: int, *, fused: bool = False):
    """``select(kv0, kv1)``: ``select_blocks`` of the query heads of kv heads ``[kv0, kv1)``, ``[T, heads,
    num_selected]`` (``routing.route_selection`` routes a few kv heads at a time)."""
    group = q.shape[1] // block_sums.shape[1]

    def select(kv0: int, kv1: int) -> torch.Tensor:
        return select_blocks(q[:, kv0 * group : kv1 * group], block_sums[:, kv0:kv1], layout, num_selected,
                             fused=fused)

    return select


def _fused_gate_supports(q: torch.Tensor, num_selected: int, max_candidates: int) -> bool:
    try:
        from .fused_gate import supports
    except ImportError:  # no triton
        return False
    return supports(q, num_selected, max_candidates)
