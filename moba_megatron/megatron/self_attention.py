"""``MoBASelfAttention``: megatron-core's SelfAttention plus the key convolution (``moba_key_conv``).

The convolution runs on the keys after their projection (and any QK norm) and before rotary
embedding, which megatron applies between ``get_query_key_value_tensors`` and the core attention: so
this module overrides that method and leaves everything else to megatron. Without
``moba_key_conv`` it is SelfAttention exactly. Under context parallelism each chunk takes the keys
before it from the rank that holds them (``parallel.chunk_halos``).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from ..ops.key_conv import identity_key_conv_weight, key_conv, sequence_positions
from ..parallel import chunk_halos, local_positions


class KeyConv(MegatronModule):
    """The weight ``[kv heads of this TP rank, head dim, width]`` of the key convolution, split over
    tensor parallelism with the kv heads, initialized to the identity."""

    def __init__(self, config, kv_heads: int, head_dim: int):
        super().__init__(config=config)
        self.width = config.moba_key_conv
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            identity_key_conv_weight(kv_heads, head_dim, self.width, device=device, dtype=config.params_dtype))
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)

    def forward(self, key: torch.Tensor, packed_seq_params, cp_group) -> torch.Tensor:
        """``key``: sbhd ``[s, b, heads, dim]`` (under CP this rank's two chunks of each sequence), or
        THD ``[t, 1, heads, dim]`` with ``packed_seq_params``."""
        weight = self.weight.to(key.dtype)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cu = packed_seq_params.cu_seqlens_kv_padded
            cu = packed_seq_params.cu_seqlens_kv if cu is None else cu
            return key_conv(key, weight, sequence_positions(cu.tolist(), key.device))
        cp = self.config.context_parallel_size
        if cp == 1:
            return key_conv(key, weight, torch.arange(key.shape[0], device=key.device))
        rank = torch.distributed.get_rank(cp_group)
        positions = local_positions(key.shape[0] * cp, cp, rank, key.device)
        half = key.shape[0] // 2
        halos = chunk_halos(key, self.width, cp, rank, cp_group)
        return torch.cat([key_conv(key[:half], weight, positions[:half], halos[0]),
                          key_conv(key[half:], weight, positions[half:], halos[1])])


class MoBASelfAttention(SelfAttention):
    """SelfAttention whose keys go through the key convolution when ``config.moba_key_conv > 0``."""

    def __init__(self, config, submodules, layer_number: int, *args, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        width = getattr(config, "moba_key_conv", 0)
        self.key_conv = KeyConv(config, self.num_query_groups_per_partition, self.hidden_size_per_attention_head) \
            if width else None
        self._packed_seq_params = None

    def forward(self, hidden_states, *args, **kwargs):
        if self.key_conv is not None and kwargs.get("inference_context") is not None:
            raise ValueError("moba_key_conv does not support megatron's inference KV cache; run full forwards")
        self._packed_seq_params = kwargs.get("packed_seq_params")  # the key convolution's sequence boundaries
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            self._packed_seq_params = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                  split_qkv=split_qkv)
        if self.key_conv is None:
            return out
        if not split_qkv:
            raise ValueError("moba_key_conv needs the keys apart from the queries before rotary embedding; "
                             "turn off fused_single_qkv_rope")
        query, key, *rest = out
        return (query, self.key_conv(key, self._packed_seq_params, self.pg_collection.cp), *rest)
