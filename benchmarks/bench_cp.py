"""MoBA under context parallelism: per-layer attention at CP=1 (one GPU), CP=2 and CP=4, in both
exchange modes, same machine, same shapes.

Prints forward and forward+backward time, bytes each rank sends to other ranks (forward, backward),
per-rank work balance (rows each rank attends to routed blocks, max/mean), scaling efficiency
``t(CP=1) / (cp * t(CP))`` on forward+backward, and the mode ``moba_cp_comm="auto"`` picks.

    torchrun --nproc-per-node 4 benchmarks/bench_cp.py --out cp.json
    torchrun --nproc-per-node 2 benchmarks/bench_cp.py --device cpu --small     # a smoke run, gloo

At CP=2 on 4 GPUs, ranks {0,1} and {2,3} run the same problem side by side; rank 0's group reports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from moba_megatron import moba_attn_varlen
from moba_megatron.parallel import choose_cp_comm, moba_attn_cp

K = 1024


@dataclass
class Case:
    name: str
    seq: int
    chunk: int
    topk: int
    hq: int = 8
    hkv: int = 8
    d: int = 128
    cps: tuple = (2, 4)
    modes: tuple = ("allgather", "routed")


CASES = [
    Case("1m-4096-12", 1024 * K, 4096, 12),
    Case("512k-4096-3 (routing should win at CP=4)", 512 * K, 4096, 3),
    Case("512k-4096-12", 512 * K, 4096, 12),
    Case("1m-4096-12-hkv2", 1024 * K, 4096, 12, hkv=2),
    Case("512k-4096-12-hkv2", 512 * K, 4096, 12, hkv=2),
]
SMALL = [Case("smoke", 4 * K, 64, 4, hq=4, hkv=2, d=32), Case("smoke-topk2", 4 * K, 64, 2, hq=4, hkv=4, d=32)]


def timed(fn, reps: int, device: str, group_wide: bool) -> float:
    """Seconds per call; with ``group_wide``, the slowest rank's (collectives keep ranks in step)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    if group_wide:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = torch.tensor((time.perf_counter() - t0) / reps, device=device)
    if group_wide:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(seconds)


def inputs(case: Case, tokens: int, device: str, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def rand(h):
        return torch.randn(tokens, h, case.d, generator=g, device=device, dtype=dtype)

    return [rand(case.hq).requires_grad_(), rand(case.hkv).requires_grad_(), rand(case.hkv).requires_grad_()], rand(
        case.hq
    )


def measure(call, qkv, dout, reps, device, group_wide=True):
    def fwd():
        with torch.no_grad():
            call(*qkv)

    def fwd_bwd():
        for x in qkv:
            x.grad = None
        call(*qkv).backward(dout)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fwd_s, step_s = timed(fwd, reps, device, group_wide), timed(fwd_bwd, reps, device, group_wide)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return fwd_s, step_s, peak


def single_gpu(case: Case, reps: int, device: str, backend):
    """CP=1 on rank 0 while the others wait; None where it does not fit."""
    result = torch.zeros(3, dtype=torch.float64, device=device)
    if dist.get_rank() == 0:
        qkv, dout = inputs(case, case.seq, device, 0)
        cu = torch.tensor([0, case.seq], dtype=torch.int32, device=device)
        try:
            result += torch.tensor(measure(
                lambda q, k, v: moba_attn_varlen(q, k, v, cu, case.seq, case.chunk, case.topk, backend=backend),
                qkv, dout, reps, device, group_wide=False,
            ), dtype=torch.float64, device=device)
        except torch.cuda.OutOfMemoryError:
            result.fill_(float("nan"))
        del qkv, dout
        if device == "cuda":
            torch.cuda.empty_cache()
    dist.broadcast(result, 0)
    return result.tolist()


def context_parallel(case: Case, cp: int, mode: str, groups, reps: int, device: str, backend):
    rank = dist.get_rank()
    group = groups[cp][rank // cp]
    qkv, dout = inputs(case, case.seq // cp, device, rank)
    stats: dict = {}
    fwd_s, step_s, peak = measure(
        lambda q, k, v: moba_attn_cp(q, k, v, 1, case.seq, case.chunk, case.topk, group=group, comm=mode,
                                     backend=backend, stats=stats),
        qkv, dout, reps, device,
    )
    calls = 2 * (reps + 1)  # forward-only and forward+backward calls, warm-up included
    per_call = {key: value / (reps + 1 if key.startswith("backward") else calls) for key, value in stats.items()}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, per_call)
    mine = everyone[: cp]  # rank 0's group
    rows = [s["forward_rows_attended"] for s in mine]
    return {
        "forward_s": fwd_s,
        "forward_backward_s": step_s,
        "peak_gib": peak,
        "forward_bytes_per_rank": max(s["forward_bytes_sent"] for s in mine),
        "backward_bytes_per_rank": max(s["backward_bytes_sent"] for s in mine),
        "work_balance": max(rows) / max(1e-9, sum(rows) / len(rows)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--case", action="append", help="run only cases whose name starts with this")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--skip-single", action="store_true", help="no CP=1 baseline")
    parser.add_argument("--out", default=None, help="append JSON lines here (rank 0)")
    args = parser.parse_args()
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=3))
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = {
        cp: [dist.new_group(list(range(g, g + cp))) for g in range(0, world, cp)] for cp in (2, 4) if world % cp == 0
    }
    cases = SMALL if args.small else CASES
    if args.case:
        cases = [c for c in cases if any(c.name.startswith(p) for p in args.case)]
    if rank == 0:
        gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        print(f"# {world} x {gpu}, torch {torch.__version__}", flush=True)
    for case in cases:
        single = [float("nan")] * 3 if args.skip_single else single_gpu(case, args.reps, device, args.backend)
        if rank == 0:
            print(f"\n## {case.name}: S={case.seq} chunk={case.chunk} topk={case.topk} "
                  f"Hq={case.hq} Hkv={case.hkv} D={case.d}")
            print(
                f"CP=1: fwd {single[0] * 1e3:.1f} ms, fwd+bwd {single[1] * 1e3:.1f} ms, peak {single[2]:.1f} GiB",
                flush=True,
            )
        for cp in case.cps:
            if cp not in groups:
                continue
            auto = choose_cp_comm(case.seq, cp, case.topk, case.hq, case.hkv, case.d)
            for mode in case.modes:
                r = context_parallel(case, cp, mode, groups, args.reps, device, args.backend)
                r["scaling_efficiency"] = single[1] / (cp * r["forward_backward_s"])
                if rank == 0:
                    print(
                        f"CP={cp} {mode:9s}{' (auto)' if mode == auto else '       '}: "
                        f"fwd {r['forward_s'] * 1e3:.1f} ms, "
                        f"fwd+bwd {r['forward_backward_s'] * 1e3:.1f} ms, peak {r['peak_gib']:.1f} GiB, "
                        f"sent/rank fwd {r['forward_bytes_per_rank'] / 2**20:.1f} MiB "
                        f"bwd {r['backward_bytes_per_rank'] / 2**20:.1f} MiB, "
                        f"balance {r['work_balance']:.3f}, efficiency {r['scaling_efficiency']:.2f}",
                        flush=True,
                    )
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps({"case": asdict(case), "cp": cp, "mode": mode, "auto": auto,
                                                "single": single, **r}) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
