"""Bad input is a ValueError that names the argument, never a crash or a wrong answer."""

import pytest
import torch

from moba_megatron import moba_attn_varlen
from tests.helpers import cu_seqlens_of, make_qkv


def call(q=None, k=None, v=None, cu=None, max_seqlen=16, chunk=4, topk=2, **kw):
    q0, k0, v0, cu0 = make_qkv([10, 6], 4, 2, 8)
    return moba_attn_varlen(
        q0 if q is None else q, k0 if k is None else k, v0 if v is None else v,
        cu0 if cu is None else cu, max_seqlen, chunk, topk, **kw,
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.zeros(16, 4)), "q must be packed THD"),
        (dict(k=torch.zeros(16, 2, 16), v=torch.zeros(16, 2, 16)), "must agree on tokens and head_dim"),
        (dict(q=torch.zeros(15, 4, 8)), "must agree on tokens"),
        (dict(v=torch.zeros(16, 1, 8)), "k and v must have the same shape"),
        (dict(q=torch.zeros(16, 4, 8, dtype=torch.float64)), "share a dtype"),
        (dict(q=torch.zeros(16, 3, 8)), r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
        (dict(q=torch.zeros(16, 0, 8)), r"at least one head, got 0 query"),
        (dict(k=torch.zeros(16, 0, 8), v=torch.zeros(16, 0, 8)), r"at least one head, got 4 query and 0 key/value"),
        (dict(q=torch.zeros(16, 4, 0), k=torch.zeros(16, 2, 0), v=torch.zeros(16, 2, 0)), "head_dim must be >= 1"),
        (dict(cu=cu_seqlens_of([10, 6]).long()), "cu_seqlens must be int32"),
        (dict(cu=torch.tensor([0, 10, 6, 16], dtype=torch.int32)), "non-decreasing"),
        (dict(cu=torch.tensor([0, 10, 15], dtype=torch.int32)), r"end at the number of tokens \(16\)"),
        (dict(cu=torch.tensor([1, 10, 16], dtype=torch.int32)), "start at 0"),
        (dict(cu=torch.tensor([0], dtype=torch.int32)), "batch\\+1 >= 2"),
        (dict(max_seqlen=5), "max_seqlen must be an int >= the longest sequence"),
        (dict(chunk=0), "moba_chunk_size must be an integer >= 1"),
        (dict(chunk=2.5), "moba_chunk_size must be an integer >= 1"),
        (dict(topk=0), "moba_topk must be an integer >= 1"),
        (dict(softmax_scale=-1.0), "softmax_scale must be a positive"),
        (dict(backend="nope"), "unknown backend 'nope'"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        call(**kwargs)


def test_float64_is_refused():
    q, k, v, cu = make_qkv([8], 2, 1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        moba_attn_varlen(q, k, v, cu, 8, 4, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_backend_on_cpu_is_refused():
    with pytest.raises(ValueError, match="'torch_flash' is not available|needs CUDA tensors"):
        call(backend="torch_flash")


def test_missing_flash_attn_is_refused():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="'flash_attn' is not available"):
            call(backend="flash_attn")
    else:  # pragma: no cover - only where flash-attn is installed
        pytest.skip("flash-attn is installed")
