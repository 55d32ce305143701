"""The summary of a retrieval study (`benchmarks/needle_125m.sh OUT ...`): one table, one picture of
every variant's needle heatmap side by side, and the position-wise loss at the longest length.

    python benchmarks/needle_summary.py OUT        # prints the table, writes OUT/summary.json,
                                                   # OUT/heatmaps.png and OUT/position_loss.png

Reads each variant's OUT/NAME/needle.json and position_losses.json (the needle eval's), its
OUT/NAME/variant.json (how the study ran it), and its fine-tune's log (OUT/job-NAME.log, or that of
the ``trained_as`` variant.json names) for the steps at the long length and the step time: the mean
of the logged windows after the first, so a run that ends on full attention counts both phases. A
variant run side by side with others (``PARALLEL=1``) shares the card: its step time is shown as
shared and not compared.

The last column holds a variant against the recommendation bar: parity with full attention
(docs/data-and-eval.md: the mean accuracy at 16K and 32K each within 0.05 of full's, no cell below
0.8 where full's is at least 0.9) and a training step at most ``STEP_BAR`` of full's. Where full
attention itself retrieves almost nothing (``REFERENCE_FLOOR``) it gives no verdict.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

from moba_megatron.eval.needle import draw_heatmap, length_label, wilson_interval

STEP = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*elapsed time per iteration \(ms\): ([\d.]+)")
STEP_BAR = 0.75  # a recommended configuration trains at most this fraction of full attention's step time
# Full attention's mean over its whole grid below this means its base never learnt the probe (chance is
# about 0.02 at the study's vocabulary of 64): beating it says nothing about retrieval, so no verdict.
REFERENCE_FLOOR = 0.25


def load(out: Path, name: str) -> dict:
    cells = json.loads((out / name / "needle.json").read_text())
    positions = out / name / "position_losses.json"
    variant = out / name / "variant.json"
    meta = json.loads(variant.read_text()) if variant.is_file() else {}
    log = out / f"job-{meta.get('trained_as', name)}.log"  # one fine-tune may have two evals
    steps = [(int(i), float(ms)) for i, ms in STEP.findall(log.read_text())] if log.is_file() else []
    return dict(
        name=name,
        cells=cells,
        steps=max((i for i, _ in steps), default=None),
        step_ms=statistics.mean(ms for _, ms in (steps[1:] or steps)) if steps else None,
        shared=bool(meta.get("side_by_side")),
        eval_attention=meta.get("eval_attention"),
        positions=json.loads(positions.read_text()) if positions.is_file() else None,
    )


def mean_at(run: dict, length: int) -> tuple[float, float, float] | None:
    """Mean accuracy over the depths at ``length`` and its 95% Wilson interval over the pooled probes."""
    cells = [c for c in run["cells"] if c["length"] == length]
    if not cells:
        return None
    trials = sum(c.get("probes", 1) for c in cells)
    hits = sum(c["accuracy"] * c.get("probes", 1) for c in cells)
    return (hits / trials, *wilson_interval(hits, trials))


def parity(run: dict, full: dict, lengths: list[int]) -> list[str]:
    """What keeps ``run`` from parity with ``full``: an empty list at parity."""
    gaps = []
    for n in lengths:
        mine, theirs = mean_at(run, n), mean_at(full, n)
        if mine and theirs and mine[0] < theirs[0] - 0.05:
            gaps.append(f"mean at {length_label(n)} {mine[0]:.2f} against {theirs[0]:.2f}")
    for c in run["cells"]:
        ref = next((f for f in full["cells"] if f["length"] == c["length"] and f["depth"] == c["depth"]), None)
        if ref and ref["accuracy"] >= 0.9 and c["accuracy"] < 0.8:
            gaps.append(f"cell {length_label(c['length'])} / {c['depth']:.2f} at {c['accuracy']:.2f}")
    return gaps


def step_ratio(run: dict, full: dict | None) -> float | None:
    """``run``'s step time over full attention's, where both were measured alone on the card."""
    alone = [r for r in (run, full) if r and r["step_ms"] and not r.get("shared")]
    return run["step_ms"] / full["step_ms"] if len(alone) == 2 else None


def verdict(run: dict, full: dict, lengths: list[int]) -> str:
    """``yes`` at parity with a step of at most ``STEP_BAR`` of full's; otherwise what falls short."""
    reference = statistics.mean(c["accuracy"] for c in full["cells"])
    if reference < REFERENCE_FLOOR:
        return f"none: full attention retrieves {reference:.2f} over its grid here, too little to hold it to"
    gaps = parity(run, full, lengths)
    if gaps:
        return "no: " + "; ".join(gaps[:2])
    ratio = step_ratio(run, full)
    if ratio is None:
        return "accuracy only: its step time was not measured alone"
    if ratio > STEP_BAR:
        return f"accuracy only: its step is {ratio:.2f} of full's (the bar: {STEP_BAR})"
    return "yes"


def table(runs: list[dict], lengths: list[int]) -> list[str]:
    full = next((r for r in runs if r["name"] == "full"), None)
    head = ["variant", "steps at the long length", "step ms", "vs full"]
    head += [f"mean at {length_label(n)} [95%]" for n in lengths]
    head += ["worst cell", f"parity, and a step <= {STEP_BAR} of full's"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        ratio = step_ratio(run, full)
        ratio = f"{ratio:.2f}" if ratio is not None else "-"
        means = []
        for n in lengths:
            m = mean_at(run, n)
            means.append(f"{m[0]:.2f} [{m[1]:.2f}, {m[2]:.2f}]" if m else "-")
        worst = min(run["cells"], key=lambda c: (c["accuracy"], -c["length"]))
        verdict_text = "-" if run is full or not full else verdict(run, full, lengths)
        if run is not full and run.get("eval_attention") == "full":
            verdict_text += " (evaluated on full attention)"
        step = f"{run['step_ms']:.0f}" if run["step_ms"] else "-"
        step += " (shared)" if run.get("shared") and run["step_ms"] else ""
        worst_cell = f"{worst['accuracy']:.2f} ({length_label(worst['length'])}, {worst['depth']:.2f})"
        rows.append("| " + " | ".join([run["name"], str(run["steps"] or "-"), step, ratio, *means, worst_cell,
                                       verdict_text]) + " |")
    return rows


def draw(runs: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("needle_summary: no matplotlib; the pictures are skipped (pip install 'moba-megatron[plot]')")
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.2), squeeze=False)
    for ax, run in zip(axes[0], runs):
        draw_heatmap(ax, run["cells"], fontsize=7)
        ax.set_title(run["name"], fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "heatmaps.png", dpi=110)
    plt.close(fig)
    with_positions = [r for r in runs if r["positions"]]
    if with_positions:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for run in with_positions:
            middles = [(p["start"] + p["end"]) / 2 / 1024 for p in run["positions"]]
            ax.plot(middles, [p["loss"] for p in run["positions"]], marker="o", markersize=3, label=run["name"])
        ax.set_xlabel("position (K tokens)")
        ax.set_ylabel("loss")
        ax.set_title("loss by position at the longest length")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "position_loss.png", dpi=110)
        plt.close(fig)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python benchmarks/needle_summary.py OUT")
    out = Path(argv[0])
    names = sorted(p.parent.name for p in out.glob("*/needle.json"))
    if not names:
        raise SystemExit(f"needle_summary: no OUT/*/needle.json under {out}")
    runs = [load(out, n) for n in sorted(names, key=lambda n: (n != "full", n))]
    lengths = sorted({c["length"] for c in runs[0]["cells"]})[-2:]  # the two longest, 16K and 32K in the study
    rows = table(runs, lengths)
    print("\n".join(rows))
    (out / "summary.md").write_text("\n".join(rows) + "\n")
    (out / "summary.json").write_text(json.dumps(
        [{k: r[k] for k in ("name", "steps", "step_ms", "shared", "eval_attention")}
         | {f"mean_{n}": mean_at(r, n) for n in lengths} for r in runs],
        indent=1))
    draw(runs, out)


if __name__ == "__main__":
    main()
