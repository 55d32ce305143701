"""One training step of a tiny MoBA GPT (or, with ``--kind dense``, the same GPT on megatron's own
attention, to calibrate bf16 noise) at a given tensor- and context-parallel size; rank 0 saves the
loss and the full (TP-gathered, CP-summed) gradients, to be compared across layouts.

CPU/gloo (tests spawn it):  see tests/megatron/test_tensor_parallel.py
GPU/NCCL, bf16:             torchrun --nproc-per-node 4 -m tests.megatron.parallel_worker --tp 4 \\
                                --device cuda --bf16 --out tp4.pt
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def gather_full(param: torch.Tensor, grad: torch.Tensor, tp_group) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or dist.get_world_size(tp_group) == 1:
        return grad
    parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, grad.contiguous(), group=tp_group)
    return torch.cat(parts, dim=param.partition_dim)


def away_from_identity(model, tp_rank: int) -> None:
    """Key convolution weights away from the identity, the same at every layout (each TP rank its kv
    heads' slice of one seeded tensor), so halos and neighbours change the outputs."""
    from moba_megatron.megatron.self_attention import KeyConv

    for i, conv in enumerate(m for m in model.modules() if isinstance(m, KeyConv)):
        heads, dim, width = conv.weight.shape
        full = torch.randn(heads * 64, dim, width, generator=torch.Generator().manual_seed(i)) * 0.5
        with torch.no_grad():
            conv.weight.add_(full[tp_rank * heads : (tp_rank + 1) * heads].to(conv.weight))


def step(rank: int, world: int, port: int, tp: int, out: str, device: str = "cpu", bf16: bool = False,
         sequence_parallel: bool = False, num_query_groups: int = 4, seq: int = 48, chunk: int = 8, topk: int = 2,
         sp_norm: bool | None = None, kind: str = "moba", cp: int = 1, comm: str = "auto",
         full_layers: tuple[int, ...] = (), key_conv: int = 0):
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module

    from moba_megatron.parallel import local_positions

    from .harness import destroy_parallel, init_parallel
    from .models import batch, build_gpt, tiny_config

    init_parallel(rank, world, port, tp=tp, cp=cp, device=device)
    config = tiny_config(
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        moba_cp_comm=comm,
        moba_full_attn_layers=list(full_layers),
        sequence_parallel=sequence_parallel,
        num_query_groups=num_query_groups,
        num_attention_heads=8,
        hidden_size=128,
        ffn_hidden_size=256,
        moba_chunk_size=chunk,
        moba_topk=topk,
        moba_key_conv=key_conv,
        bf16=bf16,
    )
    sp_norm = sequence_parallel if sp_norm is None else sp_norm  # the TP=1 reference uses the same norms
    model = build_gpt(config, kind, sequence_parallel_norm=sp_norm).to(device)
    if key_conv:
        away_from_identity(model, parallel_state.get_tensor_model_parallel_rank())
    if bf16:
        model = Float16Module(config, model)
    tokens, position_ids, mask, labels = batch(seq=seq, device=device)
    cp_group = parallel_state.get_context_parallel_group()
    mine = local_positions(seq, cp, parallel_state.get_context_parallel_rank(), device)  # Megatron's CP split
    tokens, position_ids, labels = tokens[:, mine], position_ids[:, mine], labels[:, mine]
    loss = model(tokens, position_ids, mask, labels=labels).float().sum() / (labels.shape[0] * seq)
    loss.backward()
    loss = loss.detach()
    dist.all_reduce(loss, group=cp_group)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.main_grad if hasattr(p, "main_grad") else p.grad
        dist.all_reduce(grad, group=cp_group)  # each CP rank holds its tokens' share (DDP sums it)
        if getattr(p, "sequence_parallel", False):  # what finalize_model_grads does for SP norms
            dist.all_reduce(grad, group=tp_group)
        grads[name.removeprefix("module.")] = gather_full(p, grad, tp_group).float().cpu()
    if rank == 0:
        torch.save({"loss": loss.detach().float().cpu(), "grads": grads}, out)
    destroy_parallel()


def spawn(world: int, **kwargs) -> None:
    """Run ``step`` on ``world`` CPU processes (gloo)."""
    from .harness import spawn_ranks

    spawn_ranks(step, world, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--comm", default="auto", choices=["auto", "routed", "allgather"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--sp-norm", action="store_true", help="norms that accept sequence parallelism")
    parser.add_argument("--kind", default="moba", choices=["moba", "dense"], help="dense: megatron's own attention")
    parser.add_argument("--num-query-groups", type=int, default=4)
    parser.add_argument("--seq", type=int, default=48)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    args = parser.parse_args()
    step(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"]), args.tp, args.out,
         args.device, args.bf16, args.sequence_parallel, args.num_query_groups, args.seq, args.chunk, args.topk,
         args.sp_norm or args.sequence_parallel, args.kind, args.cp, args.comm)


if __name__ == "__main__":
    main()
