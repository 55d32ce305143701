"""``MoBAAttention``: a megatron-core core-attention module, a drop-in for DotProductAttention.

Takes what Megatron's SelfAttention hands its core attention (sbhd ``[s, b, heads, dim]`` or, with
``packed_seq_params.qkv_format == 'thd'``, ``[t, heads, dim]``), flattens it to the packed layout of
``moba_attn_varlen`` and returns ``[s, b, heads * dim]`` (or ``[t, heads * dim]``). Tensor parallelism
needs nothing here: heads are already split, and MoBA is per head. Heads are read from the tensors,
so GQA with fewer query groups than TP ranks works as Megatron lays it out. Under context
parallelism each rank holds Megatron's load-balanced share of every sequence and the exchange of
``moba_megatron.parallel.moba_attn_cp`` runs over the context-parallel group.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from ..ops import moba_attn_varlen
from ..parallel import moba_attn_cp


class MoBAAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        for name in ("moba_chunk_size", "moba_topk"):
            if not hasattr(config, name):
                raise ValueError(
                    f"MoBAAttention needs a MoBATransformerConfig (config has no {name}); "
                    "build the model from moba_megatron.MoBATransformerConfig"
                )
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(
                f"MoBAAttention supports attn_mask_type=AttnMaskType.causal only, got {attn_mask_type}"
            )
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"MoBAAttention has no attention dropout: set attention_dropout=0 (got {dropout})")
        self.cp_group = None
        if config.context_parallel_size > 1:
            self.cp_group = _context_parallel_group(pg_collection, config.context_parallel_size)
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"MoBAAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("MoBAAttention does not combine with window_size (sliding-window attention)")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head_dim), as DotProductAttention
        self.full_attention = self.layer_number in config.moba_full_attn_layers
        self.moba_enabled = config.moba_enabled
        self._cu_cache: dict = {}

    def _uniform_cu_seqlens(self, batch: int, seqlen: int) -> torch.Tensor:
        # On the host: the op reads cu_seqlens there, and a device copy would cost a synchronization.
        key = (batch, seqlen)
        if key not in self._cu_cache:
            self._cu_cache = {key: torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32)}
        return self._cu_cache[key]

    def _backend(self, full: bool) -> str | None:
        """MoBA layers: ``moba_backend``. Full attention: the fastest dense kernel there is (None picks
        it: cuDNN on GPUs), whatever ``moba_backend`` says (docs/speed.md), unless Megatron's
        ``attention_backend`` names one (flash: FlashAttention-2; fused: cuDNN)."""
        if not full:
            return self.config.moba_backend
        return _DENSE_BACKENDS.get(getattr(self.config.attention_backend, "name", None))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask=None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attn_mask_type is not None and attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"MoBAAttention supports causal masks only, got {attn_mask_type}")
        if attention_bias is not None:
            raise ValueError("MoBAAttention does not take an attention_bias")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if self.cp_group is not None:
            if thd:
                raise ValueError(
                    "MoBAAttention does not support packed THD sequences under context parallelism yet; "
                    "use the sbhd layout (no packed_seq_params) or context_parallel_size=1"
                )
            return self._forward_context_parallel(query, key, value)
        if thd:
            q, k, v = query, key, value
            cu = packed_seq_params.cu_seqlens_q
            padded = packed_seq_params.cu_seqlens_q_padded
            if padded is not None and not torch.equal(padded, cu):
                raise ValueError("MoBAAttention does not support padded THD (cu_seqlens_q_padded != cu_seqlens_q)")
            max_seqlen = packed_seq_params.max_seqlen_q
            if max_seqlen is None:
                max_seqlen = int((cu[1:] - cu[:-1]).max())
        else:
            sq, b = query.shape[:2]
            q, k, v = (x.transpose(0, 1).reshape(b * sq, x.shape[2], x.shape[3]) for x in (query, key, value))
            cu = self._uniform_cu_seqlens(b, sq)
            max_seqlen = sq
        if cu.dtype != torch.int32:
            cu = cu.to(torch.int32)
        full = self.full_attention or not self.moba_enabled
        if full:
            # Full causal attention through the same op: one block spans each sequence.
            chunk, topk = max(1, int(max_seqlen)), 1
        else:
            chunk, topk = self.config.moba_chunk_size, self.config.moba_topk
        out = moba_attn_varlen(
            q, k, v, cu, int(max_seqlen), chunk, topk,
            softmax_scale=self.softmax_scale, backend=self._backend(full),
        )
        if thd:
            return out.reshape(out.shape[0], -1)
        return out.view(b, sq, -1).transpose(0, 1).contiguous()


    def _forward_context_parallel(self, query, key, value) -> torch.Tensor:
        """sbhd local shares ``[s/cp, b, heads, dim]`` in Megatron's load-balanced order."""
        sq, b = query.shape[:2]
        cp = self.config.context_parallel_size
        q, k, v = (x.transpose(0, 1).reshape(b * sq, x.shape[2], x.shape[3]) for x in (query, key, value))
        full = self.full_attention or not self.moba_enabled
        if full:
            # Dense causal attention as MoBA with one block per CP chunk, every block selected.
            chunk, topk, comm = sq // 2, 2 * cp, "allgather"
        else:
            chunk, topk, comm = self.config.moba_chunk_size, self.config.moba_topk, self.config.moba_cp_comm
        out = moba_attn_cp(
            q, k, v, b, sq * cp, chunk, topk, group=self.cp_group, comm=comm,
            softmax_scale=self.softmax_scale, backend=self._backend(full),
        )
        return out.view(b, sq, -1).transpose(0, 1).contiguous()


# megatron's AttnBackend names -> the op's backend for full-attention layers (others: the fastest).
_DENSE_BACKENDS = {"flash": "torch_flash", "fused": "cudnn"}


def _context_parallel_group(pg_collection, size: int):
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_context_parallel_group()
    actual = torch.distributed.get_world_size(group)
    if actual != size:
        raise ValueError(
            f"the context-parallel process group has {actual} ranks but config.context_parallel_size is {size}; "
            "pass the pg_collection (or initialize_model_parallel) built with the same context_parallel_size"
        )
    return group


def set_moba_enabled(model: torch.nn.Module, enabled: bool) -> int:
    """Switch every MoBAAttention in ``model`` between MoBA (True) and full attention (False) at
    run time, e.g. for the last phase of a full-to-MoBA hybrid schedule. Returns how many changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, MoBAAttention):
            changed += module.moba_enabled != enabled
            module.moba_enabled = enabled
    return changed
