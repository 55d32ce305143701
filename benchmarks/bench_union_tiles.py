"""What a union-tile kernel would take: MoBA run as tiles of 128 queries over the union of the key
blocks their queries selected, measured with FlexAttention (PyTorch's block-sparse attention kernel)
against the op's per-row kernels and cuDNN dense causal attention, same inputs, one run.

For each selection, two FlexAttention runs over the same (128 queries x 128 keys) tiles:
- exact: each query masked to its own selection (a mask function reads it): MoBA's output, checked
  against the op's;
- union bound: every tile of the union below the diagonal attended in full: the time of a union-tile
  kernel whose per-query masks cost nothing. Its output is not MoBA's; it is a floor on the kernel's
  time at FlexAttention's rate.

Selections: the gate's on the random inputs (each tile's union is nearly all its candidates), and
synthetic ones whose tiles share a union of a fraction u of their candidate blocks (each query picks
its top-k - 1 blocks at random within its tile's union), standing in for a trained gate's.

    python benchmarks/bench_union_tiles.py --json union-tiles.json
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from moba_megatron import moba_attn_varlen
from moba_megatron.ops.moba.gating import block_key_sums, select_blocks
from moba_megatron.ops.moba.layout import block_layout

TILE = 128  # queries and keys a tile (FlexAttention's block)
# One selection buffer and mask function per (block size, exact): the compiled FlexAttention is then
# reused across selections (each new mask function would compile anew).
_MASKS: dict[tuple[int, bool], tuple] = {}


def selection_mask(sel: torch.Tensor, token_block: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``[H, T, num_blocks]`` bool: the blocks each (query, head) attends, ``sel [T, H, n]`` (-1: none)
    and its own block."""
    t, h, _ = sel.shape
    mask = torch.zeros(h, t, num_blocks + 1, dtype=torch.bool, device=sel.device)
    mask.scatter_(2, torch.where(sel >= 0, sel.long(), num_blocks).permute(1, 0, 2), True)
    mask[:, torch.arange(t, device=sel.device), token_block] = True
    return mask[:, :, :num_blocks].contiguous()


def _indices(tiles: torch.Tensor):
    """FlexAttention's (counts, indices) of the true key tiles of each query tile."""
    order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return tiles.sum(-1, dtype=torch.int32)[None], order[None]


def union_block_mask(mask: torch.Tensor, chunk: int, exact: bool) -> tuple[BlockMask, float]:
    """The BlockMask of the selection ``mask [H, T, blocks]`` over (TILE x TILE) tiles, and the tiles it
    attends over dense causal attention's. A key tile is in a query tile's union where any of its
    queries selected a block in it; ``exact`` masks each query to its selection (tiles every query
    selected, below the diagonal, are full), else every union tile below the diagonal is full."""
    h, t, nb = mask.shape
    assert t % TILE == 0 and (chunk % TILE == 0 or TILE % chunk == 0), "whole tiles of whole blocks"
    nq = t // TILE
    by_tile = mask.view(h, nq, TILE, nb)
    any_, all_ = by_tile.any(2), by_tile.all(2)
    if chunk >= TILE:
        any_, all_ = (x.repeat_interleave(chunk // TILE, -1) for x in (any_, all_))
    else:  # several blocks a key tile
        g = TILE // chunk
        any_, all_ = any_.view(h, nq, nb // g, g).any(-1), all_.view(h, nq, nb // g, g).all(-1)
    lower = torch.ones(nq, nq, dtype=torch.bool, device=mask.device).tril()
    any_ = any_ & lower  # a block's keys past the tile are never attended: no tile for them
    full = (all_ if exact else any_) & lower.tril(-1)
    partial = any_ & ~full
    key = (chunk, exact)
    if key not in _MASKS:
        sel = torch.empty_like(mask)

        def causal(b, head, q_idx, kv_idx):
            return kv_idx <= q_idx

        def selected(b, head, q_idx, kv_idx):
            return sel[head, q_idx, kv_idx // chunk] & (kv_idx <= q_idx)

        _MASKS[key] = (sel, selected if exact else causal)
    sel, mask_mod = _MASKS[key]
    sel.copy_(mask)
    block_mask = BlockMask.from_kv_blocks(*_indices(partial), *_indices(full), BLOCK_SIZE=TILE, mask_mod=mask_mod,
                                          seq_lengths=(t, t))
    causal_tiles = h * nq * (nq + 1) // 2
    return block_mask, any_.sum().item() / causal_tiles


def synthetic_selection(t: int, heads: int, chunk: int, topk: int, union: float, generator) -> torch.Tensor:
    """``[T, heads, topk - 1]`` selections (blocks ascending, -1: none) whose TILE-query tiles share a
    union of ``union`` of their candidate blocks (those before the tile; at least the top-k - 1 a
    query needs): each query picks its blocks at random within its tile's union."""
    assert chunk <= TILE and t % TILE == 0
    device, nb, nq, n = generator.device, t // chunk, t // TILE, topk - 1
    candidates = torch.arange(nq, device=device) * (TILE // chunk)
    size = torch.maximum(candidates.clamp(max=n), (union * candidates).round().long())
    ids = torch.arange(nb, device=device)
    draw = torch.where(ids < candidates[:, None], torch.rand(heads, nq, nb, device=device, generator=generator), 2.0)
    in_union = draw.argsort(-1).argsort(-1) < size[:, None]  # the tile's `size` lowest draws
    pick = torch.rand(heads, t, nb, device=device, generator=generator)
    pick = torch.where(in_union.repeat_interleave(TILE, 1), pick, -1.0).topk(min(n, nb), dim=-1)
    sel = torch.where(pick.values >= 0, pick.indices, -1).sort(-1).values
    return sel.permute(1, 0, 2).to(torch.int32).contiguous()


def main():
    from bench_op import dense_causal, measure, timed  # this folder is on sys.path when the script runs
    from provenance import provenance

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--cases", default="128:48,64:96", help="block:top-k pairs (blocks of at most 128 keys "
                        "take synthetic selections)")
    parser.add_argument("--unions", default="0.67,0.5,0.33,0.2", help="synthetic tiles' union over their candidates")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    t, heads, d = args.seqlen, args.heads, args.head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(t, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    cu = torch.tensor([0, t], dtype=torch.int32)
    flex = torch.compile(flex_attention, dynamic=False)
    torch._dynamo.config.recompile_limit = 64  # a graph per mask function, block size and grad mode
    results = []

    def record(**row):
        results.append(row)
        print(json.dumps(row), flush=True)

    def heads_first(x):
        return x.unsqueeze(0).transpose(1, 2)

    def through_flex(block_mask):
        return lambda q, k, v: flex(heads_first(q), heads_first(k), heads_first(v),
                                    block_mask=block_mask).transpose(1, 2)[0]

    record(method="cudnn", ms=measure(dense_causal, (q, k, v), dout, args.reps)[1] * 1e3)
    causal, _ = union_block_mask(torch.ones(heads, t, 1, dtype=torch.bool, device="cuda"), t, exact=False)
    record(method="flex-causal", ms=measure(through_flex(causal), (q, k, v), dout, args.reps)[1] * 1e3)
    generator = torch.Generator(device="cuda").manual_seed(1)
    for case in args.cases.split(","):
        chunk, topk = map(int, case.split(":"))
        layout = block_layout((0, t), chunk, q.device)

        def moba(q, k, v, chunk=chunk, topk=topk):
            return moba_attn_varlen(q, k, v, cu, t, chunk, topk)

        record(method="moba", chunk=chunk, topk=topk, ms=measure(moba, (q, k, v), dout, args.reps)[1] * 1e3)

        def gate(layout=layout, topk=topk):
            return select_blocks(q.detach(), block_key_sums(k.detach(), layout), layout, topk - 1, fused=True)

        gate_ms = timed(gate, args.reps) * 1e3
        selections = [("gate", None, gate())]
        if chunk <= TILE:
            selections += [("synthetic", float(u), synthetic_selection(t, heads, chunk, topk, float(u), generator))
                           for u in args.unions.split(",")]
        for source, union, sel in selections:
            mask = selection_mask(sel, layout.token_block, layout.num_blocks)
            bound, density = union_block_mask(mask, chunk, exact=False)
            row = dict(method="union-tiles", chunk=chunk, topk=topk, selection=source, union=union,
                       tiles_over_causal=density, gate_ms=gate_ms,
                       bound_ms=measure(through_flex(bound), (q, k, v), dout, args.reps)[1] * 1e3)
            if source == "gate":
                exact, _ = union_block_mask(mask, chunk, exact=True)
                with torch.no_grad():
                    err = (through_flex(exact)(q, k, v).float() - moba(q, k, v).float()).abs().max().item()
                row.update(exact_ms=measure(through_flex(exact), (q, k, v), dout, args.reps)[1] * 1e3,
                           exact_max_diff_from_moba=err)
            record(**row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(**provenance(), seqlen=t, heads=heads, head_dim=d, results=results), f, indent=1)


if __name__ == "__main__":
    main()
