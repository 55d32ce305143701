"""Everything needed to run megatron-core on CPU (gloo), in one place: the CPU training job and
the tests use these.

- ``torch.cuda.current_device`` answers "cpu": megatron allocates buffers there.
- ``use_cpu_initialization=True`` in configs: the full weight is drawn on CPU from one seed and then
  split, so every TP size starts from the same weights.
- ``SequenceParallelNorm``: megatron's torch norm refuses sequence parallelism (apex/TE norms are not
  installable here); this one accepts it and marks its weights for the TP all-reduce of their grads.
- Dropout runs on the CPU generator: the CUDA RNG tracker's ``fork`` (entered around dropout even
  at p=0) and the CUDA RNG save/restore of activation recompute become no-ops.
- ``torch.cuda.synchronize`` (called by dist_checkpointing) is a no-op, and
  ``torch.cuda.current_stream`` (waited on by DDP's grad sync) a stream that waits for nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist


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
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    # Activation recompute saves and restores the CUDA RNG state; on CPU there is none to keep.
    random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0)
    random._set_cuda_rng_state = lambda *args, **kwargs: None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(rank: int, world_size: int, port: int, tp: int = 1, cp: int = 1, device: str = "cpu") -> None:
    from megatron.core import parallel_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        enable_cpu_shims()
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    if device == "cuda":  # dropout regions fork the model-parallel CUDA RNG even at p=0
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


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
