"""Everything needed to run megatron-core on CPU (gloo), in one place: the CPU training job and
the tests use these.

- ``torch.cuda.current_device`` answers "cpu": megatron allocates buffers there.
- ``use_cpu_initialization=True`` in configs: the full weight is drawn on CPU from one seed and then
  split, so every TP size starts from the same weights.
- ``SequenceParallelNorm``: megatron's torch norm refuses sequence parallelism (apex/TE norms are not
  installable here); this one accepts it and marks its weights for the TP all-reduce of their grads.
- Dropout runs on the CPU generator: the CUDA RNG tracker's ``fork`` (entered around dropout even
  at p=0) and the CUDA RNG save/restore of activation recompute become no-ops.
- RoPE under context parallelism picks this rank's chunks of the position table with an index
  tensor it moves to CUDA; on CPU the same chunks are taken with plain slicing.
- Allocations megatron makes on "cuda" unconditionally (the pipeline schedules' token counter, the
  tied embedding that pipeline stages all-reduce at construction) land on the CPU: ``Tensor.cuda()``
  returns the tensor and ``torch.zeros(..., device="cuda")`` allocates on the CPU.
- ``torch.cuda.synchronize`` (called by dist_checkpointing) is a no-op, and
  ``torch.cuda.current_stream`` (waited on by DDP's grad sync) a stream that waits for nothing.
"""

from __future__ import annotations

import contextlib

import torch


class _NullStream:
    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


def enable_cpu_shims() -> None:
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random

    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.zeros = _on_cpu(torch.zeros)
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    # Activation recompute saves and restores the CUDA RNG state; on CPU there is none to keep.
    random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0)
    random._set_cuda_rng_state = lambda *args, **kwargs: None
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    rope_utils.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank


def _on_cpu(factory):
    def make(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return make


def _pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """Chunks ``r`` and ``2cp-1-r`` of the position table (Megatron's load-balanced split)."""
    cp, rank = cp_group.size(), cp_group.rank()
    chunks = pos_emb.chunk(2 * cp, dim=seq_dim)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=seq_dim)


class SequenceParallelNorm(torch.nn.Module):
    """LayerNorm/RMSNorm that accepts sequence parallelism (see module docstring)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        self.norm = cls(hidden_size, eps=eps)
        for p in self.norm.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        return self.norm(x)


def sequence_parallel_block(layer_spec, num_layers: int):
    """A block spec of ``num_layers`` copies of ``layer_spec`` whose norms (layers' and final)
    are ``SequenceParallelNorm``, for sequence parallelism on CPU."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    layer_spec.submodules.input_layernorm = SequenceParallelNorm
    layer_spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=SequenceParallelNorm)
