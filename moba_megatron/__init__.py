"""MoBA (Mixture of Block Attention) for megatron-core."""

from .ops import available_backends, moba_attn_varlen

__version__ = "0.1.0"

_MEGATRON_NAMES = (
    "MoBAAttention",
    "MoBATransformerConfig",
    "get_gpt_decoder_block_with_moba_spec",
    "get_gpt_layer_with_moba_spec",
    "set_moba_enabled",
)


def __getattr__(name):
    # The megatron glue is imported on first use, so the op works without paying megatron's import.
    if name in _MEGATRON_NAMES:
        from . import megatron

        return getattr(megatron, name)
    raise AttributeError(f"module 'moba_megatron' has no attribute {name!r}")


__all__ = ["available_backends", "moba_attn_varlen", *_MEGATRON_NAMES]
