"""Process-group setup for the megatron tests: one process per rank, on CPU (gloo) or GPU (NCCL)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from moba_megatron.megatron.cpu import enable_cpu_shims


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, fn, world: int, port: int, kwargs: dict) -> None:
    fn(rank, world, port, **kwargs)


# What every rank imports: loaded once by the fork server, so a rank starts with it in memory.
_PRELOAD = ["torch", "torch.distributed", "megatron.core.parallel_state", "megatron.core.models.gpt",
            "moba_megatron.megatron", "moba_megatron.parallel", "moba_megatron.pretrain"]


def spawn_ranks(fn, world: int, **kwargs) -> None:
    """Run ``fn(rank, world, port, **kwargs)`` in ``world`` processes, one per rank; ``fn`` must be
    a module-level function (it is pickled into the children).

    Without CUDA the ranks are forked from a fork server that imported torch and megatron-core once
    for the whole pytest run: a fresh interpreter spends seconds on those imports, most of a
    small test's time. (Forking the test process itself would copy its state: parallel groups and
    locks of earlier tests.) With CUDA, each rank is a fresh interpreter, as CUDA requires."""
    import multiprocessing

    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    method = "spawn" if torch.cuda.is_available() else "forkserver"
    if method == "forkserver":
        multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    mp.start_processes(_run_rank, args=(fn, world, free_port(), kwargs), nprocs=world, join=True, start_method=method)


def init_parallel(
    rank: int, world_size: int, port: int, tp: int = 1, cp: int = 1, device: str = "cpu", pp: int = 1
) -> None:
    from megatron.core import parallel_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        enable_cpu_shims()
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                             pipeline_model_parallel_size=pp)
    if device == "cuda":  # dropout regions fork the model-parallel CUDA RNG even at p=0
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
