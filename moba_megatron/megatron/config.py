"""``MoBATransformerConfig``: megatron-core's TransformerConfig plus the MoBA fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron.core.transformer.transformer_config import TransformerConfig

from ..ops.key_conv import check_key_conv_width
from ..ops.varlen import BACKENDS
from ..parallel.attention import CP_COMM_MODES


@dataclass
class MoBATransformerConfig(TransformerConfig):
    attention_dropout: float = 0.0
    """MoBA's kernels have no attention dropout, so the default is 0 and anything else is refused."""

    moba_chunk_size: int = 4096
    """MoBA block size in tokens; blocks restart at every sequence start."""

    moba_topk: int = 12
    """Blocks each query attends, its own block included (1: own block only)."""

    moba_full_attn_layers: list[int] = field(default_factory=list)
    """1-based layer numbers kept on full causal attention (the paper keeps the last 3)."""

    moba_enabled: bool = True
    """Runtime switch: False runs every layer on full attention (see ``set_moba_enabled``)."""

    moba_backend: str | None = None
    """Kernels for MoBA (``cudnn``, ``flash_attn``, ``torch_flash``, ``torch``); None: best available."""

    moba_cp_comm: str = "auto"
    """How context parallelism exchanges MoBA blocks: ``auto``, ``routed`` or ``allgather``."""

    moba_key_conv: int = 0
    """Width of the key convolution (0: none): a learnable depthwise causal convolution over each
    sequence's keys before rotary embedding, in every layer of the MoBA spec, initialized to the identity."""

    def __post_init__(self):
        super().__post_init__()
        _check_int("moba_chunk_size", self.moba_chunk_size, 1)
        _check_int("moba_topk", self.moba_topk, 1)
        self.moba_full_attn_layers = list(self.moba_full_attn_layers or [])
        bad = [
            n
            for n in self.moba_full_attn_layers
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.num_layers
        ]
        if bad:
            raise ValueError(
                f"moba_full_attn_layers must hold 1-based layer numbers in 1..{self.num_layers} "
                f"(num_layers), got {bad}"
            )
        if self.moba_backend is not None and self.moba_backend not in BACKENDS:
            raise ValueError(f"moba_backend must be one of {sorted(BACKENDS)} or None, got {self.moba_backend!r}")
        check_key_conv_width(self.moba_key_conv, self.moba_chunk_size)
        if self.moba_key_conv and self.num_query_groups % self.tensor_model_parallel_size:
            raise ValueError(
                f"moba_key_conv needs num_query_groups ({self.num_query_groups}) divisible by "
                f"tensor_model_parallel_size ({self.tensor_model_parallel_size}): its weights split with the kv heads"
            )
        if self.moba_cp_comm not in CP_COMM_MODES:
            raise ValueError(f"moba_cp_comm must be one of {CP_COMM_MODES}, got {self.moba_cp_comm!r}")
        if self.attention_dropout:
            raise ValueError(
                f"attention_dropout must be 0 with MoBA (got {self.attention_dropout}): its kernels "
                "have no attention dropout; regularize with hidden_dropout instead"
            )


def _check_int(name: str, value, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
