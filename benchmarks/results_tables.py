"""The current tables of benchmarks/RESULTS.md, generated from the benchmarks' JSON output in
benchmarks/results/ (what `bench_op.py --json` and `bench_train.py --json` write on the GPU).

    python benchmarks/results_tables.py           # rewrite the tables in RESULTS.md
    python benchmarks/results_tables.py --check   # exit 1 if RESULTS.md differs from the JSON (a test runs this)

A table sits between `<!-- table: NAME -->` and `<!-- end table -->` in RESULTS.md; NAME picks the
function below that renders it. Each table names its card, commit, date and command.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
DATA = HERE / "results"
K = 1024


def _load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _source(run: dict) -> str:
    return (f"{run['device']}, commit `{run['commit']}`, {run['date']}, torch {run['torch']}, Triton {run['triton']}: "
            f"`{run['command'].replace('/root/out/', '').replace('$OUT/', '')}`")


def _length(tokens: int) -> str:
    return f"{tokens // (K * K)}M" if tokens >= K * K else f"{tokens // K}K"


def _case(r: dict) -> str:
    gqa = f", GQA {r['heads']} / {r['kv_heads']}" if r["heads"] != r["kv_heads"] else ""
    heads = f"{r['heads']} x {r['head_dim']}" if not gqa else ""
    return f"{_length(r['seqlen'])}, {r['chunk']} / {r['topk']}{gqa}" + (f", {heads}" if heads else "")


def _op_rows(run: dict) -> list[str]:
    """One row per MoBA case: its time and peak against the dense baselines of its shape."""
    rows = run["results"]
    dense = {}
    for r in rows:
        if r["method"] in ("cudnn", "fa2") and not r.get("oom"):
            dense[(r["seqlen"], r["heads"], r["kv_heads"], r["head_dim"], r["method"])] = r
    out = ["| case | MoBA fwd+bwd ms | cuDNN dense ms | MoBA / cuDNN | FA2 dense ms | MoBA peak GB | cuDNN peak GB |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["method"] != "moba":
            continue
        shape = (r["seqlen"], r["heads"], r["kv_heads"], r["head_dim"])
        cudnn, fa2 = dense.get((*shape, "cudnn")), dense.get((*shape, "fa2"))
        cells = [_case(r), f"{r['fwd_bwd_ms']:.1f}",
                 f"{cudnn['fwd_bwd_ms']:.1f}" if cudnn else "-",
                 f"**{r['fwd_bwd_ms'] / cudnn['fwd_bwd_ms']:.3f}**" if cudnn else "-",
                 f"{fa2['fwd_bwd_ms']:.1f}" if fa2 else "-",
                 f"{r['peak_gb']:.2f}", f"{cudnn['peak_gb']:.2f}" if cudnn else "-"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def op_speed() -> list[str]:
    run = _load("op-speed.json")
    return [*_op_rows(run), "", f"Source: {_source(run)}."]


def small_blocks() -> list[str]:
    """The equal-sparsity sweep: one row per length, one column per block / top-k."""
    run = _load("equal-sparsity.json")
    moba = [r for r in run["results"] if r["method"] == "moba"]
    out = []
    for seqlen in sorted({r["seqlen"] for r in moba}):
        row = [r for r in moba if r["seqlen"] == seqlen]
        first = row[0]
        out += [f"{_length(seqlen)} tokens, {first['heads']} heads of {first['head_dim']}, "
                f"{first['chunk'] * first['topk']} keys a query:", "",
                "| block / top-k | " + " | ".join(f"{r['chunk']} / {r['topk']}" for r in row) + " |",
                "|---|" + "---:|" * len(row),
                "| fwd+bwd ms | " + " | ".join(f"{r['fwd_bwd_ms']:.1f}" for r in row) + " |",
                "| over cuDNN dense | " + " | ".join(f"**{r['vs_cudnn']:.2f}**" for r in row) + " |",
                "| peak GB | " + " | ".join(f"{r['peak_gb']:.2f}" for r in row) + " |", ""]
    dense = [r for r in run["results"] if r["method"] == "cudnn"]
    out.append("cuDNN dense fwd+bwd: " + ", ".join(f"{_length(r['seqlen'])} {r['fwd_bwd_ms']:.1f} ms "
                                                  f"(peak {r['peak_gb']:.2f} GB)" for r in dense) + ".")
    out += ["", f"Source: {_source(run)}."]
    return out


def _blocks(run: dict) -> str:
    """MoBA's block / top-k of a training run: its flags (bench_train's own, else the last of those passed
    through to the job after ``--``), else its config's."""
    import yaml

    config = yaml.safe_load((HERE.parent / run["config"]).read_text())
    extra = run.get("extra", [])

    def flag(name: str):
        given = [extra[i + 1] for i, x in enumerate(extra[:-1]) if x == f"--{name.replace('_', '-')}"]
        return run.get(name) or (int(given[-1]) if given else config[name])

    return f"{flag('moba_chunk_size')} / {flag('moba_topk')}"


def training_step() -> list[str]:
    """Steady step times (median after the warm-up steps) of each run, against full attention on
    cuDNN in the same invocation."""
    runs = [("train-125m.json", "125M at 32K, `configs/gpt-125m-32k.yaml`, batch 2"),
            ("train-125m-512-12.json", "the same"),
            ("train-125m-128-48.json", "the same"),
            ("train-8b.json", "two Llama-3-8B-shape layers at 128K, `configs/llama3-8b-2layer-1m.yaml`")]
    out = ["| model | MoBA blocks | MoBA ms a step | full attention (cuDNN) ms | MoBA / full | max allocated GiB, "
           "MoBA / full |", "|---|---|---:|---:|---:|---|"]
    sources = []
    for name, what in runs:
        run = _load(name)
        full = run["results"]["full-cudnn"]
        moba = run["results"]["moba"]
        out.append(f"| {what} | {_blocks(run)} | {moba['steady_ms']:.1f} | {full['steady_ms']:.1f} | "
                   f"**{moba['steady_ms'] / full['steady_ms']:.3f}** | "
                   f"{moba['max_alloc_gib']:.1f} / {full['max_alloc_gib']:.1f} |")
        sources.append(f"- {_source(run)}")
    return [*out, "", "Sources:", *sources]


def retrieval(folder: str = "needle-study") -> list[str]:
    """A retrieval study (`needle_125m.sh`), as `needle_summary.py` prints it, from the files the
    study wrote: each variant's needle.json, and summary.json for its steps and step time."""
    sys.path.insert(0, str(HERE))
    from needle_summary import table

    study = DATA / folder
    meta = json.loads((study / "summary.json").read_text())
    runs = [dict(r, cells=json.loads((study / r["name"] / "needle.json").read_text())) for r in meta["runs"]]
    lengths = sorted({c["length"] for c in runs[0]["cells"]})[-2:]
    return [*table(runs, lengths), "", f"Source: {meta['device']}, commit `{meta['commit']}`, {meta['date']}: "
            f"`{meta['command']}`."]


def selection_trained() -> list[str]:
    """How much a trained gate's selections overlap within tiles of consecutive queries (the needle eval's
    ``--selection-tiles``: one probe of 32K), all MoBA layers pooled: a tile's union of selected blocks over
    its candidates."""
    run = _load("selection-trained.json")
    tiles = sorted({layer["tile"] for r in run["runs"] for layer in r["layers"]})
    out = ["| block / top-k | steps at 32K | " + " | ".join(f"tile of {t}" for t in tiles) + " |",
           "|---|---:|" + "---:|" * len(tiles)]
    for r in run["runs"]:
        pooled = {layer["tile"]: layer["union_per_candidate"] for layer in r["layers"] if layer["layer"] == "all"}
        out.append(f"| {r['blocks']} | {r['steps_at_32k']} | "
                   + " | ".join(f"{pooled[t]:.2f}" for t in tiles) + " |")
    return [*out, "", f"Source: {run['device']}, commit `{run['commit']}`, {run['date']}: `{run['command']}`."]


def gate() -> list[str]:
    """The gate alone through each fused kernel (`bench_op.py --gate`), the default one in bold."""
    runs = [_load("gate-equal-sparsity.json"), _load("gate-256k.json")]
    out = ["| case | insertion ms | threshold ms | (query, head) rows selected differently |",
           "|---|---:|---:|---:|"]
    for run in runs:
        by_case: dict[str, dict] = {}
        for r in run["results"]:
            by_case.setdefault(r["case"], {})[r["kernel"]] = r
        for case, kernels in by_case.items():
            cells = ["-" if r is None else f"**{r['ms']:.2f}**" if r["default"] else f"{r['ms']:.2f}"
                     for r in (kernels.get("insertion"), kernels.get("threshold"))]
            differ = max(r["rows_differing"] for r in kernels.values())
            length, chunk, topk = case.split("-")[:3]
            out.append(f"| {length.upper()} / {chunk} / {topk} | {cells[0]} | {cells[1]} | "
                       f"{differ if len(kernels) > 1 else '-'} |")
    return [*out, "", f"Sources: {_source(runs[0])}; {_source(runs[1])}."]


def union_tiles() -> list[str]:
    """`bench_union_tiles.py`: MoBA as query tiles over their union of blocks, at FlexAttention's rate,
    against the op's per-row kernels; every ratio over cuDNN dense in the same run."""
    run = _load("union-tiles.json")
    rows = run["results"]
    base = {r["method"]: r["ms"] for r in rows if r["method"] in ("cudnn", "flex-causal")}
    op = {(r["chunk"], r["topk"]): r["ms"] for r in rows if r["method"] == "moba"}
    cudnn = base["cudnn"]
    out = ["| block / top-k | selection | key tiles, of dense causal's | union bound ms | over cuDNN | with the gate "
           "| exact masks ms | the op (per row) over cuDNN |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["method"] != "union-tiles":
            continue
        case = (r["chunk"], r["topk"])
        source = "the gate's, random inputs" if r["selection"] == "gate" else f"tiles sharing {r['union']:.2f}"
        exact = f"{r['exact_ms']:.1f}" if "exact_ms" in r else "-"
        per_row = f"**{op[case] / cudnn:.2f}**" if r["selection"] == "gate" else ""
        gated = (r["bound_ms"] + r["gate_ms"]) / cudnn
        out.append(f"| {r['chunk']} / {r['topk']} | {source} | {r['tiles_over_causal']:.2f} | {r['bound_ms']:.1f} | "
                   f"**{r['bound_ms'] / cudnn:.2f}** | {gated:.2f} | {exact} | {per_row} |")
    return [*out, "", f"{_length(run['seqlen'])}, {run['heads']} heads of {run['head_dim']}: cuDNN dense fwd+bwd "
            f"{cudnn:.1f} ms, FlexAttention dense causal {base['flex-causal']:.1f} ms "
            f"({base['flex-causal'] / cudnn:.2f}x).", "", f"Source: {_source(run)}."]


TABLES = {"op-speed": op_speed, "small-blocks": small_blocks, "training-step": training_step,
          "retrieval-seeds": lambda: retrieval("needle-study-seeds"), "retrieval": retrieval,
          "retrieval-small-blocks": lambda: retrieval("needle-study-small-blocks"),
          "retrieval-512-12": lambda: retrieval("needle-study-512-12"),
          "retrieval-another-base": lambda: retrieval("needle-study-another-base"),
          "retrieval-plain": lambda: retrieval("needle-study-plain"), "selection-trained": selection_trained,
          "gate": gate, "union-tiles": union_tiles}
BLOCK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- end table -->)", re.S)


def render(text: str) -> str:
    def table(m: re.Match) -> str:
        if m.group(2) not in TABLES:
            raise SystemExit(f"RESULTS.md names an unknown table {m.group(2)!r}; known: {sorted(TABLES)}")
        return m.group(1) + "\n".join(TABLES[m.group(2)]()) + "\n" + m.group(4)

    return BLOCK.sub(table, text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md's tables differ from the JSON")
    args = parser.parse_args(argv)
    text = RESULTS.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("benchmarks/RESULTS.md's tables differ from benchmarks/results/*.json; run "
                  "python benchmarks/results_tables.py", file=sys.stderr)
            raise SystemExit(1)
        return
    RESULTS.write_text(new)


if __name__ == "__main__":
    main()
