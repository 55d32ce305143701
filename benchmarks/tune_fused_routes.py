"""Time the fused routed kernels (ops/moba/fused_routes.py) over tile configurations, inside the
whole op (random bf16 inputs, one sequence, the backward forced onto the Triton kernels): each
kernel's sweep runs with the other kernels at their first choice. ``FORWARD_CONFIGS``,
``BACKWARD_CONFIGS`` (``..._SMALL_BLOCKS`` for blocks of at most 256 keys; ``..._HEAD_DIM_64`` for
head dims of at most 64, with ``..._BLOCKS_64_...`` for blocks of 64 keys) and ``BACKWARD_DQ_CONFIGS``
in that file hold the picks.

    python benchmarks/tune_fused_routes.py --seqlen 131072 --chunk 2048 --topk 3
"""

from __future__ import annotations

import argparse

import torch

from moba_megatron import moba_attn_varlen
from moba_megatron.ops.moba import fused_routes
from moba_megatron.ops.varlen import get_backend

from bench_op import timed  # this folder is on sys.path when the script runs

SWEEPS = {
    "FORWARD_CONFIGS": [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 2)],
    "FORWARD_CONFIGS_HEAD_DIM_64": [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 2),
                                    (64, 64, 4, 3)],
    "BACKWARD_CONFIGS": [(64, 64, 4, 2), (128, 64, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2),
                         (32, 128, 8, 2), (128, 64, 8, 2)],
    "BACKWARD_CONFIGS_HEAD_DIM_64": [(128, 64, 4, 2), (64, 64, 4, 2), (256, 64, 4, 2), (128, 32, 4, 2),
                                     (128, 64, 4, 3)],
    "BACKWARD_CONFIGS_SMALL_BLOCKS": [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2), (16, 128, 8, 2),
                                      (32, 128, 4, 2), (32, 128, 8, 3)],
    "BACKWARD_CONFIGS_SMALL_BLOCKS_HEAD_DIM_64": [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2),
                                                  (128, 64, 8, 2)],
    "BACKWARD_CONFIGS_BLOCKS_64_HEAD_DIM_64": [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2),
                                               (32, 64, 4, 2)],
    "BACKWARD_DQ_CONFIGS": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2), (128, 64, 4, 2),
                            (128, 32, 4, 2)],
}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seqlen", type=int, default=128 * 1024)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kernel", action="append", choices=list(SWEEPS), help="default: all")
    args = p.parse_args()
    torch.manual_seed(0)
    t, h, d = args.seqlen, args.heads, args.head_dim
    q, k, v = (torch.randn(t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    cu = torch.tensor([0, t], dtype=torch.int32)
    backend = get_backend(None, q, k)
    backend.tiles_backward_min_chunk = None

    def step():
        for x in (q, k, v):
            x.grad = None
        moba_attn_varlen(q, k, v, cu, t, args.chunk, args.topk).backward(dout)

    print(f"{torch.cuda.get_device_name()}: S={t} chunk={args.chunk} topk={args.topk} H={h} D={d}, fwd+bwd ms")
    for name in args.kernel or list(SWEEPS):
        default = list(getattr(fused_routes, name))
        results = []
        for config in SWEEPS[name]:
            getattr(fused_routes, name)[:] = [config]
            fused_routes._config_in_use.clear()
            try:
                ms = timed(step, 5) * 1e3
            except Exception as e:  # a configuration that does not compile (shared memory, registers)
                print(f"  {name} {config}: failed ({type(e).__name__})")
                continue
            results.append((ms, config))
            print(f"  {name} {config}: {ms:.2f} ms", flush=True)
        getattr(fused_routes, name)[:] = default
        fused_routes._config_in_use.clear()
        if results:
            print(f"best {name}: {min(results)[1]} at {min(results)[0]:.2f} ms; first choice in use: {default[0]}")


if __name__ == "__main__":
    main()
