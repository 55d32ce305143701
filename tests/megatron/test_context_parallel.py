"""Context parallelism in a whole model, on CPU with gloo: a GPTModel with RoPE gives the loss and
gradients of CP=1 at CP=2 (both exchange modes, with a full-attention layer) and at TP2 x CP2."""

import pytest

from .test_tensor_parallel import compare, results

pytestmark = pytest.mark.slow  # each test launches processes

SETTINGS = dict(seq=64, chunk=8, topk=2, full_layers=(2,))


@pytest.mark.parametrize("comm", ["routed", "allgather"])
def test_cp2_matches_cp1(tmp_path, comm):
    reference = results(tmp_path, 1, **SETTINGS)
    compare(reference, results(tmp_path, 2, tp=1, cp=2, comm=comm, **SETTINGS))


def test_tp2_cp2_matches_single_rank(tmp_path):
    reference = results(tmp_path, 1, **SETTINGS)
    compare(reference, results(tmp_path, 4, tp=2, cp=2, **SETTINGS))


def test_topk_beyond_blocks_under_cp(tmp_path):
    settings = dict(SETTINGS, topk=100)
    compare(results(tmp_path, 1, **settings), results(tmp_path, 2, tp=1, cp=2, comm="routed", **settings))
