"""The key convolution in a whole model: the identity start gives the outputs of no convolution,
and TP=2 and CP=2 give the loss and gradients (the convolution's weights included) of one rank, with
blocks small enough that every CP chunk takes its halo from another rank."""

import pytest

from .test_tensor_parallel import compare, results

pytestmark = pytest.mark.slow  # each test launches processes

# 4 chunks of 16 tokens at CP=2: width 3 needs the 2 keys before each chunk, held by the other rank
# for chunks 1 and 2 (chunk 3's are on its own rank).
SETTINGS = dict(seq=64, chunk=4, topk=3, key_conv=3)


def test_tp2_matches_tp1(tmp_path):
    reference = results(tmp_path, 1, **SETTINGS)
    assert any("key_conv" in name for name in reference["grads"])
    compare(reference, results(tmp_path, 2, **SETTINGS))


@pytest.mark.parametrize("comm", ["routed", "allgather"])
def test_cp2_matches_cp1(tmp_path, comm):
    compare(results(tmp_path, 1, **SETTINGS), results(tmp_path, 2, tp=1, cp=2, comm=comm, **SETTINGS))


def test_the_convolution_changes_the_loss(tmp_path):
    """The weights away from the identity do change the outputs, so a wrong halo would show above."""
    import torch

    plain = results(tmp_path, 1, **dict(SETTINGS, key_conv=0))
    assert not torch.allclose(plain["loss"], results(tmp_path, 1, **SETTINGS)["loss"])
