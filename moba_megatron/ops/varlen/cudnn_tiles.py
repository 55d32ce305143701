"""cuDNN fused attention over equal-sized tiles: ``q [n, 1, L, D]`` against ``k, v [n, 1, C, D]``.

MoBA's selected blocks are always full blocks of C keys, so the queries routed to them can be cut
into tiles of L rows (the last tile of each block padded) and run as one dense, non-causal batched
attention. cuDNN does that at roughly twice FlashAttention-2's rate on Hopper (see
benchmarks/RESULTS.md). Backward takes the output and LSE it is given, like the varlen backends.
"""

from __future__ import annotations

import torch

from .base import PaddedTiles, VarlenTiles
from .torch_flash import TorchFlashBackend

MIN_TILE_KEYS = 16  # shorter blocks' routed tiles run on FA2's varlen kernels

_aten = torch.ops.aten


def cudnn_tiles_available(q: torch.Tensor) -> bool:
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if q.shape[-1] % 8 != 0 or q.shape[-1] > 128:
        return False
    if not hasattr(_aten, "_scaled_dot_product_cudnn_attention"):
        return False
    return torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(q.device) >= (8, 0)


def tiles_forward(q, k, v, scale: float):
    """Returns ``out [n, 1, L, D]`` and ``lse [n, 1, L]`` fp32."""
    res = _aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    return res[0], res[1].view(q.shape[:3])


def tiles_backward(dout, q, k, v, out, lse, scale: float):
    # Without dropout the RNG tensors are never read; cuDNN only wants tensors in their place.
    rng = torch.zeros((), dtype=torch.int64, device=q.device)
    n, h, lq, _ = q.shape
    return _aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.view(n, h, lq, 1), rng, rng, None, None, None,
        lq, k.shape[2], 0.0, False, scale=scale,
    )


class CudnnBackend(PaddedTiles, TorchFlashBackend):
    """Own blocks on cuDNN when every block is full (one dense batched causal call), else on
    PyTorch's FA2 varlen kernels. Selected blocks: the fused Triton kernels where they apply; the
    backward of large blocks on cuDNN in padded tiles, where cuDNN's rate outweighs the tile copies."""

    name = "cudnn"
    triton_routes = True  # PaddedTiles comes first in the MRO and says False
    tiles_backward_min_chunk = 4096  # below it the Triton backward is faster (benchmarks/RESULTS.md)

    def is_available(self) -> bool:
        return (
            super().is_available()
            and hasattr(_aten, "_scaled_dot_product_cudnn_attention")
            and torch.backends.cudnn.is_available()
        )

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor) -> None:
        super().check_inputs(q, k)
        if not cudnn_tiles_available(q):
            raise ValueError(
                f"backend 'cudnn' needs head_dim <= 128 on an sm80+ GPU, got head_dim {q.shape[-1]} "
                f"on {q.device}; use backend='torch_flash'"
            )

    def dense_forward(self, q, k, v, scale):
        return tiles_forward(q, k, v, scale)

    def dense_backward(self, dout, q, k, v, out, lse, scale):
        return tiles_backward(dout, q, k, v, out, lse, scale)

    def tile_width_for(self, chunk: int) -> int | None:
        # cuDNN takes no key tiles this short (chunk 1 fails in its plan): FA2 varlen tiles instead.
        return self.tile_width if chunk >= MIN_TILE_KEYS else None

    def tiles_forward(self, q_rows, k_tiles, v_tiles, tile_rows, width, max_rows, scale):
        tiles = PaddedTiles if width is not None else VarlenTiles
        return tiles.tiles_forward(self, q_rows, k_tiles, v_tiles, tile_rows, width, max_rows, scale)

    def tiles_backward(self, dout_rows, q_rows, k_tiles, v_tiles, out_rows, lse_rows, tile_rows, width, max_rows,
                       scale):
        tiles = PaddedTiles if width is not None else VarlenTiles
        return tiles.tiles_backward(self, dout_rows, q_rows, k_tiles, v_tiles, out_rows, lse_rows, tile_rows, width,
                                    max_rows, scale)

    @staticmethod
    def _uniform(q, k, cu_q, max_q, max_k, causal) -> int:
        """Segments count when every segment has the same length of at least two tokens (then the
        own-block call is a dense batched one; cuDNN refuses s_q = s_kv = 1); 0 otherwise. Decided
        from host values alone."""
        n = cu_q.numel() - 1
        same = causal and max_q == max_k > 1 and q.shape[0] == n * max_q and k.shape[0] == n * max_k
        return n if same and n > 0 else 0

    @staticmethod
    def _batched(x, n):
        t, h, d = x.shape
        return x.view(n, t // n, h, d).transpose(1, 2)

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        n = self._uniform(q, k, cu_q, max_q, max_k, causal)
        if not n:
            return super().forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
        res = _aten._scaled_dot_product_cudnn_attention(
            self._batched(q, n), self._batched(k, n), self._batched(v, n), None, True, 0.0, True, False, scale=scale
        )
        out = res[0].transpose(1, 2).reshape(q.shape)
        lse = res[1].reshape(n, q.shape[1], max_q).transpose(0, 1).reshape(q.shape[1], -1)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        n = self._uniform(q, k, cu_q, max_q, max_k, causal)
        if not n:
            return super().backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)
        hq = q.shape[1]
        lse_b = lse.view(hq, n, max_q).transpose(0, 1).reshape(n, hq, max_q, 1)
        rng = torch.zeros((), dtype=torch.int64, device=q.device)
        grads = _aten._scaled_dot_product_cudnn_attention_backward(
            self._batched(dout, n), self._batched(q, n), self._batched(k, n), self._batched(v, n),
            self._batched(out, n), lse_b, rng, rng, None, None, None, max_q, max_k, 0.0, True, scale=scale,
        )
        return tuple(g.transpose(1, 2).reshape(x.shape) for g, x in zip(grads, (q, k, v)))
