"""MoBA op vs dense causal attention (cuDNN SDPA, the fastest dense kernel here, and
FlashAttention-2), same GPU, same inputs, one run.

Prints forward and forward+backward time, peak memory beyond the inputs, TFLOP/s counted on the
FLOPs each method actually needs (MoBA: its selected keys; dense: the causal triangle), and each
method's fwd+bwd time over cuDNN dense's in the same run.

    python benchmarks/bench_op.py                 # the op-speed cases of benchmarks/RESULTS.md
    python benchmarks/bench_op.py --sweep equal-sparsity  # small blocks: block x top-k fixed, 32K and 128K
    python benchmarks/bench_op.py --case 128k-4096-12 --profile
    python benchmarks/bench_op.py --backward both # also MoBA with each routed backward (Triton, tiles)
    python benchmarks/bench_op.py --sweep equal-sparsity --gate  # the gate alone, by kernel

The dense baselines run once per shape (length, heads, head dim) and every MoBA case of that shape
is compared with them.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from moba_megatron import moba_attn_varlen

from provenance import provenance  # this folder is on sys.path when the script runs

K = 1024


@dataclass
class Case:
    name: str
    seqlen: int
    chunk: int
    topk: int
    hq: int = 8
    hkv: int = 8
    d: int | None = None  # head dim; None: --head-dim
    dense: bool = False  # also time the dense baselines at this shape (where no case before did)


CASES = [
    Case("32k-2048-3-h12d64", 32 * K, 2048, 3, hq=12, hkv=12, d=64, dense=True),  # the 125M config's layers
    Case("32k-512-3", 32 * K, 512, 3, dense=True),
    Case("128k-4096-12", 128 * K, 4096, 12, dense=True),
    Case("128k-2048-3", 128 * K, 2048, 3),
    Case("128k-128-8", 128 * K, 128, 8, dense=True),
    Case("256k-128-8", 256 * K, 128, 8, dense=True),
    Case("128k-4096-12-gqa32x8", 128 * K, 4096, 12, hq=32, hkv=8),
    Case("512k-8192-3", 512 * K, 8192, 3),
    Case("512k-4096-12", 512 * K, 4096, 12, dense=True),
    Case("1m-4096-12", 1024 * K, 4096, 12),
]

# Small blocks at equal sparsity: every case attends the same keys a query (6144 at 32K, 49152 at 128K).
EQUAL_SPARSITY = [
    *(Case(f"32k-{c}-{k}-h12d64", 32 * K, c, k, hq=12, hkv=12, d=64, dense=True)
      for c, k in ((2048, 3), (512, 12), (256, 24), (128, 48), (64, 96))),
    *(Case(f"128k-{c}-{k}", 128 * K, c, k, dense=True) for c, k in ((4096, 12), (1024, 48), (512, 96), (128, 384))),
]
SWEEPS = {"op-speed": CASES, "equal-sparsity": EQUAL_SPARSITY}


def moba_flops(seqlen: int, chunk: int, topk: int, heads: int, d: int) -> float:
    """Forward FLOPs of the keys MoBA attends: own block causally plus up to topk-1 full blocks."""
    total_keys = 0
    for b in range(math.ceil(seqlen / chunk)):
        n = min(chunk, seqlen - b * chunk)
        total_keys += n * (n + 1) // 2 + n * min(b, topk - 1) * chunk
    return 4.0 * d * heads * total_keys


def dense_flops(seqlen: int, heads: int, d: int) -> float:
    return 4.0 * d * heads * seqlen * (seqlen + 1) / 2


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def measure(forward, inputs, dout, reps):
    def fwd():
        with torch.no_grad():
            forward(*inputs)

    def fwd_bwd():
        for x in inputs:
            x.grad = None
        forward(*inputs).backward(dout)

    t_fwd = timed(fwd, reps)
    t_all = timed(fwd_bwd, reps)
    for x in inputs:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for x in inputs:
        x.grad = None
    return t_fwd, t_all, peak


def dense_causal(q, k, v, sdpa_backend=SDPBackend.CUDNN_ATTENTION):
    """Dense causal attention of ``[T, H, D]`` q, k, v through one SDPA backend (cuDNN: the fastest here)."""
    with sdpa_kernel(sdpa_backend):
        x = [y.unsqueeze(0).transpose(1, 2) for y in (q, k, v)]
        return torch.nn.functional.scaled_dot_product_attention(*x, is_causal=True).transpose(1, 2)[0]


def moba_variants(backend: str | None, backward: str):
    """(label, backend name, tiles_backward_min_chunk override or "keep") of the MoBA runs."""
    if backward == "default":
        return [("moba", backend, "keep")]
    modes = {"triton": [("moba-tri", None)], "tiles": [("moba-til", 0)]}
    modes["both"] = modes["triton"] + modes["tiles"]
    return [("moba", backend, "keep")] + [(label, backend, m) for label, m in modes[backward]]


def run_case(case: Case, d: int, reps: int, profile: bool, dense_done: dict, backend: str | None = None,
             backward: str = "default"):
    """Rows ``(method, fwd s, fwd+bwd s, peak bytes, FLOPs)``: MoBA's, then the dense baselines' where
    ``dense_done`` (shape -> dense rows, filled here) holds none for this shape yet."""
    from moba_megatron.ops.varlen import get_backend

    torch.manual_seed(0)
    t = case.seqlen
    d = case.d or d
    q = torch.randn(t, case.hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(t, case.hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(t, case.hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(q)
    cu = torch.tensor([0, t], dtype=torch.int32)  # on the host, as MoBAAttention passes it: no sync
    rows = []
    flops = moba_flops(t, case.chunk, case.topk, case.hq, d)
    impl = get_backend(backend, q, k)
    keep = impl.tiles_backward_min_chunk
    for label, name, min_chunk in moba_variants(backend, backward):
        impl.tiles_backward_min_chunk = keep if min_chunk == "keep" else min_chunk

        def moba(q, k, v):
            return moba_attn_varlen(q, k, v, cu, t, case.chunk, case.topk, backend=name)

        try:
            t_fwd, t_all, peak = measure(moba, (q, k, v), dout, reps)
            rows.append((label, t_fwd, t_all, peak, flops))
        except torch.OutOfMemoryError:
            rows.append((label, None, None, None, None))
        if profile and label == "moba":
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof

            with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                moba(q, k, v).backward(dout)
                torch.cuda.synchronize()
            print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
        torch.cuda.empty_cache()
    impl.tiles_backward_min_chunk = keep
    shape = (t, case.hq, case.hkv, d)
    first_dense = len(rows)
    if case.dense and shape not in dense_done:
        baselines = [("cudnn", SDPBackend.CUDNN_ATTENTION)]
        if t <= 256 * K:  # FA2 is ~1.6x cuDNN here; past 256K it only costs device time
            baselines.append(("fa2", SDPBackend.FLASH_ATTENTION))
        for name, sdpa_backend in baselines:
            if case.hq != case.hkv:
                continue

            def dense(q, k, v, sdpa_backend=sdpa_backend):
                return dense_causal(q, k, v, sdpa_backend)

            try:
                t_fwd, t_all, peak = measure(dense, (q, k, v), dout, max(1, reps // 2))
                rows.append((name, t_fwd, t_all, peak, dense_flops(t, case.hq, d)))
            except torch.OutOfMemoryError:
                rows.append((name, None, None, None, None))
            torch.cuda.empty_cache()
        dense_done[shape] = rows[first_dense:]
    return rows


def gate_times(case: Case, d: int, reps: int) -> list[dict]:
    """The gate alone (all heads in one call) through each fused kernel that takes the case, and the
    selections' agreement with the default kernel's."""
    from moba_megatron.ops.moba import fused_gate
    from moba_megatron.ops.moba.gating import block_key_sums
    from moba_megatron.ops.moba.layout import block_layout

    torch.manual_seed(0)
    d = case.d or d
    q = torch.randn(case.seqlen, case.hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(case.seqlen, case.hkv, d, device="cuda", dtype=torch.bfloat16)
    layout = block_layout((0, case.seqlen), case.chunk, q.device)
    sums = block_key_sums(k, layout)
    slots = min(case.topk - 1, layout.max_candidates)
    default = fused_gate.default_kernel(slots, layout.max_candidates)
    rows, chosen = [], {}
    for kernel in fused_gate.kernels_for(slots, layout.max_candidates):
        def gate(kernel=kernel):
            return fused_gate.select_blocks_fused(q, sums, layout.token_block, layout.token_first_block, slots,
                                                  layout.max_candidates, kernel=kernel)

        chosen[kernel] = gate()
        rows.append(dict(case=case.name, kernel=kernel, default=kernel == default, ms=timed(gate, reps) * 1e3))
    for row in rows:
        row["rows_differing"] = int((chosen[row["kernel"]] != chosen[default]).any(-1).sum())
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", choices=list(SWEEPS), default="op-speed", help="which cases (default: op-speed)")
    parser.add_argument("--case", action="append", help="case name(s) of the sweep; default: all of it")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print a kernel profile of MoBA fwd+bwd")
    parser.add_argument("--backend", default=None, help="MoBA backend (default: the best available)")
    parser.add_argument("--backward", choices=["default", "triton", "tiles", "both"], default="default",
                        help="also time MoBA with the routed backward forced to the Triton kernel or the tiles")
    parser.add_argument("--gate", action="store_true",
                        help="time the gate alone through each fused kernel, not the op")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    sweep = SWEEPS[args.sweep]
    unknown = sorted(set(args.case or []) - {c.name for c in sweep})
    if unknown:
        parser.error(f"--case {unknown} not in --sweep {args.sweep}: choose from {[c.name for c in sweep]}")
    cases = [c for c in sweep if not args.case or c.name in args.case]
    if args.gate:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 random inputs; "
              "rows differing: (query, head) rows whose selection differs from the default kernel's")
        print(f"{'case':<22}{'kernel':<11}{'ms':>8}{'rows differing':>16}")
        results = []
        for case in cases:
            for row in gate_times(case, args.head_dim, args.reps):
                mark = " (default)" if row["default"] else ""
                print(f"{row['case']:<22}{row['kernel']:<11}{row['ms']:>8.2f}{row['rows_differing']:>16}{mark}",
                      flush=True)
                results.append(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(**provenance(), sweep=args.sweep, gate=True, results=results), f, indent=1)
        return
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, "
          f"MoBA backend {args.backend or 'default'}; 'vs cuDNN': fwd+bwd time over cuDNN dense's, same run")
    header = (f"{'case':<22}{'method':<10}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak GB':>9}{'fwd TF/s':>10}"
              f"{'f+b TF/s':>10}{'vs cuDNN':>10}")
    print(header, flush=True)
    results, dense_done = [], {}
    for case in cases:
        rows = run_case(case, args.head_dim, args.reps, args.profile, dense_done, args.backend, args.backward)
        dense = dense_done.get((case.seqlen, case.hq, case.hkv, case.d or args.head_dim), [])
        cudnn = next((r[2] for r in dense if r[0] == "cudnn" and r[2] is not None), None)
        for name, t_fwd, t_all, peak, flops in rows:
            if t_fwd is None:
                print(f"{case.name:<22}{name:<10}{'out of memory':>30}")
                results.append(dict(case=case.name, method=name, oom=True))
                continue
            ratio = f"{t_all / cudnn:.3f}" if cudnn else "-"
            print(
                f"{case.name:<22}{name:<10}{t_fwd * 1e3:>9.1f}{t_all * 1e3:>12.1f}{peak / 1e9:>9.2f}"
                f"{flops / t_fwd / 1e12:>10.0f}{3.5 * flops / t_all / 1e12:>10.0f}{ratio:>10}", flush=True
            )
            results.append(dict(case=case.name, method=name, seqlen=case.seqlen, chunk=case.chunk, topk=case.topk,
                                heads=case.hq, kv_heads=case.hkv, head_dim=case.d or args.head_dim,
                                fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_all * 1e3,
                                peak_gb=peak / 1e9, fwd_tflops=flops / t_fwd / 1e12,
                                fwd_bwd_tflops=3.5 * flops / t_all / 1e12,
                                vs_cudnn=t_all / cudnn if cudnn else None))
    if args.sweep == "equal-sparsity":
        print_sweep(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(**provenance(), sweep=args.sweep, results=results), f, indent=1)


def print_sweep(results: list[dict]) -> None:
    """The equal-sparsity tables: MoBA's fwd+bwd over cuDNN dense's, one row per length."""
    moba = [r for r in results if r["method"] == "moba" and not r.get("oom")]
    for seqlen in sorted({r["seqlen"] for r in moba}):
        row = [r for r in moba if r["seqlen"] == seqlen]
        keys = row[0]["chunk"] * row[0]["topk"]
        print(f"\n{seqlen // K}K, {row[0]['heads']} x {row[0]['head_dim']}, {keys} keys a query")
        print("| block / top-k | " + " | ".join(f"{r['chunk']} / {r['topk']}" for r in row) + " |")
        print("|---|" + "---|" * len(row))
        ratios = [f"{r['vs_cudnn']:.2f}" if r["vs_cudnn"] else "-" for r in row]
        print("| fwd+bwd vs cuDNN | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
