"""The decoding op (queries at the end of a sequence, all its keys) against the dense reference."""

import pytest
import torch

from moba_megatron.ops.moba import moba_attn_varlen_reference
from moba_megatron.ops.moba.decode import moba_attn_decode
from tests.helpers import assert_close, make_qkv


@pytest.mark.parametrize(
    "n,chunk,topk,group", [(50, 8, 3, 2), (64, 8, 2, 1), (17, 4, 100, 4), (5, 8, 3, 1), (33, 1, 4, 2)]
)
@pytest.mark.parametrize("m", [1, 4])
def test_last_queries_match_the_reference(n, chunk, topk, group, m):
    m = min(m, n)
    q, k, v, cu = make_qkv([n], 2 * group, 2, 16, seed=n + m)
    ref = moba_attn_varlen_reference(q, k, v, cu, chunk, topk)  # [n, Hq, D]
    positions = torch.arange(n - m, n)
    out = moba_attn_decode(q[n - m :].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), positions, chunk, topk,
                           16**-0.5)
    assert_close(out.transpose(0, 1), ref[n - m :], 2e-5, 2e-5, "decode")
