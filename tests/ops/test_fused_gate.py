"""The fused Triton gate (ops/moba/fused_gate.py) against the PyTorch gate (exact fp32 scoring).

Dyadic inputs make every score exact in both, so the selections must be identical, ties included.
On random inputs the selections may differ only between blocks whose scores (computed in fp64)
differ by less than 1e-5 relative (docs/semantics.md). Without a GPU, Triton's interpreter runs the kernel."""

import os

import pytest
import torch

from moba_megatron.ops.moba import gating
from moba_megatron.ops.moba.layout import block_layout
from tests.helpers import make_qkv

pytest.importorskip("triton")
from moba_megatron.ops.moba import fused_gate  # noqa: E402 (needs triton)

if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets Triton's interpreter mode on CPU"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter has no bf16


def selections(lens, chunk, slots, hq, hkv, d, *, dyadic, dtype, seed=0, kernel=None):
    q, k, _, cu = make_qkv(lens, hq, hkv, d, seed=seed, dtype=dtype, device=DEVICE)
    if not dyadic:
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(q.shape, generator=g).to(DEVICE, dtype)
        k = torch.randn(k.shape, generator=g).to(DEVICE, dtype)
    layout = block_layout(tuple(cu.tolist()), chunk, q.device)
    sums = gating.block_key_sums(k, layout)
    if kernel is None:
        fused = gating.select_blocks(q, sums, layout, slots, fused=True)
    else:
        fused = fused_gate.select_blocks_fused(q, sums, layout.token_block, layout.token_first_block, slots,
                                               layout.max_candidates, kernel=kernel)
    exact = gating.select_blocks(q, sums, layout, slots)
    return q, sums, fused, exact


CASES = [
    ([300], 16, 1, 2, 2, 16),  # one slot, many blocks
    ([200, 1, 0, 90], 8, 3, 4, 2, 32),  # sequences shorter than a block, length 1, empty; GQA
    ([500, 37], 4, 7, 2, 1, 16),  # a tile of queries straddling two sequences
    # Many selections (long under the interpreter: the full suite only)
    pytest.param([700], 4, 63, 2, 2, 16, marks=pytest.mark.slow),  # top-k 64
    # top-k 128: the threshold kernel (insertion's most: test_insertion_keeps_up_to_128); tiles
    # straddling two sequences
    pytest.param([600, 200], 4, 127, 2, 1, 16, marks=pytest.mark.slow),
    # more selections than the first queries' candidates
    pytest.param([1300], 4, 300, 1, 1, 16, marks=pytest.mark.slow),
    pytest.param([900, 40, 700], 2, 200, 2, 2, 16, marks=pytest.mark.slow),  # ... tiles straddling three sequences
    ([3 * 8192 + 100], 8192, 2, 1, 1, 16),  # the largest block size
]


@pytest.mark.parametrize("lens,chunk,slots,hq,hkv,d", CASES)
def test_exact_scores_give_identical_selections(lens, chunk, slots, hq, hkv, d):
    dtype = torch.float32 if DEVICE == "cpu" else HALF
    _, _, fused, exact = selections(lens, chunk, slots, hq, hkv, d, dyadic=True, dtype=dtype)
    assert fused.dtype == torch.int32 and fused.shape == exact.shape
    assert torch.equal(fused, exact)


# The default gives these few selections to insertion: the threshold kernel on them too.
@pytest.mark.parametrize("lens,chunk,slots,hq,hkv,d", CASES[:3])
def test_threshold_kernel_gives_identical_selections(lens, chunk, slots, hq, hkv, d):
    dtype = torch.float32 if DEVICE == "cpu" else HALF
    _, _, fused, exact = selections(lens, chunk, slots, hq, hkv, d, dyadic=True, dtype=dtype, kernel="threshold")
    assert torch.equal(fused, exact)


def test_a_kernel_that_cannot_take_the_inputs_is_refused():
    q, sums = torch.zeros(8, 1, 16, device=DEVICE), torch.zeros(2, 1, 16, device=DEVICE)
    blocks = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="'insertion' gate kernel does not take 200 selections.*'threshold'"):
        fused_gate.select_blocks_fused(q, sums, blocks, blocks, 200, 300, kernel="insertion")
    with pytest.raises(ValueError, match="'threshold' gate kernel does not take 2 selections of up to 5000"):
        fused_gate.select_blocks_fused(q, sums, blocks, blocks, 2, 5000, kernel="threshold")


@pytest.mark.slow
def test_insertion_keeps_up_to_128(monkeypatch):
    """Insertion serves 65 to 128 selections where the threshold kernel cannot (past its candidates)."""
    monkeypatch.setattr(fused_gate, "THRESHOLD_MAX_CANDIDATES", 16)
    dtype = torch.float32 if DEVICE == "cpu" else HALF
    for slots in (65, 127):
        assert fused_gate.default_kernel(slots, 200) == "insertion"
        assert fused_gate.supports(torch.zeros(1, 1, 16), slots, 200)
        _, _, fused, exact = selections([600, 200], 4, slots, 2, 1, 16, dyadic=True, dtype=dtype)
        assert torch.equal(fused, exact)


# Blocks of 4 keys give 300 blocks: past 256 candidates a threshold program holds few queries and
# stops bisecting at an exact count, which all-tied scores never give.
@pytest.mark.parametrize("slots,kernel,chunk", [(2, "insertion", 8), (2, "threshold", 8), (130, "threshold", 8),
                                                (130, "threshold", 4)])
def test_ties_go_to_the_lower_block(slots, kernel, chunk):
    assert chunk == 8 or fused_gate.THRESHOLD_SCORES // 512 <= fused_gate.STOP_EARLY_QUERIES
    k = torch.ones(1200, 1, 16, device=DEVICE)
    q = torch.ones(1200, 1, 16, device=DEVICE)
    layout = block_layout((0, 1200), chunk, torch.device(DEVICE))
    sel = fused_gate.select_blocks_fused(q, gating.block_key_sums(k, layout), layout.token_block,
                                         layout.token_first_block, slots, layout.max_candidates, kernel=kernel)
    # Token 1199 has 149 or 299 candidates, all tied; token 10 one or two; token 3 none at blocks of 8.
    for token in (1199, 10, 3):
        n = min(slots, token // chunk)
        assert sel[token, 0].tolist() == list(range(n)) + [-1] * (slots - n)


@pytest.mark.parametrize("lens,chunk,slots,hq,hkv,d", CASES[:6] + [([4096], 64, 7, 4, 2, 128)])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_scores_differ_only_between_near_ties(lens, chunk, slots, hq, hkv, d, seed):
    q, sums, fused, exact = selections(lens, chunk, slots, hq, hkv, d, dyadic=False, dtype=HALF, seed=seed)
    rows = (fused != exact).any(-1).nonzero().tolist()
    group = hq // hkv
    for t, h in rows:
        a, b = set(fused[t, h].tolist()) - {-1}, set(exact[t, h].tolist()) - {-1}
        assert len(a) == len(b), f"query {t} head {h}: {sorted(a)} vs {sorted(b)}"
        score = {j: float(q[t, h].double() @ sums[j, h // group].double()) for j in a | b}
        for x in a - b:
            for y in b - a:
                gap = abs(score[x] - score[y]) / max(abs(score[x]), abs(score[y]), 1e-30)
                assert gap < 1e-5, f"query {t} head {h}: block {x} chosen over {y}, scores {score[x]} {score[y]}"
    assert len(rows) <= 0.01 * fused.shape[0] * fused.shape[1]
