"""The union-tile benchmark's masks: FlexAttention over a selection's exact block mask is MoBA (the
benchmark's timings of it are only worth as much as this), and its synthetic selections share the
union they are asked to share."""

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from moba_megatron.ops.moba.gating import block_key_sums, select_blocks
from moba_megatron.ops.moba.layout import block_layout
from moba_megatron.ops.moba.naive import moba_attn_varlen_reference
from tests.helpers.scripts import benchmark_module

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.mark.parametrize("chunk, topk", [(32, 9), (64, 5), (128, 3), (256, 2), (128, 20)])
def test_exact_union_mask_is_moba(chunk, topk):
    bench = benchmark_module("bench_union_tiles")
    torch.manual_seed(chunk + topk)
    t, h, d = 768, 2, 16
    q, k, v = (torch.randn(t, h, d, dtype=torch.float32) for _ in range(3))
    layout = block_layout((0, t), chunk, q.device)
    sel = select_blocks(q, block_key_sums(k, layout), layout, topk - 1)
    mask = bench.selection_mask(sel, layout.token_block, layout.num_blocks)
    block_mask, density = bench.union_block_mask(mask, chunk, exact=True)
    x = [y.unsqueeze(0).transpose(1, 2) for y in (q, k, v)]
    got = flex_attention(*x, block_mask=block_mask).transpose(1, 2)[0]
    want = moba_attn_varlen_reference(q, k, v, torch.tensor([0, t]), chunk, topk)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert 0 < density <= 1
    # The union bound attends whole tiles: more keys than MoBA, another output unless every query
    # selects every candidate.
    bound, same = bench.union_block_mask(mask, chunk, exact=False)
    assert same == density
    if topk - 1 < layout.max_candidates:  # some query leaves out a block its tile attends
        assert not torch.allclose(flex_attention(*x, block_mask=bound).transpose(1, 2)[0], want)


@pytest.mark.parametrize("union", [0.2, 0.5, 1.0])
def test_synthetic_tiles_share_their_union(union):
    bench = benchmark_module("bench_union_tiles")
    t, h, chunk, topk = 2048, 3, 64, 9
    sel = bench.synthetic_selection(t, h, chunk, topk, union, torch.Generator().manual_seed(0))
    assert sel.shape == (t, h, topk - 1)
    tile = bench.TILE
    for i in range(1, t // tile):
        candidates = i * tile // chunk
        rows = sel[i * tile : (i + 1) * tile]
        assert (rows < candidates).all()  # blocks before the tile only
        assert ((rows >= 0).sum(-1) == min(topk - 1, candidates)).all()  # as many as a query picks
        for head in range(h):
            used = rows[:, head][rows[:, head] >= 0].unique().numel()
            assert used <= max(min(topk - 1, candidates), round(union * candidates))
    assert (sel[:tile] == -1).all()  # the first tile has no candidates
