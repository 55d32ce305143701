"""MoBA for a few queries at the end of one sequence against all its keys: decoding with a KV cache.

Exactly docs/semantics.md for those queries: each attends its own block so far (causally) and the
``topk - 1`` completed blocks before it whose key sums score best (fp32, ties to the lower block),
in one softmax. The cost is O(queries x keys), not the quadratic cost of a full forward, so every
generated token is exact MoBA rather than a dense fallback. GQA without repeating K/V.
"""

from __future__ import annotations

import torch


def moba_attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, chunk: int,
                     topk: int, scale: float) -> torch.Tensor:
    """``q [Hq, m, D]`` at sequence positions ``positions [m]`` (int64, ascending, each < n), ``k, v
    [Hkv, n, D]`` the sequence's keys from position 0. Returns ``[Hq, m, D]`` in q's dtype."""
    hq, m, d = q.shape
    hkv, n, _ = k.shape
    group = hq // hkv
    qg = q.float().view(hkv, group, m, d)
    own = positions // chunk  # [m]
    key_pos = torch.arange(n, device=q.device)
    allowed = (key_pos[None, :] // chunk == own[:, None]) & (key_pos[None, :] <= positions[:, None])  # [m, n]
    allowed = allowed.expand(hkv, group, m, n)
    complete = n // chunk
    if topk > 1 and complete > 0:
        sums = k[:, : complete * chunk].float().view(hkv, complete, chunk, d).sum(2)  # [Hkv, blocks, D]
        scores = torch.matmul(qg, sums.transpose(-1, -2).unsqueeze(1))  # [Hkv, G, m, blocks]
        blocks = torch.arange(complete, device=q.device)
        candidate = blocks[None, :] < own[:, None]  # completed blocks strictly before the own one
        scores = scores.masked_fill(~candidate, float("-inf"))
        slots = min(topk - 1, complete)
        # stable descending sort: equal scores keep ascending block order, so the lower block wins
        best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :slots]
        chosen = torch.gather(candidate.expand(hkv, group, m, complete), -1, best)
        picked = torch.zeros(hkv, group, m, complete, dtype=torch.bool, device=q.device)
        picked.scatter_(-1, best, chosen)
        in_block = key_pos[: complete * chunk] // chunk
        allowed = allowed.clone()
        allowed[..., : complete * chunk] |= picked[..., in_block]
    logits = torch.matmul(qg, k.float().transpose(-1, -2).unsqueeze(1)) * scale  # [Hkv, G, m, n]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    out = torch.matmul(probs, v.float().unsqueeze(1))  # [Hkv, G, m, D]
    return out.reshape(hq, m, d).to(q.dtype)
