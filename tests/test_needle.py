"""The long-context retrieval eval: its probes, and a run on a checkpoint (2 gloo ranks, TP=2 and
CP=2) writing needle.json and the heatmap."""

import json
import math
import subprocess
import sys
from argparse import Namespace

import pytest

from moba_megatron.eval.needle import PasskeyProbes, SyntheticProbes
from moba_megatron.training.arguments import parse_args
from moba_megatron.training.data import DEFAULT_VOCAB, KEY, QUERY, SyntheticRetrieval
from tests.helpers.job import ROOT, SMALL, bpe_tokenizer, run_job
from tests.helpers.scripts import benchmark_module


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_synthetic_probe_plants_the_needle_at_its_depth(depth):
    probes = SyntheticProbes(Namespace(vocab_size=None, seed=3, seq_length=64, retrieval_pairs=1))
    tokens, answer_at = probes.probe(7, 400, depth)
    assert tokens.shape == (401,) and answer_at == [399]
    at = 1 + round(depth * (401 - 7))
    assert tokens[at] == KEY and tokens[-3] == QUERY
    assert tokens[at + 1] == tokens[-2] and tokens[at + 2] == tokens[-1]  # asked key, answer value


def test_passkey_probe_asks_for_the_hidden_number(tmp_path):
    pytest.importorskip("transformers")
    bpe_tokenizer(
        tmp_path / "tok", "the pass key is 12345 remember it what is the grass sky sun green blue yellow\n" * 20
    )
    probes = PasskeyProbes(Namespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tok"),
                                     vocab_size=None))
    tokens, answer_at = probes.probe(3, 300, 0.5)
    assert tokens.shape == (301,)
    text = probes.tok.detokenize(tokens.tolist())
    key = probes.tok.detokenize(tokens[answer_at[0] + 1 :].tolist()).strip()
    assert key.isdigit() and len(key) == 5 and f"The pass key is {key}." in text
    assert text.index(f"The pass key is {key}.") < len(text) * 0.7 and text.endswith(f"The pass key is {key}")
    with pytest.raises(ValueError, match="too short for the passkey text"):
        probes.probe(0, 20, 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"],
                                    ["--context-parallel-size", "2", "--moba-key-conv", "3"]])
def test_eval_writes_accuracy_by_length_and_depth(tmp_path, layout):
    """The eval of a checkpoint at TP=2, and of one with the key convolution at CP=2."""
    conv = layout[layout.index("--moba-key-conv") :] if "--moba-key-conv" in layout else []
    run_job(*SMALL, *conv, "--train-iters", "2", "--save", str(tmp_path / "ckpt"), "--eval-iters", "0")
    job = parse_args(list(SMALL))
    seq_length, pairs = job.seq_length, job.retrieval_pairs
    task = SyntheticRetrieval(job.vocab_size or DEFAULT_VOCAB, seq_length, job.seed, pairs)
    for flags in ([], ["--moba-disable"]):
        out = tmp_path / ("full" if flags else "moba")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "moba_megatron.eval.needle", *SMALL, *layout, "--load", str(tmp_path / "ckpt"),
               "--lengths", "256,512", "--depths", "0,0.5,1", "--samples", "2", "--out", str(out), *flags,
               "--token-losses", "2"]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        found = json.loads((out / "needle.json").read_text())
        assert [(r["length"], r["depth"]) for r in found] == [(n, d) for n in (256, 512) for d in (0.0, 0.5, 1.0)]
        assert all(r["accuracy"] in (0.0, 0.5, 1.0) for r in found)
        assert (out / "needle.png").stat().st_size > 0
        assert ("full attention" if flags else "MoBA 64/3") in result.stdout
        losses = {r["kind"]: r for r in json.loads((out / "token_losses.json").read_text())}
        assert list(losses) == list(SyntheticRetrieval.KINDS)
        assert sum(r["tokens"] for r in losses.values()) == 2 * seq_length  # every label once, over the ranks
        assert losses["question value"]["tokens"] == 2 * pairs
        assert all(r["loss"] > 0 and 0 <= r["accuracy"] <= 1 for r in losses.values())
        assert losses["question value"]["chance_loss"] == pytest.approx(math.log(task.vocab_size - task.first_filler))
        spans = json.loads((out / "position_losses.json").read_text())
        assert [r["start"] for r in spans] == [seq_length * b // 16 for b in range(16)]
        assert sum(r["tokens"] for r in spans) == 2 * seq_length and all(r["loss"] > 0 for r in spans)
        for r in found:  # each cell's 95% Wilson interval holds its accuracy
            assert r["probes"] == 2 and r["interval"][0] <= r["accuracy"] <= r["interval"][1]


def test_without_matplotlib_the_json_and_one_line(tmp_path, monkeypatch):
    from moba_megatron.eval import needle

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert needle.heatmap([{"length": 8, "depth": 0.0, "accuracy": 1.0}], tmp_path / "x.png", "t") is False
    assert not (tmp_path / "x.png").exists()


def test_wilson_interval():
    from moba_megatron.eval.needle import wilson_interval

    low, high = wilson_interval(12, 24)
    assert low == pytest.approx(0.314, abs=1e-3) and high == pytest.approx(0.686, abs=1e-3)
    assert wilson_interval(24, 24)[1] == 1.0 and wilson_interval(24, 24)[0] == pytest.approx(0.862, abs=1e-3)
    assert wilson_interval(0, 6)[0] == 0.0 and wilson_interval(0, 6)[1] == pytest.approx(0.390, abs=1e-3)


@pytest.mark.parametrize("variant", ["moba:128", "full:sd=1", "moba:128:48:conv"])
def test_study_refuses_a_variant_it_cannot_parse(tmp_path, variant):
    """benchmarks/needle_125m.sh checks every variant before it starts a job."""
    script = ROOT / "benchmarks" / "needle_125m.sh"
    run = subprocess.run(["bash", str(script), str(tmp_path), "full:seed=2", variant], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert f"cannot parse variant '{variant}'" in run.stderr and ":seed=N" in run.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


def _study_run(name, accuracy, step_ms, shared=False, eval_attention="moba"):
    """A study row: ``accuracy`` maps (length, depth) to a cell's accuracy."""
    cells = [{"length": n, "depth": d, "accuracy": a, "probes": 24} for (n, d), a in accuracy.items()]
    return dict(name=name, cells=cells, steps=200, step_ms=step_ms, shared=shared, eval_attention=eval_attention)


FULL_CELLS = {(16384, 0.0): 1.0, (16384, 1.0): 0.5, (32768, 0.0): 0.75, (32768, 1.0): 0.75}


@pytest.mark.parametrize("accuracy, step_ms, shared, expected", [
    (FULL_CELLS, 300.0, False, "yes"),
    (FULL_CELLS, 380.0, False, "accuracy only: its step is 0.76 of full's"),
    (FULL_CELLS, 300.0, True, "accuracy only: its step time was not measured alone"),
    ({**FULL_CELLS, (16384, 0.0): 0.75, (16384, 1.0): 0.75}, 300.0, False, "no: cell 16K / 0.00 at 0.75"),
    ({**FULL_CELLS, (32768, 1.0): 0.625}, 300.0, False, "no: mean at 32K 0.69 against 0.75"),
])
def test_study_verdict_holds_parity_and_the_step_bar(accuracy, step_ms, shared, expected):
    """needle_summary's last column: parity by DESIGN (means within 0.05, no cell under 0.8 where full's
    is at least 0.9) and a step of at most 0.75 of full's, measured alone."""
    summary = benchmark_module("needle_summary")
    full = _study_run("full", FULL_CELLS, 500.0, eval_attention="full")
    run = _study_run("moba", accuracy, step_ms, shared)
    assert summary.verdict(run, full, [16384, 32768]).startswith(expected)
    row = summary.table([full, run], [16384, 32768])[-1]
    assert ("(shared)" in row) == shared and ("| - |" in row) == shared  # a shared step is not compared


def test_study_gives_no_verdict_against_a_full_run_that_never_retrieves():
    """A base whose full-attention fine-tune finds almost no needle is no reference: a MoBA variant that
    beats it is not at parity with anything."""
    summary = benchmark_module("needle_summary")
    full = _study_run("full", {cell: 0.08 for cell in FULL_CELLS}, 500.0, eval_attention="full")
    run = _study_run("moba", {cell: 0.2 for cell in FULL_CELLS}, 300.0)
    assert summary.verdict(run, full, [16384, 32768]).startswith("none: full attention retrieves 0.08")
    full = _study_run("full", {cell: 0.3 for cell in FULL_CELLS}, 500.0, eval_attention="full")
    assert summary.verdict(run, full, [16384, 32768]).startswith("no: mean at 16K 0.20 against 0.30")


def test_study_summary_reads_how_each_variant_ran(tmp_path):
    """The step time is the mean of the logged windows after the first (a run that switches to full
    attention counts both phases), and variant.json marks shared steps and full-attention evals."""
    summary = benchmark_module("needle_summary")
    for name, windows, meta in (("full", [900, 500, 500, 500], {"side_by_side": False, "eval_attention": "full"}),
                                ("moba-1-2-full-from40", [900, 600, 600, 300], {"side_by_side": False,
                                                                                 "eval_attention": "full"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "needle.json").write_text(json.dumps(
            [{"length": n, "depth": d, "accuracy": a, "probes": 24} for (n, d), a in FULL_CELLS.items()]))
        (tmp_path / name / "variant.json").write_text(json.dumps(meta))
        (tmp_path / f"job-{name}.log").write_text("".join(
            f" iteration {20 * (i + 1):8d}/      80 | consumed samples: 40 | "
            f"elapsed time per iteration (ms): {ms:.1f} | learning rate: 3E-04\n" for i, ms in enumerate(windows)))
    summary.main([str(tmp_path)])
    rows = {r["name"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert rows["full"]["step_ms"] == pytest.approx(500.0) and rows["full"]["steps"] == 80
    assert rows["moba-1-2-full-from40"]["step_ms"] == pytest.approx(500.0)  # the mean; the median says 600
    table = (tmp_path / "summary.md").read_text()
    assert "| moba-1-2-full-from40 | 80 | 500 | 1.00 |" in table and "(evaluated on full attention)" in table
