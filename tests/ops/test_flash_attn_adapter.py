"""The flash-attn backend, run against a pure-PyTorch stand-in of flash-attn 2.8's varlen API.

flash-attn cannot be built on the CI or GPU machines. The stand-in has the exact 2.8 signatures
(no **kwargs), so an adapter passing a wrong or missing argument fails here.
"""

import sys
import types

import pytest
import torch

from moba_megatron import moba_attn_varlen
from moba_megatron.ops.moba import moba_attn_varlen_reference
from moba_megatron.ops.varlen import BACKENDS, get_backend
from moba_megatron.ops.varlen.flash_attn import FlashAttnBackend
from moba_megatron.ops.varlen.torch_ref import TorchBackend
from tests.helpers import assert_close, make_qkv, run_with_grads

_math = TorchBackend()
calls = {"fwd": 0, "bwd": 0}


def _flash_attn_varlen_forward(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
    window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False,
    block_table=None, leftpad_k=None, seqused_k=None, zero_tensors=False,
):
    assert dropout_p == 0.0 and window_size_left == -1 and window_size_right == -1 and softcap == 0.0
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    calls["fwd"] += 1
    out, lse = _math.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale)
    return out, lse, None, torch.empty(2, dtype=torch.int64)


def _flash_attn_varlen_backward(
    dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
    deterministic, rng_state=None, zero_tensors=False,
):
    calls["bwd"] += 1
    grads = _math.backward(
        dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale
    )
    for buf, g in zip((dq, dk, dv), grads):
        buf.copy_(g)
    return torch.zeros(q.shape[1], q.shape[0])


@pytest.fixture
def stand_in(monkeypatch):
    pkg = types.ModuleType("flash_attn")
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface._flash_attn_varlen_forward = _flash_attn_varlen_forward
    iface._flash_attn_varlen_backward = _flash_attn_varlen_backward
    pkg.flash_attn_interface = iface
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", iface)
    # The real kernels need CUDA; the stand-in runs anywhere.
    monkeypatch.setattr(FlashAttnBackend, "check_inputs", lambda self, q, k: None)
    calls.update(fwd=0, bwd=0)


def test_adapter_matches_reference(stand_in):
    q, k, v, cu = make_qkv([37, 20], 4, 2, 16)
    dout = torch.randn(q.shape)
    out, grads = run_with_grads(
        lambda a, b, c: moba_attn_varlen(a, b, c, cu, 37, 6, 3, backend="flash_attn"), q, k, v, dout
    )
    ref, ref_grads = run_with_grads(lambda a, b, c: moba_attn_varlen_reference(a, b, c, cu, 6, 3), q, k, v, dout)
    assert calls["fwd"] >= 2 and calls["bwd"] >= 2  # own-block call and routed calls went through flash-attn
    assert_close(out, ref, 2e-5, 2e-5, "out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, 2e-5, 2e-5, f"d{name}")


def test_flash_attn_is_preferred_when_importable(stand_in):
    x = torch.zeros(4, 2, 8)
    assert get_backend(None, x, x) is BACKENDS["flash_attn"]
