"""Checkpoints: the model through megatron-core's dist_checkpointing (loadable into another TP
layout), optimizer and RNG state per rank, the step counter and schedule on rank 0.

``<dir>/latest_checkpointed_iteration.txt`` is rewritten (atomically) only after a save is complete,
so an interrupted run resumes from the last finished save.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

LATEST = "latest_checkpointed_iteration.txt"


def _rank_file(path: Path) -> Path:
    """Per-rank state; the name carries the layout, so another layout finds no file to misread."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    return path / f"rank{dist.get_rank():05d}_of_{dist.get_world_size():05d}_tp{tp}_cp{cp}.pt"


def save(directory: str, iteration: int, model, optimizer, scheduler) -> None:
    from megatron.core import dist_checkpointing

    root = Path(directory)
    path = root / f"iter_{iteration:07d}"
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.module.sharded_state_dict(), str(path))
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, _rank_file(path))
    if dist.get_rank() == 0:
        torch.save({"iteration": iteration, "scheduler": scheduler.state_dict()}, path / "train_state.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, root / LATEST)
    dist.barrier()


def load(directory: str, model, optimizer, scheduler, log) -> int:
    """Restore the latest checkpoint under ``directory``; returns its iteration."""
    from megatron.core import dist_checkpointing

    root = Path(directory)
    if not (root / LATEST).is_file():
        raise SystemExit(f"moba-pretrain: error: --load {directory}: no {LATEST} there (nothing was saved)")
    iteration = int((root / LATEST).read_text())
    path = root / f"iter_{iteration:07d}"
    state = dist_checkpointing.load(model.module.sharded_state_dict(), str(path))
    model.module.load_state_dict(state)
    rank_file = _rank_file(path)
    if rank_file.is_file():
        saved = torch.load(rank_file, weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
    else:
        log(f"checkpoint {path} was saved with another layout: model weights resharded, optimizer state restarted")
    train_state = torch.load(path / "train_state.pt", weights_only=False)
    scheduler.load_state_dict(train_state["scheduler"])
    return train_state["iteration"]
