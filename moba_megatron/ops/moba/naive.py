"""Dense masked reference for MoBA: the semantics written as plainly as possible.

Independent of the fast path (no layout, gating or routing code shared): per sequence it builds
the full ``[Hq, n, n]`` key mask from the definition and runs one masked softmax in fp32.
Quadratic in memory; for tests and small demos only.
"""

from __future__ import annotations

import torch


def moba_block_mask(q: torch.Tensor, k: torch.Tensor, chunk: int, topk: int) -> torch.Tensor:
    """Key mask of one sequence: ``[Hq, n, n]`` bool, True where query i attends key j."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    n_blocks = -(-n // chunk)
    block_of = torch.arange(n, device=q.device) // chunk
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    own = block_of[:, None] == block_of[None, :]
    mask = (own & causal).expand(hq, n, n).clone()
    if topk == 1 or n_blocks == 1:
        return mask
    # Gate on block key sums: same ranking as block means for the full blocks that compete.
    sums = torch.stack([k[b * chunk : (b + 1) * chunk].float().sum(0) for b in range(n_blocks)])
    sums = sums.repeat_interleave(group, dim=1)  # [n_blocks, Hq, D]
    scores = torch.einsum("nhd,bhd->hnb", q.float(), sums)  # [Hq, n, n_blocks]
    blocks = torch.arange(n_blocks, device=q.device)
    candidate = blocks[None, :] < block_of[:, None]  # completed blocks strictly before one's own
    scores = scores.masked_fill(~candidate, float("-inf"))
    # Stable descending sort: equal scores keep ascending block order, so lower index wins.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : topk - 1]
    rank = torch.arange(order.shape[-1], device=q.device)
    chosen = rank[None, None, :] < block_of[None, :, None]  # fewer candidates than slots
    picked = torch.zeros(hq, n, n_blocks, dtype=torch.bool, device=q.device)
    picked.scatter_(-1, order, chosen.expand(hq, -1, -1))
    mask |= picked[:, :, block_of]
    return mask


def moba_attn_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    moba_chunk_size: int,
    moba_topk: int,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Dense MoBA: differentiable by plain autograd; output in the input dtype."""
    hq, d = q.shape[1], q.shape[2]
    group = hq // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    outs = []
    cu = cu_seqlens.tolist()
    for s0, s1 in zip(cu[:-1], cu[1:]):
        if s1 == s0:
            continue
        qs, ks, vs = q[s0:s1], k[s0:s1], v[s0:s1]
        mask = moba_block_mask(qs.detach(), ks.detach(), moba_chunk_size, moba_topk)
        kr = ks.float().repeat_interleave(group, dim=1)
        vr = vs.float().repeat_interleave(group, dim=1)
        logits = torch.einsum("ihd,jhd->hij", qs.float(), kr) * scale
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        outs.append(torch.einsum("hij,jhd->ihd", probs, vr).to(q.dtype))
    if not outs:
        return q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())
    return torch.cat(outs)


def causal_attn_varlen_reference(q, k, v, cu_seqlens, softmax_scale=None) -> torch.Tensor:
    """Plain causal attention per sequence (MoBA with every block selected must equal this)."""
    big = max(1, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 1)
    return moba_attn_varlen_reference(q, k, v, cu_seqlens, big, 1, softmax_scale)
