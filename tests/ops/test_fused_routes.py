"""MoBA with the fused Triton routed forward (ops/moba/fused_routes.py) against the dense reference:
outputs and q/k/v gradients. Without a GPU, Triton's interpreter runs the same kernels on CPU (fp32
and fp16: the interpreter has no bf16); GPU runs also go through tests/gpu (bf16, both CUDA backends)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moba_megatron.ops.moba.function import MoBAFunction
from moba_megatron.ops.moba.layout import block_layout
from tests.ops.backends import FusedOnPaddedTorch, FusedOnTorch
from tests.ops.test_moba_op import check_against_reference

pytest.importorskip("triton")
if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets Triton's interpreter mode on CPU"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check(lens, chunk, topk, hq, hkv, d, dtype, seed=0, backend=None):
    backend = backend or FusedOnTorch()

    def fused(q, k, v, cu):
        layout = block_layout(tuple(cu.tolist()), chunk, q.device)
        return MoBAFunction.apply(q, k, v, layout, topk, d**-0.5, backend)

    check_against_reference(lens, chunk, topk, hq, hkv, d, seed=seed, dtype=dtype, device=DEVICE, attn=fused)


@pytest.mark.parametrize(
    "lens,chunk,topk,hq,hkv,d",
    [
        ([256], 32, 3, 2, 2, 16),  # several routed rows per block
        ([200, 1, 90], 32, 2, 4, 2, 32),  # partial last blocks, length 1, GQA 2, one routed slot
        ([160], 16, 9, 4, 1, 16),  # GQA 4, top-k beyond the blocks (dense causal)
        ([130, 0, 70], 48, 4, 2, 1, 32),  # an empty sequence, a chunk the key step (16) divides
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_routes_match_reference(lens, chunk, topk, hq, hkv, d, dtype, padded):
    if DEVICE == "cuda" and dtype == torch.float32:
        pytest.skip("on GPUs the kernels' dots run in tf32; fp32 is checked by the interpreter")
    check(lens, chunk, topk, hq, hkv, d, dtype, backend=FusedOnPaddedTorch(64) if padded else None)


@pytest.mark.parametrize(
    "lens,chunk,topk,hq,hkv,d",
    [
        # top-k 128 and past it: the threshold gate (above 64 selections)
        pytest.param([2100], 16, 128, 1, 1, 16, marks=pytest.mark.slow),
        pytest.param([2400], 16, 140, 1, 1, 16, marks=pytest.mark.slow),
        ([700, 33, 300], 48, 20, 4, 2, 16),  # several sequences, partial blocks, GQA 2
        ([500, 260], 80, 1, 2, 2, 16),  # top-k 1: own blocks only
        ([600], 80, 12, 2, 2, 32),  # top-k beyond the 8 blocks: dense causal
        ([300, 1000], 128, 5, 2, 1, 16),  # GQA 2
        ([4500], 2048, 2, 2, 2, 16),  # large blocks, a partial last one
    ],
)
def test_block_sizes_and_top_k(lens, chunk, topk, hq, hkv, d):
    """Blocks from 16 to 2048 keys and top-k from 1 to past 128, through the fused gate and routes."""
    check(lens, chunk, topk, hq, hkv, d, torch.float32 if DEVICE == "cpu" else torch.float16)


@pytest.mark.parametrize(
    "topk,budget,rows_a_query_head",
    [
        (3, 256 * 2 * 16, 10**9),  # one head's state exactly: a group a head, each filled and merged alone
        (6, 256 * 2 * 16, 0),  # 5 slots over the budget: parts of 2, 2 and 1 slots, or windows; a kv head a call
        (3, 1, 0),  # a part a slot, or windows of 64 tokens
    ],
)
def test_head_groups_and_slot_parts(monkeypatch, topk, budget, rows_a_query_head):
    from moba_megatron.ops.moba import routing

    monkeypatch.setattr(routing, "STATE_BUDGET_ELEMENTS", budget)
    monkeypatch.setattr(routing, "ROUTING_ROWS_PER_QUERY_HEAD", rows_a_query_head)
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    check([192, 64], 32, topk, 4, 2, 16, dtype)  # the Triton backward: slots whole, the forward in windows
    check([192, 64], 32, topk, 4, 2, 16, dtype, backend=FusedOnPaddedTorch(16))  # the tile backward: parts


def test_forward_token_windows(monkeypatch):
    """Under the Triton backward a head keeps its slots whole; where a head group's merge grid is over
    the budget the fused forward takes its tokens in windows (here 3 of 128, 128 and 44 tokens, across
    sequence boundaries), each attended and merged on its own."""
    from moba_megatron.ops.moba import routed, routing

    monkeypatch.setattr(routing, "STATE_BUDGET_ELEMENTS", 128 * 2 * 16)  # 128 tokens of one head's 2 slots
    seen = []
    windows = routed.token_windows
    monkeypatch.setattr(routed, "token_windows", lambda *args: seen.append(windows(*args)) or seen[-1])
    check([150, 60, 90], 32, 3, 4, 2, 16, torch.float32 if DEVICE == "cpu" else torch.float16)
    assert seen and all(w == [(0, 128), (128, 256), (256, 300)] for w in seen)


def test_tile_backward_of_several_calls_per_head_group(monkeypatch):
    """One head per group, calls of at most 4 tiles of at most 8 rows: each group's dq is folded from
    the rows of several call outputs, wherever they lie."""
    from moba_megatron.ops.moba import routing

    monkeypatch.setattr(routing, "STATE_BUDGET_ELEMENTS", 1)
    monkeypatch.setattr(routing, "PIECE_BUDGET_ELEMENTS", 4 * (8 + 2 * 32) * 16)
    monkeypatch.setattr(routing, "ROUTING_ROWS_PER_QUERY_HEAD", 0)  # a kv head's rows sorted at a time
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    check([192, 64], 32, 3, 4, 2, 16, dtype, backend=FusedOnPaddedTorch(8))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lens=st.lists(st.integers(0, 120), min_size=1, max_size=3),
    chunk=st.sampled_from([16, 32, 48]),
    topk=st.integers(2, 6),
    group=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([16, 32]),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_fused_routes(lens, chunk, topk, group, d, padded, seed):
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    check(lens, chunk, topk, 2 * group, 2, d, dtype, seed=seed, backend=FusedOnPaddedTorch(32) if padded else None)


@pytest.mark.gpu
def test_merge_of_a_grid_beyond_int32_offsets():
    """The routed CP exchange merges every head at once: at 512K tokens x 8 heads x 11 slots x 128
    the grid has 5.9e9 elements, past int32 offsets. Merge a 2.2e9-element grid and check the last
    tokens (the ones whose offsets overflow int32) against the PyTorch merge."""
    from moba_megatron.ops.moba.fused_routes import merge_into
    from moba_megatron.ops.moba.routed import merge_partials
    from tests.helpers import assert_close

    t, nh, slots, d, tail = 1 << 20, 1, 17, 128, 4096
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=g)

    out, lse = randn(t, nh, d, dtype=torch.bfloat16), randn(nh, t)
    grid_out, grid_lse = randn(t * nh * slots + 1, d, dtype=torch.bfloat16), randn(t * nh * slots + 1)
    assert grid_out.numel() > 2**31
    last = slice(-(tail * nh * slots + 1), None)  # the tail's cells and the spare row
    want_out, want_lse = merge_partials(out[-tail:], lse[:, -tail:], grid_out[last], grid_lse[last])
    merge_into(out, lse, 0, nh, grid_out, grid_lse, slots)
    assert_close(out[-tail:], want_out, 1e-2, 1e-2, "merged out")
    assert_close(lse[:, -tail:], want_lse, 1e-5, 1e-5, "merged lse")


def test_merge_skips_unused_slots():
    """``routed_forward`` leaves the output rows of unused slots (LSE -inf) uninitialised: whatever
    they hold, NaN included, must not reach the merged output."""
    from moba_megatron.ops.moba.fused_routes import merge_into
    from moba_megatron.ops.moba.routed import merge_partials
    from tests.helpers import assert_close

    t, nh, slots, d = 40, 2, 3, 16
    g = torch.Generator(device=DEVICE).manual_seed(0)
    out = torch.randn(t, nh, d, device=DEVICE, generator=g)
    lse = torch.randn(nh, t, device=DEVICE, generator=g)
    grid_out = torch.randn(t * nh * slots + 1, d, device=DEVICE, generator=g)
    grid_lse = torch.randn(t * nh * slots + 1, device=DEVICE, generator=g)
    unused = torch.rand(grid_lse.shape, device=DEVICE, generator=g) < 0.4
    grid_lse[unused] = float("-inf")
    want_out, want_lse = merge_partials(out, lse, grid_out, grid_lse)  # unused rows finite: weight 0
    grid_out[unused] = float("nan")
    merge_into(out, lse, 0, nh, grid_out, grid_lse, slots)
    assert_close(out, want_out, 1e-5, 1e-5, "merged out")
    assert_close(lse, want_lse, 1e-5, 1e-5, "merged lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slots", [1, 3])
def test_fold_into_a_slice_of_heads(dtype, slots):
    """``fold_into`` adds the slot sum of a grid into a strided slice of heads, in fp32, rounding once
    (fp16 parts; fp32, as the tile backward's dK/dV accumulators are)."""
    from moba_megatron.ops.moba.fused_routes import fold_into

    g = torch.Generator(device=DEVICE).manual_seed(0)
    dst = torch.randn(37, 5, 16, device=DEVICE, generator=g).to(dtype)
    parts = torch.randn(37, 2, slots, 16, device=DEVICE, generator=g).to(dtype)
    want = dst.clone()
    want[:, 1:3] = (want[:, 1:3].float() + parts.float().sum(2)).to(dtype)
    fold_into(dst[:, 1:3], parts)
    torch.testing.assert_close(dst, want, rtol=1e-3 if dtype == torch.float16 else 0, atol=1e-6)
