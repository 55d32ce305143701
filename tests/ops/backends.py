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
        grads = self.backward(flat(dout), flat(q), flat(k), flat(v), flat(out), lse.reshape(1, -1), cu_q, cu_k, 0, 0, False, scale)
        return [g.view(x.shape) for g, x in zip(grads, (q, k, v))]


class FusedOnTorch(TorchBackend):
    """Own blocks and the kernel backward in plain PyTorch; the routed forward and the backward's
    row gathers in the Triton kernels (unpadded varlen tiles)."""

    name = "fused_torch"
    triton_routes = True


class FusedOnPaddedTorch(PaddedTorch):
    """The same with padded tiles (the cuDNN path's shape): gathers zero the padding rows' dO."""

    name = "fused_padded_torch"
    triton_routes = True


def register(width: int = 32) -> None:
    """Make these backends selectable by name (``backend="fused_torch"``), e.g. in spawned ranks."""
    for backend in (PaddedTorch(width), FusedOnTorch(), FusedOnPaddedTorch(width)):
        BACKENDS[backend.name] = backend
