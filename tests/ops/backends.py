"""Backends for tests on CPU: PyTorch kernels shaped like the GPU paths (padded tiles, as cuDNN's),
and the same with the fused Triton routed kernels, which Triton's interpreter runs on CPU."""

import torch

from moba_megatron.ops.varlen import BACKENDS
from moba_megatron.ops.varlen.base import PaddedTiles
from moba_megatron.ops.varlen.torch_ref import TorchBackend


class PaddedTorch(PaddedTiles, TorchBackend):
    """Padded tiles run by the plain PyTorch kernels, as one varlen call of equal segments."""

    name = "padded_torch"

    def __init__(self, width):
        self.tile_width = width

    @staticmethod
    def _as_varlen(q, k):
        n, _, lq, d = q.shape
        lk = k.shape[2]
        cu_q = torch.arange(0, n * lq + 1, lq, dtype=torch.int32)
        cu_k = torch.arange(0, n * lk + 1, lk, dtype=torch.int32)
        return cu_q, cu_k, lambda x: x.reshape(-1, 1, d)

    def dense_forward(self, q, k, v, scale):
        cu_q, cu_k, flat = self._as_varlen(q, k)
        out, lse = self.forward(flat(q), flat(k), flat(v), cu_q, cu_k, 0, 0, False, scale)
        return out.view(q.shape), lse.view(q.shape[:3])

    def dense_backward(self, dout, q, k, v, out, lse, scale):
        cu_q, cu_k, flat = self._as_varlen(q, k)
        grads = self.backward(
            flat(dout), flat(q), flat(k), flat(v), flat(out), lse.reshape(1, -1), cu_q, cu_k, 0, 0, False, scale
        )
        return [g.view(x.shape) for g, x in zip(grads, (q, k, v))]


class FusedOnTorch(TorchBackend):
    """Own blocks in plain PyTorch; the gate and the routed forward and backward in the Triton
    kernels (the CUDA backends' path for blocks below their tiles_backward_min_chunk)."""

    name = "fused_torch"
    triton_routes = True


class FusedOnPaddedTorch(PaddedTorch):
    """The Triton gate and routed forward, and the routed backward on padded tiles (the cuDNN path
    for large blocks) whose rows come from the Triton gather: it zeroes the padding rows' dO."""

    name = "fused_padded_torch"
    triton_routes = True
    tiles_backward_min_chunk = 0


def register(width: int = 32) -> None:
    """Make these backends selectable by name (``backend="fused_torch"``), e.g. in spawned ranks."""
    for backend in (PaddedTorch(width), FusedOnTorch(), FusedOnPaddedTorch(width)):
        BACKENDS[backend.name] = backend
