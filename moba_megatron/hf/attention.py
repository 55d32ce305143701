"""MoBA as an attention of transformers: ``register_moba`` adds it to ``AttentionInterface``, so
``from_pretrained(..., attn_implementation=name)`` runs it in any model that uses the interface (Llama,
Qwen2, Mistral, ...). Prefill goes through ``moba_attn_varlen`` (GQA without repeating K/V); decoding
with the KV cache is exact MoBA for the new queries (``ops/moba/decode.py``), not a dense fallback."""

from __future__ import annotations

import torch

from ..ops import moba_attn_varlen
from ..ops.moba.decode import moba_attn_decode
from ..ops.moba.validate import check_positive_int


def register_moba(moba_chunk_size: int, moba_topk: int, name: str = "moba", *, moba_full_attn_layers=()) -> str:
    """Register MoBA under ``name`` with transformers' AttentionInterface (and a mask function with
    AttentionMaskInterface); returns ``name`` for ``attn_implementation=``. Layers in
    ``moba_full_attn_layers`` (1-based, as in Megatron's config) run full causal attention, as the
    hybrid model trained."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    check_positive_int("moba_chunk_size", moba_chunk_size)
    check_positive_int("moba_topk", moba_topk)
    full_layers = {int(n) - 1 for n in moba_full_attn_layers}

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if getattr(module, "layer_idx", None) in full_layers:  # MoBA with one block spanning the context
            return _moba_attention(query, key, value, attention_mask, dropout, scaling, key.shape[2], 1)
        return _moba_attention(query, key, value, attention_mask, dropout, scaling, moba_chunk_size, moba_topk)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, _padding_mask)
    return name


def _padding_mask(*, attention_mask=None, kv_length=None, **kwargs):
    """The mask MoBA takes: the 2D padding mask (True: a real token), None when nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError("MoBA attention takes a 2D padding attention_mask [batch, tokens], got a "
                         f"{attention_mask.dim()}D mask; pass the tokenizer's attention_mask")
    mask = attention_mask[:, -kv_length:].bool() if kv_length is not None else attention_mask.bool()
    return None if bool(mask.all()) else mask


def _moba_attention(query, key, value, mask, dropout, scaling, chunk, topk):
    """``query [B, Hq, q_len, D]``, ``key, value [B, Hkv, kv_len, D]`` (the cache and the new
    tokens); returns ``([B, q_len, Hq, D], None)``. Queries are the last ``q_len`` positions."""
    if dropout:
        raise ValueError(f"MoBA attention has no dropout; set attention_dropout=0 (got {dropout})")
    b, hq, q_len, d = query.shape
    kv_len = key.shape[2]
    scale = scaling if scaling is not None else d**-0.5
    spans = []
    for row in range(b):  # each row's real tokens: one span, left or right of the padding
        if mask is None:
            spans.append((0, kv_len))
            continue
        real = mask[row].nonzero().flatten()
        if real.numel() == 0:
            spans.append((0, 0))
            continue
        s0, s1 = int(real[0]), int(real[-1]) + 1
        if real.numel() != s1 - s0:
            raise ValueError(f"MoBA attention: row {row} of the attention_mask has padding between real tokens; "
                             "pad on one side only (left or right)")
        spans.append((s0, s1))
    out = query.new_zeros(b, q_len, hq, d)
    first_query = kv_len - q_len
    if q_len == kv_len:  # prefill: every row's real tokens as one packed varlen batch
        rows = [(r, s0, s1) for r, (s0, s1) in enumerate(spans) if s1 > s0]
        if rows:
            q = torch.cat([query[r, :, s0:s1].transpose(0, 1) for r, s0, s1 in rows])
            k = torch.cat([key[r, :, s0:s1].transpose(0, 1) for r, s0, s1 in rows])
            v = torch.cat([value[r, :, s0:s1].transpose(0, 1) for r, s0, s1 in rows])
            lens = [s1 - s0 for _, s0, s1 in rows]
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
            packed = moba_attn_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, max(lens), chunk, topk,
                                      softmax_scale=scale)
            for (r, s0, s1), piece in zip(rows, packed.split(lens)):
                out[r, s0:s1] = piece
        return out, None
    for r, (s0, s1) in enumerate(spans):  # decoding: the new queries against the cache
        lo = max(s0, first_query)
        if s1 <= lo:
            continue
        positions = torch.arange(lo - s0, s1 - s0, device=query.device)
        piece = moba_attn_decode(query[r, :, lo - first_query : s1 - first_query], key[r, :, s0:s1], value[r, :, s0:s1],
                                 positions, chunk, topk, scale)
        out[r, lo - first_query : s1 - first_query] = piece.transpose(0, 1)
    return out, None
