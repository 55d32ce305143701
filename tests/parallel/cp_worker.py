"""Context-parallel MoBA against the single-device op: every rank runs ``moba_attn_cp`` on its
share of the sequences and compares its output and q/k/v gradients with the slice of the
single-device result (``moba_attn_varlen`` on whole sequences, same inputs, same backend).

With ``tp > 1`` the heads are split over tensor-parallel ranks as Megatron does, and each TP rank's
CP group exchanges only its heads.

CPU/gloo (tests spawn it):  see tests/parallel/test_cp_attention.py
GPU/NCCL:                   torchrun --nproc-per-node 4 -m tests.parallel.cp_worker --cp 4 --device cuda --out cp4.pt
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Case:
    batch: int = 1
    seq: int = 64
    chunk: int = 4
    topk: int = 3
    hq: int = 4
    hkv: int = 2
    d: int = 16
    dtype: str = "float32"
    comm: str = "routed"
    round_rows: int = 0  # > 0: routed exchange rounds of this many rows (default: the module's)
    backend: str | None = None  # a tests/ops/backends.py backend, else the run's


CPU_CASES = [
    Case(topk=1),
    Case(topk=3, comm="routed"),
    Case(topk=3, comm="allgather"),
    Case(topk=3, comm="routed", round_rows=37),  # several exchange rounds, uneven across ranks
    Case(topk=2, hq=4, hkv=1, comm="routed"),  # GQA 4
    Case(topk=100, comm="routed"),  # topk beyond the blocks: dense causal
    Case(topk=100, comm="allgather"),
    Case(batch=2, seq=32, chunk=2, topk=4, hq=2, hkv=2, comm="routed"),
    Case(batch=2, seq=32, chunk=2, topk=4, hq=2, hkv=2, comm="auto"),
    # The fused Triton routed kernels (the CUDA backends' path), run by Triton's interpreter.
    Case(seq=128, chunk=16, topk=3, comm="routed", backend="fused_torch"),
    Case(seq=128, chunk=16, topk=3, comm="routed", round_rows=37, backend="fused_padded_torch"),
    Case(batch=2, seq=128, chunk=16, topk=4, hkv=1, comm="allgather", backend="fused_padded_torch"),
]

GPU_CASES = [
    Case(batch=1, seq=32768, chunk=1024, topk=4, hq=8, hkv=2, d=128, dtype="bfloat16", comm=comm)
    for comm in ("routed", "allgather")
] + [
    Case(batch=2, seq=16384, chunk=512, topk=1, hq=4, hkv=4, d=64, dtype="bfloat16", comm="routed"),
    Case(batch=1, seq=16384, chunk=1024, topk=64, hq=4, hkv=4, d=64, dtype="bfloat16", comm="allgather"),
    Case(batch=1, seq=8192, chunk=256, topk=3, hq=4, hkv=2, d=64, dtype="float32", comm="routed"),
]


# The 8-GPU validation's settings (block 4096, top-k 12, GQA, bf16) at 1M tokens: 16 query heads
# over 4 kv heads, so each TP=2 rank's single-device reference (its 8 / 2 heads over the whole
# sequence) fits beside the CP run.
LONG_GPU_CASES = [
    Case(batch=1, seq=1 << 20, chunk=4096, topk=12, hq=16, hkv=4, d=128, dtype="bfloat16", comm=comm)
    for comm in ("allgather", "routed")
]


def _inputs(case: Case, device: str):
    from tests.helpers import dyadic

    g = torch.Generator().manual_seed(7)
    dtype = getattr(torch, case.dtype)
    t = case.batch * case.seq
    q = dyadic(t, case.hq, case.d, generator=g, device=device, dtype=dtype)
    k = dyadic(t, case.hkv, case.d, generator=g, device=device, dtype=dtype)
    v = torch.randn(t, case.hkv, case.d, generator=g).to(device=device, dtype=dtype)
    dout = torch.randn(t, case.hq, case.d, generator=g).to(device=device, dtype=dtype)
    return q, k, v, dout


def check(case: Case, tp_rank: int, tp: int, cp_group, device: str, backend: str | None) -> dict:
    from moba_megatron import moba_attn_varlen
    from moba_megatron.parallel import local_positions, moba_attn_cp
    from tests.helpers import cu_seqlens_of, run_with_grads

    cp, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    if case.backend is not None:
        from tests.ops.backends import register

        register()
        backend = case.backend
    q, k, v, dout = _inputs(case, device)
    heads_q = slice(tp_rank * case.hq // tp, (tp_rank + 1) * case.hq // tp)
    kv0 = tp_rank * case.hkv // tp  # fewer kv heads than TP ranks: each rank keeps one, as Megatron
    heads_kv = slice(kv0, max(kv0 + 1, (tp_rank + 1) * case.hkv // tp))
    q, dout, k, v = q[:, heads_q], dout[:, heads_q], k[:, heads_kv], v[:, heads_kv]
    cu = cu_seqlens_of([case.seq] * case.batch, device)
    ref_out, ref_grads = run_with_grads(
        lambda q, k, v: moba_attn_varlen(q, k, v, cu, case.seq, case.chunk, case.topk, backend=backend), q, k, v, dout
    )
    pos = local_positions(case.seq, cp, cp_rank, device)
    mine = (torch.arange(case.batch, device=device)[:, None] * case.seq + pos).flatten()
    stats: dict = {}
    from moba_megatron.parallel import attention

    default_rows, attention._ROUND_ROWS = attention._ROUND_ROWS, case.round_rows or attention._ROUND_ROWS
    try:
        out, grads = run_with_grads(
            lambda q, k, v: moba_attn_cp(
                q, k, v, case.batch, case.seq, case.chunk, case.topk, group=cp_group, comm=case.comm,
                backend=backend, stats=stats,
            ),
            q[mine], k[mine], v[mine], dout[mine],
        )
    finally:
        attention._ROUND_ROWS = default_rows
    errors = {}
    for name, got, want in zip(("out", "dq", "dk", "dv"), [out, *grads], [ref_out, *ref_grads]):
        want = want[mine].float()
        errors[name] = ((got.float() - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
    return {"case": asdict(case), "errors": errors, "stats": stats}


def run(rank: int, world: int, port: int, cp: int, tp: int, out: str, device: str, cases, backend=None):
    from megatron.core import parallel_state

    from tests.megatron.harness import destroy_parallel, init_parallel

    init_parallel(rank, world, port, tp=tp, cp=cp, device=device)
    results = [
        check(case, parallel_state.get_tensor_model_parallel_rank(), tp, parallel_state.get_context_parallel_group(),
              device, backend)
        for case in cases
    ]
    torch.save(results, f"{out}.{rank}")
    destroy_parallel()


def spawn(world: int, **kwargs) -> None:
    from tests.megatron.harness import spawn_ranks

    spawn_ranks(run, world, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cp", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"]), args.cp, args.tp,
        args.out, args.device, GPU_CASES if args.device == "cuda" else CPU_CASES, args.backend)
    if int(os.environ["RANK"]) == 0:
        for rank in range(int(os.environ["WORLD_SIZE"])):
            for result in torch.load(f"{args.out}.{rank}"):
                print(rank, result["case"], {k: f"{v:.2e}" for k, v in result["errors"].items()}, result["stats"])


if __name__ == "__main__":
    main()


def bad_inputs(rank: int, world: int, port: int, out: str) -> None:
    """Each misuse under CP, and the message it raised (or None if it did not raise)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from moba_megatron import MoBAAttention
    from moba_megatron.parallel import moba_attn_cp
    from tests.megatron.harness import destroy_parallel, init_parallel
    from tests.megatron.models import tiny_config

    init_parallel(rank, world, port, cp=world)
    q = torch.zeros(32, 2, 8)

    def message(fn):
        try:
            fn()
        except ValueError as e:
            return str(e)
        return None

    found = {
        "split": message(lambda: moba_attn_cp(q, q, q, 1, 64, 16, 2)),  # 64 / 4 chunks = 16 ok; chunk 16 ok
        "blocks": message(lambda: moba_attn_cp(q, q, q, 1, 64, 12, 2)),
        "tokens": message(lambda: moba_attn_cp(q, q, q, 2, 64, 16, 2)),
        "comm": message(lambda: moba_attn_cp(q, q, q, 1, 64, 16, 2, comm="ring")),
        "groups": message(lambda: MoBAAttention(tiny_config(context_parallel_size=4), 1, AttnMaskType.causal)),
    }
    attention = MoBAAttention(tiny_config(context_parallel_size=world), 1, AttnMaskType.causal)
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 32], dtype=torch.int32))
    found["thd"] = message(lambda: attention(q, q, q, packed_seq_params=thd))
    torch.save(found, f"{out}.{rank}")
    destroy_parallel()


def spawn_bad_inputs(world: int, out: str) -> None:
    from tests.megatron.harness import spawn_ranks

    spawn_ranks(bad_inputs, world, out=out)
