"""The padded-tile path (used with cuDNN on GPUs), run on CPU with a plain PyTorch batched kernel.

Small tile widths force blocks to be cut into several tiles with padded last tiles."""

import pytest
import torch

from moba_megatron import moba_attn_varlen
from moba_megatron.ops.moba import moba_attn_varlen_reference
from moba_megatron.ops.varlen import BACKENDS
from tests.helpers import assert_close, make_qkv, run_with_grads
from tests.ops.backends import PaddedTorch


def check_padded(group, seed):
    q, k, v, cu = make_qkv([45, 0, 30, 2], 4, 4 // group, 8, seed=seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out, grads = run_with_grads(lambda a, b, c: moba_attn_varlen(a, b, c, cu, 45, 5, 3, backend="padded_torch"), q, k, v, dout)
    ref, ref_grads = run_with_grads(lambda a, b, c: moba_attn_varlen_reference(a, b, c, cu, 5, 3), q, k, v, dout)
    assert_close(out, ref, 2e-5, 2e-5, "out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, 2e-5, 2e-5, f"d{name}")


@pytest.mark.parametrize("width", [1, 3, 8])
@pytest.mark.parametrize("group", [1, 2])
def test_padded_tiles_match_reference(monkeypatch, width, group):
    monkeypatch.setitem(BACKENDS, "padded_torch", PaddedTorch(width))
    check_padded(group, seed=width)


@pytest.mark.parametrize("group", [1, 2])
def test_padded_tiles_in_head_groups(monkeypatch, group):
    """One head per group: later groups' kv heads start past block 0, and every call is padded to a
    power of two with empty tiles, which must stay inside the group's blocks."""
    from moba_megatron.ops.moba import routing

    monkeypatch.setitem(BACKENDS, "padded_torch", PaddedTorch(4))
    monkeypatch.setattr(routing, "STATE_BUDGET_ELEMENTS", 1)
    monkeypatch.setattr(routing, "PIECE_BUDGET_ELEMENTS", 6 * (4 + 2 * 5) * 8)  # calls of 4 tiles, the last padded
    check_padded(group, seed=group)
