"""MoBA (Mixture of Block Attention) for megatron-core."""

from .ops import available_backends, moba_attn_varlen

__version__ = "0.1.0"

__all__ = ["available_backends", "moba_attn_varlen"]
