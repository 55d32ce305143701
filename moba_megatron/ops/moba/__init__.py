from .function import MoBAFunction, moba_attn_varlen
from .naive import causal_attn_varlen_reference, moba_attn_varlen_reference, moba_block_mask

__all__ = [
    "MoBAFunction",
    "causal_attn_varlen_reference",
    "moba_attn_varlen",
    "moba_attn_varlen_reference",
    "moba_block_mask",
]
