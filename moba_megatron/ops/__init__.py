"""Single-device math. No megatron imports below this package."""

from .moba import moba_attn_varlen, moba_attn_varlen_reference
from .varlen import available_backends

__all__ = ["available_backends", "moba_attn_varlen", "moba_attn_varlen_reference"]
