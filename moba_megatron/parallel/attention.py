"""MoBA under context parallelism (docs/context-parallel.md).

Every rank holds Megatron's load-balanced share of each sequence (chunks ``r`` and ``2cp-1-r``), and
chunks hold whole MoBA blocks, so the own-block causal attention is purely local. Gating needs every
block's key sum: one small all-gather. The selected (query, head, block) rows then reach their
block's keys in one of two ways:

- ``routed``: each row travels to the rank owning its block (all-to-all), the owner attends it
  against its local blocks, and the partial output and LSE travel back. No K/V leaves its rank.
  The backward sends the rows' query, output gradient, merged output and LSE out and the dq rows
  back. Rows move in rounds of at most ``_ROUND_ROWS`` so the buffers in flight stay bounded.
- ``allgather``: K and V are all-gathered and every rank attends its own rows locally, with the
  single-device op's routed code (ops/moba/routed.py) over the gathered blocks. The backward
  gathers K/V again (nothing of the gathered copy is kept) and reduce-scatters dK/dV.

Partials are merged with the own-block result by log-sum-exp, and each part's kernel backward runs
against the merged output, exactly as on one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.moba import routed
from ..ops.moba.gating import block_key_sums, kv_head_selector, select_blocks
from ..ops.moba.routing import route_rows, route_selection
from ..ops.moba.validate import check_positive_int, check_qkv, check_scale
from ..ops.varlen import get_backend
from .cost import choose_cp_comm
from .exchange import AllToAll, gather_block_sums, reduce_scatter, start_all_gather
from .sharding import ShardBlocks, shard_blocks

CP_COMM_MODES = ("auto", "routed", "allgather")


class _GatheredKeys:
    """Every rank's K and V, rank-major, as the key blocks of ``shard.gathered``. The all-gathers
    run from construction to ``wait``, behind the own-block attention launched in between."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, shard: ShardBlocks, group):
        self.shape, self.layout = k.shape, shard.gathered
        self.parts = [start_all_gather(x, shard.cp_size, group) for x in (k, v)]
        self.bytes_sent = sum(sent for _, sent, _ in self.parts)

    def wait(self) -> routed.KeyBlocks:
        for _, _, work in self.parts:
            work.wait()
        k_all, v_all = (out.view(-1, *self.shape[1:]) for out, _, _ in self.parts)
        self.parts = None
        return routed.KeyBlocks(k_all, v_all, self.layout)


class _Selection:
    """This rank's selected rows, as flat indices ``cell`` into ``[T, Hq, slots]`` (int64). The
    other per-row indices are derived on demand: rows number ``T * Hq * (topk - 1)``, so keeping
    several int64 tables of that length would cost more memory than the attention itself."""

    def __init__(self, sel: torch.Tensor):
        self.shape = sel.shape
        self.cell = torch.nonzero(sel.view(-1) >= 0).squeeze(1)

    def token_head(self, cell: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        _, hq, slots = self.shape
        cell = self.cell if cell is None else cell
        return cell // (hq * slots), cell // slots % hq

    def token_major(self, cell=None) -> torch.Tensor:
        """Row of ``[T * Hq]`` (q, out, dout viewed as rows)."""
        token, head = self.token_head(cell)
        return token * self.shape[1] + head

    def head_major(self, cell=None) -> torch.Tensor:
        """Row of ``[Hq * T]`` (the LSE's layout)."""
        token, head = self.token_head(cell)
        return head * self.shape[0] + token


class MoBAContextParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, shard: ShardBlocks, topk, scale, backend, mode, group, stats):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        chunk, cp = shard.chunk, shard.cp_size
        cu = shard.local.cu_blocks
        slots = min(topk - 1, shard.max_candidates)
        ctx.shard, ctx.scale, ctx.backend, ctx.group, ctx.stats = shard, scale, backend, group, stats
        ctx.routes = ctx.rows = None
        ctx.kernels = kernels = routed.Kernels.choose(backend, q, chunk)
        if slots > 0:  # gate first: the own-block call below then hides the waits (K/V gathers)
            sums = gather_block_sums(block_key_sums(k, shard.local), shard, group)
            sent = sums.numel() // cp * sums.element_size() * (cp - 1)
            if mode == "allgather":
                select = kv_head_selector(q, sums, shard, slots, fused=backend.triton_routes)
                ctx.routes = route_selection(
                    lambda kv0, kv1: shard.gathered_blocks(select(kv0, kv1)), num_tokens=q.shape[0],
                    num_heads=q.shape[1], slots=slots, num_blocks=shard.gathered.num_blocks, num_kv_heads=k.shape[1],
                    head_dim=q.shape[2], split_slots=not kernels.fused_backward, fused=backend.triton_routes,
                )
                if not (kernels.fused and kernels.fused_backward):
                    ctx.routes.start_host_copy()
                gathering = _GatheredKeys(k, v, shard, group)
            else:
                sel = select_blocks(q, sums, shard, slots, fused=backend.triton_routes)
        out, lse = backend.forward(q, k, v, cu, cu, chunk, chunk, True, scale)
        if slots > 0:
            if mode == "allgather":
                keys, n = gathering.wait(), gathering.bytes_sent
                routed.forward(q, out, lse, ctx.routes, keys, scale, backend, kernels)
                if any(ctx.needs_input_grad[:3]):
                    routed.plan_backward(ctx.routes, chunk, q.shape[-1], kernels)
                del keys, gathering
                work = ctx.routes.num_rows() if stats is not None else 0
            else:
                n, work = _routed_forward(ctx, q, k, v, out, lse, sel, shard, slots, scale, backend, group)
            _record(stats, "forward", sent + n, work)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        shard, scale, backend, group = ctx.shard, ctx.scale, ctx.backend, ctx.group
        chunk = shard.chunk
        dout = dout.contiguous()
        cu = shard.local.cu_blocks
        gathering = _GatheredKeys(k, v, shard, group) if ctx.routes is not None else None
        dq, dk, dv = backend.backward(dout, q, k, v, out, lse, cu, cu, chunk, chunk, True, scale)
        if gathering is not None:
            keys, sent = gathering.wait(), gathering.bytes_sent
            del gathering
            dk_all, dv_all = (torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (keys.k, keys.v))
            dq_acc = dq.float()
            routed.backward(dout, q, out, lse, ctx.routes, keys, scale, backend, ctx.kernels, dq_acc, dk_all, dv_all)
            dq = dq_acc.to(q.dtype)
            del keys, dq_acc
            (dk_mine, n_k), (dv_mine, n_v) = (
                reduce_scatter(x.view(shard.cp_size, *k.shape), group) for x in (dk_all, dv_all)
            )  # this rank's blocks, summed over the ranks whose queries chose them
            del dk_all, dv_all
            dk = (dk.float() + dk_mine).to(k.dtype)
            dv = (dv.float() + dv_mine).to(v.dtype)
            _record(ctx.stats, "backward", sent + n_k + n_v, ctx.routes.num_rows() if ctx.stats is not None else 0)
        elif ctx.rows is not None:
            dq, dk, dv = _routed_backward(ctx, dout, q, k, v, out, lse, dq, dk, dv)
        return dq, dk, dv, *([None] * 7)


def _routed_forward(ctx, q, k, v, out, lse, sel, shard: ShardBlocks, slots, scale, backend, group):
    """The routed exchange's forward: rows out to their blocks' owners, partials back, merged into
    ``out``/``lse`` in place. Returns (bytes sent, rows this rank attended)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    rows = _Selection(sel)
    owner, block = shard.owner(sel.view(-1)[rows.cell].long())
    del sel
    kv_head = rows.token_head()[1] // (hq // hkv)
    q_flat = q.view(-1, d)
    nloc = shard.local_blocks
    kernels = ctx.kernels
    keys = routed.KeyBlocks(k, v, shard.local)
    grid_out = q.new_zeros(t * hq * slots + 1, d)  # per (token, head, slot) partials
    grid_lse = torch.full((t * hq * slots + 1,), float("-inf"), device=q.device)
    ctx.routed, sent, work = [], 0, 0
    for r0, r1 in _routed_rounds(len(rows.cell), group, q.device):
        part = slice(r0, r1)
        by_owner = torch.sort(owner[part], stable=True).indices
        route = AllToAll(torch.bincount(owner[part], minlength=shard.cp_size), shard.cp_rank, group)
        cells = rows.cell[part][by_owner]
        recv_q, n1 = route(q_flat[rows.token_major(cells)])
        recv_keys, n2 = route((kv_head[part] * nloc + block[part])[by_owner])
        received = route_rows(recv_keys, hkv, nloc)
        o_recv, l_recv = routed.attend(recv_q[:, None], received, received.groups[0], keys, scale, backend, kernels)
        del recv_q
        n = len(recv_keys)
        o_rows, n3 = route(o_recv[:n], back=True)  # in the order of `cells`
        l_rows, n4 = route(l_recv[:n], back=True)
        del o_recv, l_recv
        routed.put_rows(grid_out, cells, o_rows)
        grid_lse[cells] = l_rows
        del o_rows, l_rows
        ctx.routed.append((cells, route, received))
        sent += n1 + n2 + n3 + n4
        work += n
    routed.merge(out, lse, 0, hq, grid_out, grid_lse, slots, kernels.fused)
    ctx.rows = rows
    return sent, work


def _routed_backward(ctx, dout, q, k, v, out, lse, dq, dk, dv):
    """The routed exchange's backward: q, dO, O and LSE rows out again, dq rows back; the owners'
    K/V gradients stay on them."""
    shard, scale, backend, rows = ctx.shard, ctx.scale, ctx.backend, ctx.rows
    t, hq, d = q.shape
    keys = routed.KeyBlocks(k, v, shard.local)
    dk_acc, dv_acc = dk.float(), dv.float()
    dq_acc = dq.float()
    q_flat, dout_flat, out_flat, lse_flat = q.view(-1, d), dout.view(-1, d), out.view(-1, d), lse.view(-1)
    sent, work = 0, 0
    for cells, route, received in ctx.routed:
        tm, hm = rows.token_major(cells), rows.head_major(cells)
        # q rows travel again rather than being kept from the forward: a layer's
        # received rows are (topk - 1) x its queries, too many to hold until the backward.
        recv_q, n0 = route(q_flat[tm])
        recv_dout, n1 = route(dout_flat[tm])
        recv_out, n2 = route(out_flat[tm])
        recv_lse, n3 = route(lse_flat[hm])
        dq_recv = torch.zeros(len(recv_q), 1, d, dtype=torch.float32, device=q.device)
        routed.backward(recv_dout[:, None], recv_q[:, None], recv_out[:, None], recv_lse[None], received, keys,
                        scale, backend, ctx.kernels, dq_recv, dk_acc, dv_acc)
        del recv_q, recv_dout, recv_out, recv_lse
        dq_rows, n4 = route(dq_recv[:, 0].to(q.dtype), back=True)
        dq_acc.view(-1, d).index_add_(0, tm, dq_rows.float())
        del dq_recv, dq_rows
        sent += n0 + n1 + n2 + n3 + n4
        work += received.order.numel()
    _record(ctx.stats, "backward", sent, work)
    return dq_acc.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)


_ROUND_ROWS = 1 << 24  # routed rows per exchange round: bounds the rows in flight (~4 GiB at D=128, bf16)


def _routed_rounds(num_rows: int, group, device) -> list[tuple[int, int]]:
    """Cut this rank's rows into rounds; every rank runs as many rounds as the busiest one (the
    exchange is collective), with empty rounds where it has run out."""
    most = torch.tensor([num_rows], dtype=torch.int64, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
    count = max(1, -(-int(most) // _ROUND_ROWS))
    step = -(-num_rows // count) if num_rows else 0
    return [(min(i * step, num_rows), min((i + 1) * step, num_rows)) for i in range(count)]


def _record(stats: dict | None, phase: str, sent: int, rows: int) -> None:
    if stats is not None:
        stats[f"{phase}_bytes_sent"] = stats.get(f"{phase}_bytes_sent", 0) + sent
        stats[f"{phase}_rows_attended"] = stats.get(f"{phase}_rows_attended", 0) + rows


def moba_attn_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: int,
    seq_len: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    group=None,
    comm: str = "auto",
    softmax_scale: float | None = None,
    backend: str | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """MoBA attention of one context-parallel rank's tokens; equal to ``moba_attn_varlen`` over the
    whole sequences, restricted to this rank's tokens (outputs and gradients).

    Args:
        q: ``[batch * seq_len / cp, Hq, D]``; k, v: ``[batch * seq_len / cp, Hkv, D]``: this rank's
            tokens of each sample in Megatron's load-balanced order (chunks ``r`` then ``2cp-1-r``),
            sample after sample.
        batch, seq_len: samples and their full (unsharded) length; all samples have this length.
        group: the context-parallel process group (None: the default group).
        comm: ``"routed"``, ``"allgather"`` or ``"auto"`` (the one that sends fewer bytes,
            docs/context-parallel.md).
        stats: if given, bytes sent to other ranks and rows attended are added to it.
    """
    check_qkv(q, k, v)
    check_positive_int("moba_chunk_size", moba_chunk_size)
    check_positive_int("moba_topk", moba_topk)
    check_positive_int("batch", batch)
    check_scale(softmax_scale)
    if comm not in CP_COMM_MODES:
        raise ValueError(f"comm must be one of {CP_COMM_MODES}, got {comm!r}")
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    if seq_len % cp or q.shape[0] != batch * (seq_len // cp):
        raise ValueError(
            f"q holds {q.shape[0]} tokens, but batch {batch} x seq_len {seq_len} / context_parallel_size {cp} "
            f"= {batch * seq_len / cp:g}: pass each rank's share of every sample (Megatron's get_batch_on_this_cp_rank)"
        )
    impl = get_backend(backend, q, k)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    shard = shard_blocks(batch, seq_len, cp, rank, moba_chunk_size, q.device)
    if comm == "auto":
        comm = choose_cp_comm(seq_len, cp, moba_topk, q.shape[1], k.shape[1], q.shape[2])
    return MoBAContextParallelFunction.apply(q, k, v, shard, moba_topk, scale, impl, comm, group, stats)
