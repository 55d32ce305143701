"""The megatron-core glue: config, core-attention module, specs."""

from .attention import MoBAAttention, set_moba_enabled
from .config import MoBATransformerConfig
from .specs import get_gpt_decoder_block_with_moba_spec, get_gpt_layer_with_moba_spec

__all__ = [
    "MoBAAttention",
    "MoBATransformerConfig",
    "get_gpt_decoder_block_with_moba_spec",
    "get_gpt_layer_with_moba_spec",
    "set_moba_enabled",
]
