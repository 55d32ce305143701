"""Tiny GPT models for the megatron tests: MoBA, megatron's own dense attention, and the dense
masked MoBA reference as core attention."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from moba_megatron import MoBATransformerConfig, get_gpt_layer_with_moba_spec
from moba_megatron.megatron.attention import MoBAAttention
from moba_megatron.megatron.cpu import sequence_parallel_block
from moba_megatron.ops.moba import moba_attn_varlen_reference

VOCAB = 128
SEQ = 48


def tiny_config(**overrides) -> MoBATransformerConfig:
    fields = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moba_chunk_size=8,
        moba_topk=2,
        params_dtype=torch.float32,
    )
    fields.update(overrides)
    return MoBATransformerConfig(**fields)


class ReferenceMoBAAttention(MoBAAttention):
    """MoBAAttention computed by the dense masked reference (sbhd only)."""

    def forward(
        self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        sq, b = query.shape[:2]
        q, k, v = (x.transpose(0, 1).reshape(b * sq, x.shape[2], x.shape[3]) for x in (query, key, value))
        cu = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32)
        out = moba_attn_varlen_reference(q, k, v, cu, self.config.moba_chunk_size, self.config.moba_topk)
        return out.view(b, sq, -1).transpose(0, 1).contiguous()


def layer_spec(kind: str):
    if kind == "moba":
        spec = get_gpt_layer_with_moba_spec(use_te=False)
    else:
        spec = get_gpt_layer_local_spec()
        if kind == "reference":
            spec.submodules.self_attention.submodules.core_attention = ReferenceMoBAAttention
    return spec


def build_gpt(config, kind: str = "moba", seed: int = 1234, sequence_parallel_norm: bool = False) -> GPTModel:
    spec = layer_spec(kind)
    if sequence_parallel_norm:
        spec = sequence_parallel_block(spec, config.num_layers)
    torch.manual_seed(seed)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )


def batch(batch_size: int = 2, seq: int = SEQ, seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch_size, seq), generator=g).to(device)
    labels = torch.randint(0, VOCAB, (batch_size, seq), generator=g).to(device)
    position_ids = torch.arange(seq, device=device)[None].expand(batch_size, -1)
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device).triu(1)  # True = masked
    return tokens, position_ids, mask, labels
