"""Input makers shared by the op tests."""

import torch


def cu_seqlens_of(lens, device="cpu") -> torch.Tensor:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def dyadic(*shape, generator=None, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Values k/8 in [-1, 1]: gate sums and dot products are exact in fp32, so the fast path and
    the reference rank blocks identically, and exact ties (which must go to the lower block) occur."""
    x = torch.randint(-8, 9, shape, generator=generator).to(torch.float32) / 8
    return x.to(device=device, dtype=dtype)


def make_qkv(lens, hq, hkv, d, *, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q = dyadic(t, hq, d, generator=g, device=device, dtype=dtype)
    k = dyadic(t, hkv, d, generator=g, device=device, dtype=dtype)
    v = torch.randn(t, hkv, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v, cu_seqlens_of(lens, device)


def run_with_grads(fn, q, k, v, dout):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout)
    return out.detach(), [x.grad for x in leaves]


def assert_close(actual, expected, atol, rtol, what):
    err = (actual.float() - expected.float()).abs()
    bound = atol + rtol * expected.float().abs()
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"{what}: max abs error {err.max().item():.3e} exceeds tolerance"
