"""The MoBA autograd Function and its public entry point ``moba_attn_varlen``.

Forward: (1) every query attends its own block causally, one varlen call over all blocks;
(2) the gate picks ``topk - 1`` earlier blocks per (query, head); (3) the selected blocks are
attended non-causally and (4) the partial outputs merged by log-sum-exp (routed.py).
Backward: each part's kernel backward runs against the *merged* output and LSE, which gives the
exact gradient of the single softmax over the union of selected keys.

Host synchronizations: none on CUDA backends once the block layout of a ``cu_seqlens`` is cached
(pass ``cu_seqlens`` as a CPU tensor, or the op reads it once per call). The Triton kernels launch
from device-side run bounds; only routed calls that take tiles read the run sizes on the host
(copied without blocking after the sort; read once the forward's kernels are queued, where the
backward's tile calls are planned, so the GPU keeps working while the host waits and plans).
"""

from __future__ import annotations

import torch

from ..varlen import VarlenBackend, get_backend
from . import routed
from .gating import block_key_sums, kv_head_selector
from .layout import BlockLayout, block_layout
from .routing import route_selection
from .validate import check_max_seqlen, check_positive_int, check_qkv, check_scale, host_cu_seqlens


class MoBAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: BlockLayout, topk: int, scale: float, backend: VarlenBackend):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        slots = min(topk - 1, layout.max_candidates)
        mb = layout.max_block_len
        kernels = routed.Kernels.choose(backend, q, layout.chunk)
        routes = None
        if slots > 0:
            select = kv_head_selector(q, block_key_sums(k, layout), layout, slots, fused=backend.triton_routes)
            routes = route_selection(select, num_tokens=q.shape[0], num_heads=q.shape[1], slots=slots,
                                     num_blocks=layout.num_blocks, num_kv_heads=k.shape[1], head_dim=q.shape[-1],
                                     split_slots=not kernels.fused_backward, fused=backend.triton_routes)
            if not (kernels.fused and kernels.fused_backward):
                routes.start_host_copy()  # the tile calls need the run sizes on the host
        out, lse = backend.forward(q, k, v, layout.cu_blocks, layout.cu_blocks, mb, mb, True, scale)
        if routes is not None:
            routed.forward(q, out, lse, routes, routed.KeyBlocks(k, v, layout), scale, backend, kernels)
            if any(ctx.needs_input_grad[:3]):
                routed.plan_backward(routes, layout.chunk, q.shape[-1], kernels)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.routes, ctx.scale, ctx.backend, ctx.kernels = layout, routes, scale, backend, kernels
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        layout, routes, scale, backend = ctx.layout, ctx.routes, ctx.scale, ctx.backend
        dout = dout.contiguous()
        mb = layout.max_block_len
        dq, dk, dv = backend.backward(
            dout, q, k, v, out, lse, layout.cu_blocks, layout.cu_blocks, mb, mb, True, scale
        )
        if routes is not None:
            # The Triton backward adds into dq from many programs: an fp32 accumulator. The tile
            # path sums each head group's routed dq rows once, in fp32, into the kernel's own dq.
            fused = ctx.kernels.fused_backward
            dq_acc = dq.float() if fused else dq.contiguous()
            dk, dv = dk.contiguous(), dv.contiguous()
            routed.backward(dout, q, out, lse, routes, routed.KeyBlocks(k, v, layout), scale, backend, ctx.kernels,
                            dq_acc, dk, dv)
            dq = dq_acc.to(q.dtype)
        return dq, dk, dv, None, None, None, None


def moba_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """MoBA attention over a packed (THD) batch.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA without repeating K/V).
        cu_seqlens: ``[B + 1]`` int32 sequence boundaries, ending at T.
        max_seqlen: the longest sequence (an upper bound is accepted).
        moba_chunk_size: block size C; blocks restart at each sequence start.
        moba_topk: blocks per query *including its own*; 1 means own block only.
        softmax_scale: default ``D ** -0.5``.
        backend: ``"cudnn"``, ``"flash_attn"``, ``"torch_flash"``, ``"torch"``, or None for the
            best one available for these inputs.

    Returns ``[T, Hq, D]``, differentiable with respect to q, k and v.
    """
    check_qkv(q, k, v)
    check_positive_int("moba_chunk_size", moba_chunk_size)
    check_positive_int("moba_topk", moba_topk)
    check_scale(softmax_scale)
    cu = host_cu_seqlens(cu_seqlens, q.shape[0], q.device)
    check_max_seqlen(max_seqlen, cu)
    impl = get_backend(backend, q, k)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    if q.shape[0] == 0:
        return q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())
    layout = block_layout(tuple(cu), moba_chunk_size, q.device)
    return MoBAFunction.apply(q, k, v, layout, moba_topk, scale, impl)
