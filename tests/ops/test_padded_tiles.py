"""The padded-tile path (used with cuDNN on GPUs), run on CPU with a plain PyTorch batched kernel.

Small tile widths force blocks to be cut into several tiles with padded last tiles."""

from collections import Counter

import pytest
import torch

from moba_megatron import moba_attn_varlen
from moba_megatron.ops.moba import moba_attn_varlen_reference
from moba_megatron.ops.varlen import BACKENDS
from tests.helpers import assert_close, make_qkv, run_with_grads
from tests.ops.backends import PaddedTorch


def check_padded(group, seed):
    q, k, v, cu = make_qkv([45, 0, 30, 2], 4, 4 // group, 8, seed=seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out, grads = run_with_grads(
        lambda a, b, c: moba_attn_varlen(a, b, c, cu, 45, 5, 3, backend="padded_torch"), q, k, v, dout
    )
    ref, ref_grads = run_with_grads(lambda a, b, c: moba_attn_varlen_reference(a, b, c, cu, 5, 3), q, k, v, dout)
    assert_close(out, ref, 2e-5, 2e-5, "out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, 2e-5, 2e-5, f"d{name}")


@pytest.mark.parametrize("width", [1, 3, 8])
@pytest.mark.parametrize("group", [1, 2])
def test_padded_tiles_match_reference(monkeypatch, width, group):
    monkeypatch.setitem(BACKENDS, "padded_torch", PaddedTorch(width))
    check_padded(group, seed=width)


@pytest.mark.parametrize("group", [1, 2])
def test_padded_tiles_in_head_groups(monkeypatch, group):
    """A state budget under one slot: each head's slots split into parts, a group each (later groups'
    kv heads start past block 0), and each group's tiles split into calls of 4, 2 and 1 tiles, which
    must stay inside the group's blocks."""
    from moba_megatron.ops.moba import routing

    monkeypatch.setitem(BACKENDS, "padded_torch", PaddedTorch(4))
    monkeypatch.setattr(routing, "STATE_BUDGET_ELEMENTS", 1)
    monkeypatch.setattr(routing, "PIECE_BUDGET_ELEMENTS", 6 * (4 + 2 * 5) * 8)  # calls of at most 4 tiles
    check_padded(group, seed=group)


def call_cost(calls, chunk):
    """Time of tile calls [(tiles, width)] under routing.plan_calls's model."""
    from moba_megatron.ops.moba import routing

    fill = routing.MODEL_SMS * routing.KEYS_PER_CTA / chunk
    return sum(max(n, fill) * width * chunk + routing.CALL_OVERHEAD for n, width in calls)


@pytest.mark.parametrize("tile_width", [16384, 8192, 100])
def test_pack_tiles_covers_each_row_once_in_cheap_calls(tile_width):
    """Run sizes as at 128K / 4096 / 12 (0 to ~90K rows): every row lands in exactly one tile; each
    call holds a power-of-two number of tiles within the budget, padded to its widest, with empty
    tiles in the last call only; the plan costs no more than calls of 32 tiles padded to the widest
    (the earlier packing: 27% extra rows there) or calls of one width class each (GPU left idle)."""
    from moba_megatron.ops.moba import routing

    chunk = 4096
    sizes = torch.randint(0, 90000, (256,), generator=torch.Generator().manual_seed(tile_width)).tolist()
    sizes[:3] = [0, 1, tile_width]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    runs = [(starts[i], n, i % 32) for i, n in enumerate(sizes)]
    pieces = routing.pack_tiles(iter(runs), tile_width, chunk, 128, "cpu")
    covered = torch.zeros(starts[-1], dtype=torch.int64)
    for i, piece in enumerate(pieces):
        rows, row0 = piece.tile_rows.tolist(), piece.tile_row0.tolist()
        most = routing.call_budget(piece.width, chunk, 128)
        assert piece.num_tiles & (piece.num_tiles - 1) == 0 and piece.num_tiles <= most, (piece.num_tiles, most)
        assert piece.width == routing.padded_width(max(rows), tile_width)
        assert piece.max_rows == max(rows) and piece.num_rows == sum(rows)
        assert min(rows) > 0 or i == len(pieces) - 1, "empty tiles before the last call"
        for r0, n in zip(row0, rows):
            covered[r0 : r0 + n] += 1
        sorted_rows, valid = piece.slots()
        assert sorted_rows.numel() == piece.width * piece.num_tiles and int(valid.sum()) == piece.num_rows
    assert bool((covered == 1).all())
    plan = call_cost([(p.num_tiles, p.width) for p in pieces], chunk)

    tiles = sorted((min(tile_width, n - r0) for n in sizes for r0 in range(0, n, tile_width)), reverse=True)
    widths = [routing.padded_width(n, tile_width) for n in tiles]
    most = routing.call_budget(tile_width, chunk, 128)
    padded = [(most, widths[i]) for i in range(0, len(tiles), most)]
    classes = []  # each width class in calls of the budget, then its remainder's binary digits
    for width, count in Counter(widths).items():
        cap = routing.call_budget(width, chunk, 128)
        classes += [(cap, width)] * (count // cap)
        classes += [(1 << b, width) for b in range(cap.bit_length()) if count % cap >> b & 1]
    assert plan <= call_cost(padded, chunk) and plan <= call_cost(classes, chunk), (
        plan, call_cost(padded, chunk), call_cost(classes, chunk))
    if tile_width >= 8192:  # (tiles of 100 rows are mostly call overhead)
        assert plan < 1.15 * sum(tiles) * chunk, plan / (sum(tiles) * chunk)
