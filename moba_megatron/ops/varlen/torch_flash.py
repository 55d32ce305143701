"""PyTorch's built-in FlashAttention-2 varlen kernels (``aten::_flash_attention_forward/_backward``).

Present in CUDA builds of PyTorch; no extra package needed. LSE comes back as ``[H, total_q]`` fp32.
"""

from __future__ import annotations

import torch

from .base import VarlenTiles, check_flash_inputs


class TorchFlashBackend(VarlenTiles):
    name = "torch_flash"
    triton_routes = True

    def is_available(self) -> bool:
        return torch.cuda.is_available() and hasattr(torch.ops.aten, "_flash_attention_forward")

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor) -> None:
        check_flash_inputs(self.name, q, k)

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        out, lse, _rng, _unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale
        )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        # Without dropout the RNG state is never read; the kernel only needs tensors in its place.
        rng = torch.empty(2, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng, rng, scale=scale
        )
        return dq, dk, dv
