"""Checkpoints through megatron-core's dist_checkpointing: the model and the optimizer state beside
it (megatron-core's optimizer on GPUs, ``CpuAdamW`` on CPU), both keyed by the model's sharded
parameters and so loadable into another TP/CP/DP layout; per rank, the RNG state; on rank 0 the
step counter and schedule.

``<dir>/latest_checkpointed_iteration.txt`` is rewritten (atomically) only after a save is complete,
so an interrupted run resumes from the last finished save.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import JobError

LATEST = "latest_checkpointed_iteration.txt"
RELEASE = "release"


def _rank_file(path: Path) -> Path:
    """Per-rank state; the name carries the layout, so another layout finds no file to misread."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    return path / f"rank{dist.get_rank():05d}_of_{dist.get_world_size():05d}_tp{tp}_cp{cp}.pt"


def _sharded(model, optimizer, loading: bool) -> dict:
    """Model and optimizer state, the optimizer's keyed by the model's sharded parameters so it
    reshards like them."""
    model_state = model.module.sharded_state_dict()
    if loading:
        _ensure_optimizer_state(optimizer)
    # The distributed optimizer's one format that reshards over TP as well as DP (its default,
    # fully_sharded_model_space, is refused by dist_checkpointing 0.19); other optimizers ignore it.
    metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    return {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=loading, metadata=metadata),
    }


def _inner_optimizers(optimizer) -> list:
    """megatron-core's optimizer, or each one of a chained optimizer (one per param group kind)."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _ensure_optimizer_state(optimizer) -> None:
    """The distributed optimizer's state dict reads every parameter's Adam step, which exists only
    after a first step; megatron-core makes one with zero gradients before loading into it (as for
    its FSDP format), and the load then overwrites all of it."""
    for inner in _inner_optimizers(optimizer):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _skip_torch_adam_step(optimizer) -> None:
    """megatron-core 0.19's distributed optimizer, loading its reshardable parameter state into
    torch's Adam (no TE/apex), looks for each parameter's "step" tensor among the loaded tensors,
    which never hold it (the step comes back through the param groups), and fails with
    ``KeyError: 'step'``. A non-tensor "step" entry is what that loop already skips."""
    for inner in _inner_optimizers(optimizer):
        set_states = getattr(inner, "_set_main_param_and_optimizer_states", None)
        if set_states is None or getattr(set_states, "skips_step", False):
            continue

        def set_states_without_step(model_param, tensors, _set_states=set_states):
            _set_states(model_param, {"step": None, **tensors})

        set_states_without_step.skips_step = True
        inner._set_main_param_and_optimizer_states = set_states_without_step


def _unshare_torch_adam_steps(optimizer) -> None:
    """The same load (torch's Adam under megatron-core's distributed optimizer) puts *one* step
    tensor into every parameter's state; torch's foreach Adam then adds 1 to it once per parameter
    and step, and the bias corrections of the resumed run go wrong. Each parameter gets its own."""
    for inner in _inner_optimizers(optimizer):
        torch_optimizer = getattr(inner, "optimizer", None)
        if not isinstance(torch_optimizer, torch.optim.Optimizer):
            continue
        for param_state in torch_optimizer.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()


def save(directory: str, iteration: int, model, optimizer, scheduler) -> None:
    from megatron.core import dist_checkpointing

    root = Path(directory)
    path = root / f"iter_{iteration:07d}"
    if dist.get_rank() == 0:
        if path.exists() and latest_iteration(directory) != iteration:
            shutil.rmtree(path)  # what an interrupted save of this iteration left behind
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded(model, optimizer, loading=False), str(path))
    torch.save({"rng": torch.get_rng_state()}, _rank_file(path))
    _fault_in_save(iteration)
    if dist.get_rank() == 0:
        torch.save({"iteration": iteration, "scheduler": scheduler.state_dict()}, path / "train_state.pt")
    _track(root, str(iteration))


def _track(root: Path, name: str) -> None:
    """Once every rank has written its part: rank 0 points the tracker at ``name`` (atomically)."""
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(name)
        os.replace(tmp, root / LATEST)
    dist.barrier()


def _tracked(directory: str) -> str | None:
    """What the tracker names: an iteration, or "release" (converted weights, Megatron-LM's name)."""
    tracker = Path(directory) / LATEST
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not (text.isdigit() or text == RELEASE):
        raise JobError(f"--load {directory}: {LATEST} holds {text!r}, not an iteration")
    return text


def holds_weights_only(directory: str) -> bool:
    """Whether ``directory``'s checkpoint is released weights (no optimizer or schedule state)."""
    return _tracked(directory) == RELEASE


def checkpoint_path(directory: str, tracked: str) -> Path:
    return Path(directory) / (RELEASE if tracked == RELEASE else f"iter_{int(tracked):07d}")


def latest_iteration(directory: str) -> int | None:
    """The iteration of the last complete save under ``directory`` (0 for released weights), None
    if there is none."""
    tracked = _tracked(directory)
    return None if tracked is None else 0 if tracked == RELEASE else int(tracked)


def _existing(directory: str, tracked: str) -> Path:
    path = checkpoint_path(directory, tracked)
    if not path.is_dir():
        raise JobError(f"--load {directory}: {LATEST} names {tracked}, but {path} is missing")
    return path


def save_weights(directory: str, model) -> None:
    """The model alone as released weights (``release/``, as converters write them): what
    ``--load`` then starts from at iteration 0, with a fresh optimizer."""
    from megatron.core import dist_checkpointing

    root = Path(directory)
    path = root / RELEASE
    if dist.get_rank() == 0:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(path))
    _track(root, RELEASE)


def load_weights(directory: str, model, log=None) -> int:
    """The model's weights from the latest checkpoint (any layout); returns its iteration. Used by
    ``--finetune`` and for released weights: no optimizer, schedule or RNG state. A key convolution
    the checkpoint does not hold (``--moba-key-conv`` added to a model trained without it) keeps its
    identity start, and ``log`` says so."""
    from megatron.core import dist_checkpointing

    tracked = _tracked(directory)
    if tracked is None:
        raise JobError(f"--load {directory} --finetune: no checkpoint there ({LATEST} missing)")
    path = str(_existing(directory, tracked))
    module = getattr(model, "module", model)  # the job's DDP wrapper, or a bare model
    wanted = module.sharded_state_dict()
    held = dist_checkpointing.load_tensors_metadata(path)
    new = [name for name, tensor in wanted.items() if ".key_conv." in name and getattr(tensor, "key", name) not in held]
    for name in new:
        del wanted[name]
    # every other tensor must be there (dist_checkpointing refuses a missing one), so only the new
    # convolutions stay unloaded
    state = dist_checkpointing.load({"model": wanted}, path)
    module.load_state_dict(state["model"], strict=not new)
    if new and log is not None:
        log(f"--load {directory}: the checkpoint has no key convolution; it starts at the identity")
    return 0 if tracked == RELEASE else int(tracked)


def _fault_in_save(iteration: int) -> None:
    """Fault injection for the tests of interrupted saves: ``MOBA_FAULT_KILL_IN_SAVE=N`` kills the
    last rank with SIGKILL in the save of iteration N, after its shards are written and before the
    tracker names N (only in the first run of a torchrun job, not in its restarts)."""
    target = os.environ.get("MOBA_FAULT_KILL_IN_SAVE")
    first_run = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if target and int(target) == iteration and first_run and dist.get_rank() == dist.get_world_size() - 1:
        os.kill(os.getpid(), signal.SIGKILL)


def load(directory: str, model, optimizer, scheduler) -> int:
    """Restore the latest checkpoint under ``directory``; returns its iteration, 0 where there is
    none yet (as Megatron-LM: ``--save D --load D`` starts a run and resumes it after a restart).
    Released weights (``holds_weights_only``) hold no optimizer state: ``load_weights`` takes them."""
    from megatron.core import dist_checkpointing

    tracked = _tracked(directory)
    if tracked is None:
        return 0
    path = _existing(directory, tracked)
    state = dist_checkpointing.load(_sharded(model, optimizer, loading=True), str(path))
    model.module.load_state_dict(state["model"])
    _skip_torch_adam_step(optimizer)
    optimizer.load_state_dict(state["optimizer"])
    _unshare_torch_adam_steps(optimizer)
    rank_file = _rank_file(path)
    if rank_file.is_file():  # same layout: this rank's random stream continues exactly
        torch.set_rng_state(torch.load(rank_file, weights_only=False)["rng"])
    train_state = torch.load(path / "train_state.pt", weights_only=False)
    scheduler.load_state_dict(train_state["scheduler"])
    return train_state["iteration"]
