"""The gate's overlap within query tiles (moba_megatron/eval/selection.py): its counts against plain
sets, the recorder around the real op, and the needle eval's --selection-tiles on a checkpoint."""

import json
import subprocess
import sys

import pytest
import torch

from moba_megatron.eval.needle import parse
from moba_megatron.eval.selection import main, random_overlap, record_selections, summary, tile_overlap
from moba_megatron.ops import moba_attn_varlen
from moba_megatron.ops.moba.gating import block_key_sums, select_blocks
from moba_megatron.ops.moba.layout import block_layout
from tests.helpers.job import ROOT, SMALL, run_job


def _overlap_by_sets(selection, token_block, token_first_block, tile):
    rows = union = candidates = 0
    t, h, _ = selection.shape
    for t0 in range(0, t, tile):
        span = range(t0, min(t, t0 + tile))
        allowed = set().union(*(range(int(token_first_block[i]), int(token_block[i])) for i in span))
        for head in range(h):
            picked = [int(b) for i in span for b in selection[i, head] if b >= 0]
            rows += len(picked)
            union += len(set(picked))
            candidates += len(allowed)
    return {"rows": rows, "union": union, "candidates": candidates}


@pytest.mark.parametrize("tile", [1, 3, 16, 1000])
def test_tile_overlap_matches_plain_sets(tile):
    """Two packed sequences (a tile may straddle them), a partial last block, unused slots."""
    torch.manual_seed(tile)
    layout = block_layout((0, 70, 150), 16, torch.device("cpu"))
    q = torch.randn(150, 3, 8)
    k = torch.randn(150, 3, 8)
    selection = select_blocks(q, block_key_sums(k, layout), layout, 3)
    assert (selection < 0).any() and (selection >= 0).any()
    found = tile_overlap(selection, layout.token_block, layout.token_first_block, layout.num_blocks, tile)
    assert found == _overlap_by_sets(selection, layout.token_block, layout.token_first_block, tile)
    if tile == 1:
        assert found["union"] == found["rows"]


def test_tile_overlap_of_no_tokens_and_bad_tile():
    empty = torch.empty(0, 2, 3, dtype=torch.int32)
    none = torch.empty(0, dtype=torch.int64)
    assert tile_overlap(empty, none, none, 0, 4) == {"rows": 0, "union": 0, "candidates": 0}
    with pytest.raises(ValueError, match="tile must be >= 1"):
        tile_overlap(empty, none, none, 0, 0)


def test_recorder_counts_what_the_op_selects():
    """Around the real op: the counts are those of the gate's own selection, and the gate is restored."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 100, 260], dtype=torch.int32)
    q, k, v = (torch.randn(260, 4, 16) for _ in range(3))
    with record_selections(torch.nn.Module(), [1, 8]) as counts:
        moba_attn_varlen(q, k, v, cu, 160, 16, 4)
    layout = block_layout((0, 100, 260), 16, torch.device("cpu"))
    selection = select_blocks(q, block_key_sums(k, layout), layout, 3)
    for tile in (1, 8):
        expected = tile_overlap(selection, layout.token_block, layout.token_first_block, layout.num_blocks, tile)
        assert dict(counts[0][tile]) == expected
    from moba_megatron.ops.moba import gating

    assert gating.select_blocks is select_blocks
    rows = summary(counts)
    assert [(r["layer"], r["tile"]) for r in rows] == [(0, 1), (0, 8), ("all", 1), ("all", 8)]
    assert rows[0]["union_per_row"] == 1.0 and rows[1]["union_per_row"] < 1.0


def test_random_inputs_overlap_to_nearly_dense_tiles():
    """The reference of random inputs: one query selects about top-k of its candidates; a tile of 64
    queries selects nearly all of them."""
    found = random_overlap(4096, 64, 16, [1, 64])
    assert found[1]["union"] == found[1]["rows"]
    assert 0.2 < found[1]["union"] / found[1]["candidates"] < 0.6
    assert found[64]["union"] / found[64]["candidates"] > 0.9


def test_random_overlap_cli(capsys):
    main(["--length", "1024", "--blocks", "64/4", "--tiles", "1,16"])
    out = capsys.readouterr().out
    assert "64 / 4 |" in out and "tile 16" in out
    for bad, message in ((["--blocks", "64x4"], "separated by '/'"), (["--blocks", "64/4/2"], "BLOCK/TOPK"),
                         (["--blocks", "64/0"], "positive"), (["--tiles", "0"], "positive"),
                         (["--length", "0"], "positive"), (["--length", "1024,8"], "one positive")):
        with pytest.raises(SystemExit):
            main(bad)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--selection-tiles", "0,4"], "tiles of at least 1 query"),
    (["--selection-tiles", "4", "--moba-disable"], "drop --moba-disable"),
    (["--selection-tiles", "4", "--tensor-model-parallel-size", "2"], "runs on one rank"),
])
def test_selection_tiles_bad_input(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse([*SMALL, "--load", "ckpt", "--lengths", "256", "--out", "out", *flags])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_needle_eval_writes_the_overlap_by_layer(tmp_path):
    run_job(*SMALL, "--train-iters", "2", "--save", str(tmp_path / "ckpt"), "--eval-iters", "0", nproc=1)
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           "-m", "moba_megatron.eval.needle", *SMALL, "--load", str(tmp_path / "ckpt"), "--lengths", "512",
           "--depths", "0.5", "--samples", "1", "--out", str(out), "--selection-tiles", "1,64"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = json.loads((out / "selection.json").read_text())
    layers = sorted({r["layer"] for r in rows if r["layer"] != "all"})
    assert layers and all(isinstance(n, int) and n >= 1 for n in layers)
    for r in rows:
        assert 0 < r["union"] <= r["rows"] and r["union"] <= r["candidates"]
        if r["tile"] == 1:
            assert r["union_per_row"] == 1.0
    assert "union / rows" in result.stdout
