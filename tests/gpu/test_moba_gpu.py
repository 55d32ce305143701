"""The op on CUDA: both CUDA backends in bf16/fp16, and the torch backend in fp32, against the reference."""

import pytest
import torch

from moba_megatron import moba_attn_varlen
from moba_megatron.ops.moba import moba_attn_varlen_reference
from tests.helpers import assert_close, make_qkv, run_with_grads

pytestmark = pytest.mark.gpu


def check(lens, chunk, topk, hq, hkv, d, dtype, backend, seed=0, tol=2e-2):
    q, k, v, cu = make_qkv(lens, hq, hkv, d, seed=seed, device="cuda", dtype=dtype)
    dout = torch.randn(q.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)).to(dtype)
    out, grads = run_with_grads(
        lambda a, b, c: moba_attn_varlen(a, b, c, cu, max(lens), chunk, topk, backend=backend), q, k, v, dout
    )
    ref, ref_grads = run_with_grads(
        lambda a, b, c: moba_attn_varlen_reference(a, b, c, cu, chunk, topk),
        q.float(),
        k.float(),
        v.float(),
        dout.float(),
    )
    assert_close(out, ref, tol, tol, "out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, tol, tol, f"d{name}")


@pytest.mark.parametrize("backend", ["cudnn", "torch_flash", None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lens", [[1000], [1024], [1, 300, 0, 77, 640], [129]])
@pytest.mark.parametrize("topk", [1, 2, 3, 100])
def test_flash_kernels(backend, dtype, lens, topk):
    check(lens, 64, topk, 8, 2, 64, dtype, backend)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("backend", ["cudnn", "torch_flash"])
def test_gqa_and_head_dims(group, d, backend):
    check([700, 333], 96, 3, 8, 8 // group, d, torch.bfloat16, backend)


def test_fp32_on_gpu_uses_torch_backend():
    check([300, 90], 32, 3, 4, 2, 32, torch.float32, None, tol=1e-4)


@pytest.mark.parametrize("backend", ["cudnn", "torch_flash"])
def test_long_sequence(backend):
    # Blocks chosen by thousands of queries: several padded tiles per block on the cudnn path.
    check([8192], 512, 4, 4, 2, 128, torch.bfloat16, backend)


def test_rerun_gives_the_same_result():
    q, k, v, cu = make_qkv([4096], 8, 2, 128, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(q)
    fn = lambda a, b, c: moba_attn_varlen(a, b, c, cu, 4096, 256, 4)  # noqa: E731
    o1, g1 = run_with_grads(fn, q, k, v, dout)
    o2, g2 = run_with_grads(fn, q, k, v, dout)
    # Partial results are summed with float atomics on the GPU: allow rounding noise only.
    assert_close(o1, o2, 1e-2, 1e-2, "out rerun")
    for a, b in zip(g1, g2):
        assert_close(a, b, 1e-2, 1e-2, "grad rerun")


@pytest.mark.parametrize("min_chunk", [None, 0])  # the routed backward in Triton, or on cuDNN tiles
@pytest.mark.parametrize("lens,chunk,topk", [([6000], 1024, 3), ([4096, 3000], 128, 8), ([2048], 16, 64)])
def test_routed_backward_modes(monkeypatch, min_chunk, lens, chunk, topk):
    from moba_megatron.ops.varlen import BACKENDS

    monkeypatch.setattr(BACKENDS["cudnn"], "tiles_backward_min_chunk", min_chunk)
    check(lens, chunk, topk, 8, 2, 128, torch.bfloat16, "cudnn")


@pytest.mark.parametrize("backend", ["cudnn", "torch_flash"])
@pytest.mark.parametrize("rows_a_query_head", [0, 3 * 2 * 7 / 8])  # a kv head a call; two calls of two
def test_routing_a_few_kv_heads_at_a_time(monkeypatch, backend, rows_a_query_head):
    from moba_megatron.ops.moba import routing

    monkeypatch.setattr(routing, "ROUTING_ROWS_PER_QUERY_HEAD", rows_a_query_head)
    check([4096], 128, 8, 8, 4, 64, torch.bfloat16, backend)


def test_head_dim_64_with_many_query_heads():
    check([5000], 256, 4, 12, 12, 64, torch.bfloat16, None)


@pytest.mark.parametrize("backend", ["cudnn", "torch_flash", None])
@pytest.mark.parametrize("lens,chunk,topk", [
    ([1], 63, 3), ([1], 150, 2), ([1, 1, 1], 64, 1), ([1, 0, 1], 16, 4),  # only one-token sequences
    ([40, 1, 7], 1, 3), ([300], 1, 8), ([5], 1, 100), ([33, 2], 2, 5),  # one- and two-token blocks
])
def test_one_token_sequences_and_blocks(backend, lens, chunk, topk):
    """cuDNN takes neither s_q = s_kv = 1 nor one-key tiles: these shapes run on other kernels."""
    check(lens, chunk, topk, 8, 2, 64, torch.bfloat16, backend)


def test_one_token_prompt_generates_with_moba():
    """A one-token prompt's prefill (one sequence of one token) and the decoding after it, in
    transformers with ``attn_implementation="moba"``: each step's logits match transformers' eager
    attention over the same tokens (with one block spanning every step MoBA is dense)."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from moba_megatron import hf

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    prompt = torch.tensor([[17]], device="cuda")
    model.set_attn_implementation(hf.register_moba(64, 3))
    with torch.no_grad():
        run = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        model.set_attn_implementation("eager")
        eager = model(run.sequences).logits[0]
    assert len(run.logits) == 8
    for step, logits in enumerate(run.logits):
        assert_close(logits[0].float(), eager[step].float(), 3e-2, 3e-2, f"step {step}")
