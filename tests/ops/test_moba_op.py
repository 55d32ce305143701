"""moba_attn_varlen against the dense masked reference: outputs and q/k/v gradients."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moba_megatron import moba_attn_varlen
from moba_megatron.ops.moba import causal_attn_varlen_reference, gating, moba_attn_varlen_reference, routing
from tests.helpers import assert_close, cu_seqlens_of, make_qkv, run_with_grads


def check_against_reference(lens, chunk, topk, hq, hkv, d, *, seed=0, dtype=torch.float32, backend="torch",
                            device="cpu", attn=None):
    """``attn(q, k, v, cu_seqlens)`` (default: ``moba_attn_varlen`` on ``backend``) against the dense
    reference: output and q/k/v gradients."""
    q, k, v, cu = make_qkv(lens, hq, hkv, d, seed=seed, dtype=dtype, device=device)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    max_len = max(lens, default=0)
    if attn is None:
        def attn(a, b, c, cu):
            return moba_attn_varlen(a, b, c, cu, max_len, chunk, topk, backend=backend)
    out, grads = run_with_grads(lambda a, b, c: attn(a, b, c, cu), q, k, v, dout)
    # The reference runs in fp32 on the same (rounded) inputs.
    ref, ref_grads = run_with_grads(
        lambda a, b, c: moba_attn_varlen_reference(a, b, c, cu, chunk, topk),
        q.float(),
        k.float(),
        v.float(),
        dout.float(),
    )
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, what="out", **tol)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, rg, what=f"d{name}", **tol)


@pytest.mark.parametrize(
    "lens",
    [
        [64],  # blocks divide the length
        [50],  # partial last block
        [1],  # length-1 sequence
        [3, 1, 29, 0, 17],  # shorter than one block, length 1, an empty sequence
        [33, 40, 7],
    ],
)
@pytest.mark.parametrize("chunk", [4, 8])
@pytest.mark.parametrize("topk", [1, 2, 3])
def test_matches_reference(lens, chunk, topk):
    check_against_reference(lens, chunk, topk, hq=4, hkv=2, d=16)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("d", [8, 32, 64])
def test_gqa_and_head_dims(group, d):
    check_against_reference([45, 28], chunk=6, topk=3, hq=4, hkv=4 // group, d=d)


@pytest.mark.parametrize("chunk", [3, 5, 7])  # chunk sizes that are not powers of two
def test_odd_chunk_sizes(chunk):
    check_against_reference([31, 22], chunk=chunk, topk=3, hq=2, hkv=1, d=8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(dtype):
    check_against_reference([40, 25], chunk=8, topk=3, hq=4, hkv=2, d=16, dtype=dtype)


@pytest.mark.parametrize("lens,chunk", [([40, 9], 8), ([16], 16), ([100], 7)])
def test_topk_beyond_blocks_is_causal_attention(lens, chunk):
    q, k, v, cu = make_qkv(lens, 4, 2, 16, seed=3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    out, grads = run_with_grads(lambda a, b, c: moba_attn_varlen(a, b, c, cu, max(lens), chunk, 1000), q, k, v, dout)

    def sdpa(a, b, c):  # independent of the reference: PyTorch's own causal attention per sequence
        outs = []
        for s0, s1 in zip(cu[:-1].tolist(), cu[1:].tolist()):
            x = [t[s0:s1].transpose(0, 1) for t in (a, b.repeat_interleave(2, 1), c.repeat_interleave(2, 1))]
            outs.append(torch.nn.functional.scaled_dot_product_attention(*x, is_causal=True).transpose(0, 1))
        return torch.cat(outs)

    ref, ref_grads = run_with_grads(sdpa, q, k, v, dout)
    assert_close(out, ref, 2e-5, 2e-5, "out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, 2e-5, 2e-5, f"d{name}")
    assert_close(causal_attn_varlen_reference(q, k, v, cu), ref, 2e-5, 2e-5, "reference causal")


def test_selection_differs_from_dense():
    """A test that can fail: with a small topk MoBA must not be plain causal attention."""
    q, k, v, cu = make_qkv([64], 2, 2, 16)
    out = moba_attn_varlen(q, k, v, cu, 64, 8, 2)
    dense = causal_attn_varlen_reference(q, k, v, cu)
    assert (out - dense).abs().max() > 1e-2


def test_softmax_scale():
    q, k, v, cu = make_qkv([30], 2, 1, 8)
    out = moba_attn_varlen(q, k, v, cu, 30, 4, 2, softmax_scale=0.3)
    ref = moba_attn_varlen_reference(q, k, v, cu, 4, 2, softmax_scale=0.3)
    assert_close(out, ref, 2e-5, 2e-5, "out")


def test_ties_go_to_lower_block():
    # Blocks 0..3 hold identical keys, so every query ties across them; block 4 is the query's own.
    k = torch.ones(40, 1, 4)
    q = torch.ones(40, 1, 4)
    from moba_megatron.ops.moba.layout import block_layout

    layout = block_layout((0, 40), 8, torch.device("cpu"))
    sel = gating.select_blocks(q, gating.block_key_sums(k, layout), layout, 2)
    assert sel[39, 0].tolist() == [0, 1]
    assert sel[10, 0].tolist() == [0, -1]  # block 1 has only block 0 before it
    assert sel[3, 0].tolist() == [-1, -1]


def test_many_routes_and_tiles_match_one(monkeypatch):
    """Small route and tile budgets split the work into many kernel calls and the routing into a call a kv
    head; the result must not change."""
    q, k, v, cu = make_qkv([70, 35], 8, 4, 16, seed=7)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(8))
    fn = lambda a, b, c: moba_attn_varlen(a, b, c, cu, 70, 5, 4)  # noqa: E731
    out, grads = run_with_grads(fn, q, k, v, dout)
    monkeypatch.setattr(routing, "PIECE_BUDGET_ELEMENTS", 16)
    monkeypatch.setattr(routing, "STATE_BUDGET_ELEMENTS", 16)
    monkeypatch.setattr(routing, "ROUTING_ROWS_PER_QUERY_HEAD", 0)
    monkeypatch.setattr(gating, "_TILE_ELEMENTS", 64)
    out2, grads2 = run_with_grads(fn, q, k, v, dout)
    assert_close(out2, out, 1e-6, 1e-6, "out")
    for g, g2 in zip(grads, grads2):
        assert_close(g2, g, 1e-6, 1e-6, "grad")


def test_deterministic():
    q, k, v, cu = make_qkv([90], 4, 2, 16, seed=5)
    dout = torch.randn(q.shape)
    fn = lambda a, b, c: moba_attn_varlen(a, b, c, cu, 90, 8, 3)  # noqa: E731
    a = run_with_grads(fn, q, k, v, dout)
    b = run_with_grads(fn, q, k, v, dout)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_empty_batch():
    q = torch.zeros(0, 2, 8, requires_grad=True)
    k = torch.zeros(0, 1, 8, requires_grad=True)
    out = moba_attn_varlen(q, k, k, cu_seqlens_of([0, 0]), 0, 4, 2)
    assert out.shape == (0, 2, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lens=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    chunk=st.integers(1, 12),
    topk=st.integers(1, 6),
    group=st.sampled_from([1, 2, 4]),
    hkv=st.integers(1, 2),
    d=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_reference(lens, chunk, topk, group, hkv, d, seed):
    check_against_reference(lens, chunk, topk, hq=hkv * group, hkv=hkv, d=d, seed=seed)
