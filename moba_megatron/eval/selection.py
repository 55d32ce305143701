"""How much the gate's selections overlap between neighbouring queries: the measurement that says
whether attending a tile of queries over the union of their blocks could beat routing each
(query, head, block) row on its own.

For a tile of ``tile`` consecutive queries of one head:
- ``rows``: the blocks its queries selected, counted per query (what per-row kernels pay for);
- ``union``: the distinct blocks among them (what a tile kernel would load and attend);
- ``candidates``: the distinct blocks any of its queries could select (a tile kernel's dense case).
``union / rows`` is 1 when no two queries of a tile share a block and ``1 / tile`` when all share
every block; ``union / candidates`` is the fraction of the tile's causal blocks it would attend.

``record_selections`` wraps the gate (``gating.select_blocks``) of the single-device op while a
model runs, by MoBA layer; ``tile_overlap`` sums the counts of one selection.

The reference a trained model's overlap is read against is that of random inputs (those of
``benchmarks/bench_op.py``), where it is close to dense:

    python -m moba_megatron.eval.selection --length 32768 --blocks 2048/3,128/48 --tiles 16,64,128
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from contextlib import contextmanager

import torch


def tile_overlap(selection: torch.Tensor, token_block: torch.Tensor, token_first_block: torch.Tensor,
                 num_blocks: int, tile: int) -> dict[str, int]:
    """Counts summed over the (tile, head) pairs of ``selection [T, H, S]`` (block ids, -1 unused), for
    tiles of ``tile`` consecutive tokens: ``rows``, ``union`` and ``candidates`` (module doc).
    ``token_block`` and ``token_first_block`` ``[T]``: each token's own block and its sequence's
    first block (its candidates are the blocks in between, ``layout.BlockLayout``)."""
    t, h, _ = selection.shape
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if t == 0:
        return {"rows": 0, "union": 0, "candidates": 0}
    tiles = torch.arange(t, device=selection.device) // tile
    num_tiles = int(tiles[-1]) + 1
    nb = num_blocks + 1  # the last column takes the unused slots
    sel = selection.long().masked_fill(selection < 0, num_blocks)
    marks = torch.zeros(num_tiles * h * nb, dtype=torch.bool, device=selection.device)
    cell = tiles[:, None] * h + torch.arange(h, device=selection.device)  # [T, H]
    marks[(cell[:, :, None] * nb + sel).flatten()] = True
    union = int(marks.view(num_tiles, h, nb)[:, :, :num_blocks].sum())
    # A tile's candidates: the union of its tokens' intervals [first, own), one difference array a tile.
    edges = torch.zeros(num_tiles, nb, dtype=torch.int64, device=selection.device)
    ones = torch.ones(t, dtype=torch.int64, device=selection.device)
    edges.index_put_((tiles, token_first_block.long()), ones, accumulate=True)
    edges.index_put_((tiles, token_block.long()), -ones, accumulate=True)
    candidates = int((edges.cumsum(1)[:, :num_blocks] > 0).sum()) * h
    return {"rows": int((selection >= 0).sum()), "union": union, "candidates": candidates}


@contextmanager
def record_selections(model: torch.nn.Module, tiles: list[int]):
    """While the context is open, every selection the gate makes in ``model``'s MoBA layers adds to
    ``counts[layer][tile]`` (``tile_overlap``'s counts) of the yielded ``counts``."""
    from ..megatron.attention import MoBAAttention
    from ..ops.moba import gating

    counts: dict[int, dict[int, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    current = {"layer": 0}
    select = gating.select_blocks

    def recording(q, block_sums, layout, num_selected, **kw):
        chosen = select(q, block_sums, layout, num_selected, **kw)
        for tile in tiles:
            found = tile_overlap(chosen, layout.token_block, layout.token_first_block, layout.num_blocks, tile)
            for name, n in found.items():
                counts[current["layer"]][tile][name] += n
        return chosen

    def enter_layer(module, _args):
        current["layer"] = module.layer_number

    hooks = [m.register_forward_pre_hook(enter_layer) for m in model.modules() if isinstance(m, MoBAAttention)]
    gating.select_blocks = recording
    try:
        yield counts
    finally:
        gating.select_blocks = select
        for hook in hooks:
            hook.remove()


def summary(counts) -> list[dict]:
    """One row a (layer, tile), then one a tile over all layers: the counts and their ratios."""
    rows = []
    totals: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for layer in sorted(counts):
        for tile in sorted(counts[layer]):
            c = counts[layer][tile]
            rows.append({"layer": layer, "tile": tile, **c})
            for name, n in c.items():
                totals[tile][name] += n
    rows += [{"layer": "all", "tile": tile, **c} for tile, c in sorted(totals.items())]
    for r in rows:
        r["union_per_row"] = r["union"] / r["rows"] if r["rows"] else None
        r["union_per_candidate"] = r["union"] / r["candidates"] if r["candidates"] else None
    return rows


def random_overlap(length: int, chunk: int, topk: int, tiles: list[int], heads: int = 2, head_dim: int = 64,
                   seed: int = 0) -> dict[int, dict[str, int]]:
    """``tile_overlap``'s counts by tile for the gate on one sequence of random bf16 queries and keys
    (top-k counts the own block, as ``moba_topk`` does)."""
    from ..ops.moba.gating import block_key_sums, select_blocks
    from ..ops.moba.layout import block_layout

    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(length, heads, head_dim, generator=gen).bfloat16() for _ in range(2))
    layout = block_layout((0, length), chunk, torch.device("cpu"))
    chosen = select_blocks(q, block_key_sums(k, layout), layout, topk - 1)
    return {t: tile_overlap(chosen, layout.token_block, layout.token_first_block, layout.num_blocks, t)
            for t in tiles}


def _positive_ints(text: str, sep: str = ",") -> list[int]:
    try:
        found = [int(n) for n in text.split(sep)]
    except ValueError:
        found = []
    if not found or min(found) < 1:
        raise argparse.ArgumentTypeError(f"positive whole numbers separated by '{sep}', got {text!r}")
    return found


def _length(text: str) -> int:
    found = _positive_ints(text)
    if len(found) != 1:
        raise argparse.ArgumentTypeError(f"one positive whole number, got {text!r}")
    return found[0]


def _block_topk_pairs(text: str) -> list[list[int]]:
    pairs = [_positive_ints(pair, "/") for pair in text.split(",")]
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"BLOCK/TOPK,..., got {text!r}")
    return pairs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="the gate's overlap within query tiles on random inputs")
    parser.add_argument("--length", type=_length, default=32768, help="tokens")
    parser.add_argument("--blocks", type=_block_topk_pairs, default="2048/3,512/12,256/24,128/48,64/96",
                        help="BLOCK/TOPK,...")
    parser.add_argument("--tiles", type=_positive_ints, default="1,16,64,128", help="queries a tile, N,...")
    args = parser.parse_args(argv)
    print(f"union of a tile's selected blocks / its candidate blocks, random inputs at {args.length} tokens")
    print("block / top-k | " + " | ".join(f"tile {t}" for t in args.tiles))
    for chunk, topk in args.blocks:
        found = random_overlap(args.length, chunk, topk, args.tiles)
        print(f"{chunk} / {topk} | " + " | ".join(
            f"{found[t]['union'] / max(found[t]['candidates'], 1):.2f}" for t in args.tiles))


if __name__ == "__main__":
    main()
