"""Varlen attention backends behind one interface (see ``base.VarlenBackend``)."""

from __future__ import annotations

import torch

from .base import VarlenBackend
from .cudnn_tiles import CudnnBackend
from .flash_attn import FlashAttnBackend
from .torch_flash import TorchFlashBackend
from .torch_ref import TorchBackend

# Best first: the first available backend that accepts the inputs is used when none is named.
BACKENDS: dict[str, VarlenBackend] = {
    b.name: b for b in (CudnnBackend(), FlashAttnBackend(), TorchFlashBackend(), TorchBackend())
}


def available_backends() -> list[str]:
    return [name for name, b in BACKENDS.items() if b.is_available()]


def get_backend(name: str | None, q: torch.Tensor, k: torch.Tensor) -> VarlenBackend:
    """The named backend, checked against the inputs, or the best one that takes them."""
    if name is None:
        for backend in BACKENDS.values():
            if not backend.is_available():
                continue
            try:
                backend.check_inputs(q, k)
            except ValueError:
                continue
            return backend
        raise AssertionError("the torch backend accepts every input")  # pragma: no cover
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)} or None")
    backend = BACKENDS[name]
    if not backend.is_available():
        raise ValueError(
            f"backend {name!r} is not available in this environment "
            f"(available: {available_backends()}); install it or pass backend=None"
        )
    backend.check_inputs(q, k)
    return backend


__all__ = ["BACKENDS", "VarlenBackend", "available_backends", "get_backend"]
