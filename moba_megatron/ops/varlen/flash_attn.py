"""The flash-attn package (2.8 API) as a backend.

Written against ``flash_attn.flash_attn_interface._flash_attn_varlen_forward/_backward`` of
flash-attn 2.8. flash-attn cannot be built on this project's CI or GPU machines, so this adapter is
tested against a pure-PyTorch stand-in of that API (tests/ops/test_flash_attn_adapter.py).
"""

from __future__ import annotations

import importlib

import torch

from .base import VarlenTiles, check_flash_inputs


def _interface():
    return importlib.import_module("flash_attn.flash_attn_interface")


class FlashAttnBackend(VarlenTiles):
    name = "flash_attn"

    def is_available(self) -> bool:
        try:
            _interface()
        except ImportError:
            return False
        return True

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor) -> None:
        check_flash_inputs(self.name, q, k)

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        out, lse, _s_dmask, _rng = _interface()._flash_attn_varlen_forward(
            q,
            k,
            v,
            cu_q,
            cu_k,
            max_q,
            max_k,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=causal,
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
            return_softmax=False,
        )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _interface()._flash_attn_varlen_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            dq,
            dk,
            dv,
            cu_q,
            cu_k,
            max_q,
            max_k,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=causal,
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
            deterministic=False,
            rng_state=None,
        )
        return dq, dk, dv
