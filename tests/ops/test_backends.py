"""The varlen backends, each against plain PyTorch attention, including the given-LSE backward."""

import pytest
import torch

from moba_megatron.ops.varlen import BACKENDS, available_backends, get_backend
from tests.helpers import assert_close, cu_seqlens_of


def dense_segments(q, k, v, cu_q, cu_k, causal, scale):
    group = q.shape[1] // k.shape[1]
    outs = []
    for (q0, q1), (k0, k1) in zip(
        zip(cu_q[:-1].tolist(), cu_q[1:].tolist()), zip(cu_k[:-1].tolist(), cu_k[1:].tolist())
    ):
        if q1 == q0:
            continue
        qs = q[q0:q1].transpose(0, 1)
        ks = k[k0:k1].repeat_interleave(group, 1).transpose(0, 1)
        vs = v[k0:k1].repeat_interleave(group, 1).transpose(0, 1)
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1)
        )
    return torch.cat(outs)


def check_backend(backend, device, dtype, tol):
    g = torch.Generator().manual_seed(0)
    cu_q = cu_seqlens_of([5, 0, 12, 9], device)
    cu_k = cu_seqlens_of([7, 3, 4, 9], device)
    q = torch.randn(26, 4, 16, generator=g).to(device, dtype)
    k = torch.randn(23, 2, 16, generator=g).to(device, dtype)
    v = torch.randn(23, 2, 16, generator=g).to(device, dtype)
    dout = torch.randn(26, 4, 16, generator=g).to(device, dtype)
    for causal, (cq, ck, kk, vv) in [(False, (cu_q, cu_k, k, v)), (True, (cu_q, cu_q, q[:, ::2], q[:, 1::2]))]:
        kk, vv = kk.contiguous(), vv.contiguous()
        out, lse = backend.forward(q, kk, vv, cq, ck, 12, 12, causal, 0.25)
        leaves = [x.detach().float().clone().requires_grad_() for x in (q, kk, vv)]
        ref = dense_segments(*leaves, cq, ck, causal, 0.25)
        ref.backward(dout.float())
        assert lse.shape == (4, 26) and lse.dtype == torch.float32
        assert_close(out, ref, tol, tol, f"{backend.name} out causal={causal}")
        grads = backend.backward(dout, q, kk, vv, out, lse, cq, ck, 12, 12, causal, 0.25)
        for name, gr, leaf in zip("qkv", grads, leaves):
            assert gr.shape == leaf.shape and gr.dtype == dtype
            assert_close(gr, leaf.grad, tol, tol, f"{backend.name} d{name} causal={causal}")


def test_torch_backend():
    check_backend(BACKENDS["torch"], "cpu", torch.float32, 1e-5)


def test_backward_uses_given_lse():
    """MoBA's exactness rests on this: a shifted LSE must scale the implied probabilities."""
    backend = BACKENDS["torch"]
    cu = cu_seqlens_of([6])
    q, k, v = (torch.randn(6, 1, 8) for _ in range(3))
    out, lse = backend.forward(q, k, v, cu, cu, 6, 6, False, 1.0)
    dout = torch.randn(6, 1, 8)
    dv = backend.backward(dout, q, k, v, out, lse, cu, cu, 6, 6, False, 1.0)[2]
    dv_shifted = backend.backward(dout, q, k, v, out, lse + 1.0, cu, cu, 6, 6, False, 1.0)[2]
    assert_close(dv_shifted, dv * torch.exp(torch.tensor(-1.0)), 1e-6, 1e-5, "dv")


def test_auto_picks_torch_on_cpu():
    x = torch.zeros(4, 2, 8)
    assert get_backend(None, x, x).name == "torch"
    assert "torch" in available_backends()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_flash_backend(dtype):
    check_backend(BACKENDS["torch_flash"], "cuda", dtype, 2e-2)


@pytest.mark.gpu
def test_auto_picks_a_flash_kernel_for_bf16_on_gpu():
    x = torch.zeros(4, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert get_backend(None, x, x).name in ("cudnn", "flash_attn", "torch_flash")
    wide = torch.zeros(4, 2, 192, device="cuda", dtype=torch.bfloat16)
    assert get_backend(None, wide, wide).name in ("flash_attn", "torch_flash")  # cuDNN tiles take D <= 128
    assert get_backend(None, x.float(), x.float()).name == "torch"
    with pytest.raises(ValueError, match="multiples of 8 up to 256"):
        get_backend("torch_flash", x[..., :12], x[..., :12])
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        get_backend("torch_flash", x.float(), x.float())
