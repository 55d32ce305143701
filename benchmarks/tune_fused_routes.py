"""Time the fused routed forward kernel (ops/moba/fused_routes.py) over tile configurations, on the
real routing of a MoBA problem (random bf16 inputs, one sequence), and the merge kernel beside it.
``FORWARD_CONFIGS`` in that file holds the picks.

    python benchmarks/tune_fused_routes.py --seqlen 131072 --chunk 2048 --topk 3
"""

from __future__ import annotations

import argparse

import torch

from bench_op import timed  # this folder is on sys.path when the script runs
from moba_megatron.ops.moba import fused_routes
from moba_megatron.ops.moba.gating import block_key_sums, select_blocks
from moba_megatron.ops.moba.layout import block_layout
from moba_megatron.ops.moba.routing import SelectionCounts, plan_groups

SWEEP = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 2),
         (64, 64, 4, 4), (128, 128, 8, 3)]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seqlen", type=int, default=128 * 1024)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    t, h, d = args.seqlen, args.heads, args.head_dim
    q, k, v = (torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    layout = block_layout((0, t), args.chunk, q.device)
    slots = min(args.topk - 1, layout.max_candidates)
    sel = select_blocks(q, block_key_sums(k, layout), layout, slots)
    counts = SelectionCounts(sel, layout.num_blocks)
    groups = plan_groups(sel, counts, h, d)
    print(f"{torch.cuda.get_device_name()}: S={t} chunk={args.chunk} topk={args.topk} H={h} D={d}, "
          f"{sum(map(sum, counts.wait()))} routed rows in {len(groups)} head group(s)")

    def forward():
        return [fused_routes.routed_forward(q, k, v, g.order, g.run_counts, g.h0, g.h1 - g.h0, layout.block_starts_dev,
                                            args.chunk, slots, d**-0.5) for g in groups]

    default = list(fused_routes.FORWARD_CONFIGS)
    results = []
    for config in SWEEP:
        fused_routes.FORWARD_CONFIGS[:] = [config]
        fused_routes._config_in_use.clear()
        try:
            ms = timed(forward, 5) * 1e3
        except Exception as e:  # a configuration that does not compile (shared memory, registers)
            print(f"  forward {config}: failed ({type(e).__name__})")
            continue
        results.append((ms, config))
        print(f"  forward {config}: {ms:.2f} ms")
    fused_routes.FORWARD_CONFIGS[:] = default
    fused_routes._config_in_use.clear()
    print(f"best forward: {min(results)[1]} at {min(results)[0]:.2f} ms; first choice in use: {default[0]}")
    grids = forward()
    out = torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(h, t, device="cuda")
    merge_ms = 1e3 * timed(lambda: [fused_routes.merge_into(out, lse, g.h0, g.h1 - g.h0, *grid, slots)
                                    for g, grid in zip(groups, grids)], 5)
    print(f"merge: {merge_ms:.2f} ms")


if __name__ == "__main__":
    main()
