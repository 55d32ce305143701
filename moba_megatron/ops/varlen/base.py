"""The one interface every varlen attention kernel sits behind.

A backend computes, for packed segments, ``softmax(q k^T * scale) v`` and its log-sum-exp,
and the backward of that given an *externally supplied* output and LSE. MoBA needs the latter:
each partial attention is differentiated against the merged output and merged LSE, which is
what makes the gradients of the split computation exact.

Shapes (THD): ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA is native),
``cu_q [S+1]``, ``cu_k [S+1]`` int32 on the tensors' device, ``lse [Hq, Tq]`` fp32.
``causal=True`` is only used with equal query and key lengths per segment.
"""

from __future__ import annotations

from typing import Protocol

import torch


class VarlenBackend(Protocol):
    name: str
    # MoBA's gate and routed calls may use the Triton kernels of ops/moba/fused_gate.py and
    # fused_routes.py: set by the CUDA backends, whose inputs those kernels take.
    triton_routes: bool
    # Blocks from this size on run the routed backward on the backend's tiles rather than the
    # Triton kernel (None: never).
    tiles_backward_min_chunk: int | None

    def tile_width_for(self, chunk: int) -> int | None:
        """How MoBA's routed tile calls are shaped (see VarlenTiles / PaddedTiles below)."""

    def is_available(self) -> bool:
        """Whether the kernels can be loaded in this process at all."""

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise ValueError naming the problem if this backend cannot take these tensors."""

    def forward(
        self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(out [Tq, Hq, D], lse [Hq, Tq] fp32)``."""

    def backward(
        self, dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(dq, dk, dv)`` shaped like ``q, k, v``."""

    def tiles_forward(self, q_rows, k_tiles, v_tiles, tile_rows, width, max_rows: int, scale: float):
        """MoBA's routed call: query rows against one block of keys per tile (non-causal)."""

    def tiles_backward(
        self, dout_rows, q_rows, k_tiles, v_tiles, out_rows, lse_rows, tile_rows, width, max_rows, scale
    ):
        """Its backward, against the given (merged) output and LSE."""


def check_flash_inputs(name: str, q: torch.Tensor, k: torch.Tensor) -> None:
    """Limits shared by the FlashAttention-2 kernels (flash-attn and PyTorch's copy of them)."""
    if q.device.type != "cuda":
        raise ValueError(
            f"backend {name!r} needs CUDA tensors, got q on {q.device}; "
            "move the inputs to a GPU or use backend='torch'"
        )
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"backend {name!r} takes float16 or bfloat16, got {q.dtype}; "
            "cast q, k, v to bf16/fp16 or use backend='torch' for fp32"
        )
    head_dim = q.shape[-1]
    if head_dim % 8 != 0 or head_dim > 256:
        raise ValueError(
            f"backend {name!r} takes head dims that are multiples of 8 up to 256, got {head_dim}; "
            "use backend='torch' for this head dim"
        )


class VarlenTiles:
    """MoBA's routed calls on a varlen backend: each tile of query rows is one varlen segment
    attending its own block of C keys (non-causal).

    Shapes: ``q_rows [n, D]`` packed tile after tile, ``k_tiles, v_tiles [tiles, C, D]``,
    ``tile_rows [tiles]`` int64 on the device (summing to n), ``lse_rows [n]`` fp32.
    """

    triton_routes: bool = False
    tiles_backward_min_chunk: int | None = None

    def tile_width_for(self, chunk: int) -> int | None:
        return None  # one unpadded tile per run

    @staticmethod
    def _cu(tile_rows: torch.Tensor, k_tiles: torch.Tensor):
        nt, chunk, d = k_tiles.shape
        cu_q = torch.nn.functional.pad(tile_rows.cumsum(0), (1, 0)).to(torch.int32)
        cu_k = torch.arange(0, nt * chunk + 1, chunk, dtype=torch.int32, device=tile_rows.device)
        return cu_q, cu_k, chunk

    def tiles_forward(self, q_rows, k_tiles, v_tiles, tile_rows, width, max_rows: int, scale: float):
        cu_q, cu_k, chunk = self._cu(tile_rows, k_tiles)
        d = q_rows.shape[-1]
        out, lse = self.forward(
            q_rows[:, None], k_tiles.view(-1, 1, d), v_tiles.view(-1, 1, d), cu_q, cu_k, max_rows, chunk, False, scale
        )
        return out[:, 0], lse[0]

    def tiles_backward(
        self, dout_rows, q_rows, k_tiles, v_tiles, out_rows, lse_rows, tile_rows, width, max_rows, scale
    ):
        cu_q, cu_k, chunk = self._cu(tile_rows, k_tiles)
        d = q_rows.shape[-1]
        dq, dk, dv = self.backward(
            dout_rows[:, None], q_rows[:, None], k_tiles.view(-1, 1, d), v_tiles.view(-1, 1, d), out_rows[:, None],
            lse_rows[None], cu_q, cu_k, max_rows, chunk, False, scale,
        )
        return dq[:, 0], dk.view(k_tiles.shape), dv.view(v_tiles.shape)


class PaddedTiles:
    """MoBA's routed calls on a fixed-shape batched kernel: every tile of a call is padded to the
    call's ``width`` and run as ``q [tiles, 1, width, D]`` against ``k, v [tiles, 1, C, D]``.
    Padding rows arrive with zero upstream gradient, so they add nothing to dK and dV. Tiles are at
    most ``tile_width`` rows; a run's last tile is padded to one of a few widths, and calls hold a
    power-of-two number of tiles, so a training run meets a bounded set of shapes (a fixed-shape
    kernel such as cuDNN's builds a plan per shape; see ``routing.pack_tiles``).

    Subclasses provide ``dense_forward(q, k, v, scale) -> (out, lse [tiles, 1, width])`` and
    ``dense_backward(dout, q, k, v, out, lse, scale) -> (dq, dk, dv)`` (non-causal).
    """

    tile_width: int = 16384
    triton_routes: bool = False
    tiles_backward_min_chunk: int | None = None

    def tile_width_for(self, chunk: int) -> int:
        return self.tile_width

    def tiles_forward(self, q_rows, k_tiles, v_tiles, tile_rows, width, max_rows, scale):
        nt, chunk, d = k_tiles.shape
        out, lse = self.dense_forward(
            q_rows.view(nt, 1, width, d), k_tiles.view(nt, 1, chunk, d), v_tiles.view(nt, 1, chunk, d), scale
        )
        return out.view(-1, d), lse.reshape(-1)

    def tiles_backward(
        self, dout_rows, q_rows, k_tiles, v_tiles, out_rows, lse_rows, tile_rows, width, max_rows, scale
    ):
        nt, chunk, d = k_tiles.shape
        shape = (nt, 1, width, d)
        dq, dk, dv = self.dense_backward(
            dout_rows.view(shape), q_rows.view(shape), k_tiles.view(nt, 1, chunk, d), v_tiles.view(nt, 1, chunk, d),
            out_rows.view(shape), lse_rows.view(nt, 1, width), scale,
        )
        return dq.view(-1, d), dk.view(k_tiles.shape), dv.view(v_tiles.shape)
