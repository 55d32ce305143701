"""Training step time, MoBA against full attention on cuDNN (the fastest dense kernel here) and on
FlashAttention-2: the same job, config and data, one after the other on the same GPU, one run.

Each variant is ``moba-pretrain --config CONFIG`` for ``--iters`` steps with a log line per step;
``--moba-chunk-size`` and ``--moba-topk`` set MoBA's blocks (default: the config's); full attention is
``--moba-disable`` (its layers take the fastest dense kernel) and
``--moba-disable --attention-backend flash``. Prints every step's time and the steady state
(median of the steps after ``--warmup``) and each variant's over full-on-cuDNN's.

    python benchmarks/bench_train.py --config configs/gpt-125m-32k.yaml --iters 40 -- --global-batch-size 2
    python benchmarks/bench_train.py --config configs/gpt-125m-32k.yaml --moba-chunk-size 128 --moba-topk 48 \
        --variants moba,full-cudnn -- --global-batch-size 2
    python benchmarks/bench_train.py --config configs/llama3-8b-2layer-1m.yaml --iters 12 -- \\
        --seq-length 131072 --tensor-model-parallel-size 1 --context-parallel-size 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

from provenance import provenance  # this folder is on sys.path when the script runs

STEP = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*elapsed time per iteration \(ms\): ([\d.]+)")
MEMORY = re.compile(r"max allocated: ([\d.]+)")

VARIANTS = {
    "moba": [],
    "moba-cudnn": ["--moba-backend", "cudnn"],
    "moba-fa2": ["--moba-backend", "torch_flash"],
    "full-cudnn": ["--moba-disable"],
    "full-fa2": ["--moba-disable", "--attention-backend", "flash"],
}


def run(config: str, iters: int, extra: list[str], flags: list[str], log_path: str | None) -> tuple[list, float | None]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "moba_megatron.pretrain", "--config", config, "--train-iters", str(iters), "--log-interval", "1",
           "--lr-warmup-iters", "1", "--eval-iters", "0", *extra, *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if log_path:
        with open(log_path, "w") as f:
            f.write(" ".join(cmd) + "\n" + text)
    if proc.returncode != 0:
        print(text[-3000:])
        raise SystemExit(f"{' '.join(flags) or 'moba'}: exit code {proc.returncode}")
    steps = [(int(i), float(ms)) for i, ms in STEP.findall(text)]
    mem = MEMORY.findall(text)
    return steps, float(mem[-1]) / 1024 if mem else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state median")
    p.add_argument("--variants", default="moba,full-cudnn,full-fa2", help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--moba-chunk-size", type=int, help="MoBA's block size (default: the config's)")
    p.add_argument("--moba-topk", type=int, help="MoBA's top-k (default: the config's)")
    p.add_argument("--logs", help="write each variant's full log into this folder")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("extra", nargs="*", help="flags for moba-pretrain (after --)")
    args = p.parse_args()
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"--variants {unknown}: choose from {list(VARIANTS)}")
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
    blocks = [*(["--moba-chunk-size", str(args.moba_chunk_size)] if args.moba_chunk_size else []),
              *(["--moba-topk", str(args.moba_topk)] if args.moba_topk else [])]
    results = {}
    for name in args.variants.split(","):
        log = os.path.join(args.logs, f"{name}.log") if args.logs else None
        flags = VARIANTS[name] if name.startswith("full") else [*VARIANTS[name], *blocks]
        steps, mem = run(args.config, args.iters, args.extra, flags, log)
        times = [ms for i, ms in steps if i > args.warmup]
        results[name] = dict(steps=steps, steady_ms=statistics.median(times) if times else None, max_alloc_gib=mem)
        print(f"{name}: steps " + " ".join(f"{ms:.0f}" for _, ms in steps), flush=True)
    base = results.get("full-cudnn", {}).get("steady_ms")
    print(f"\n{args.config} {' '.join(args.extra)}: steady state = median of steps {args.warmup + 1}-{args.iters}")
    print(f"{'variant':<12}{'step ms':>10}{'vs full-cudnn':>15}{'max alloc GiB':>15}")
    for name, r in results.items():
        ratio = f"{r['steady_ms'] / base:.3f}" if base and r["steady_ms"] else "-"
        mem = f"{r['max_alloc_gib']:.1f}" if r["max_alloc_gib"] is not None else "-"
        print(f"{name:<12}{r['steady_ms'] or float('nan'):>10.1f}{ratio:>15}{mem:>15}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(**provenance(), config=args.config, moba_chunk_size=args.moba_chunk_size,
                           moba_topk=args.moba_topk, extra=args.extra, warmup=args.warmup, results=results),
                      f, indent=1)


if __name__ == "__main__":
    main()
