"""MoBA inside a tiny megatron-core GPTModel (RoPE, GQA), single rank on CPU."""

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from moba_megatron import MoBAAttention, set_moba_enabled
from moba_megatron.ops import moba_attn_varlen
from tests.helpers import assert_close
from tests.megatron.harness import destroy_parallel, free_port, init_parallel

from .models import SEQ, batch, build_gpt, tiny_config


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    init_parallel(0, 1, free_port())
    yield
    destroy_parallel()


def run(model, data=None):
    tokens, position_ids, mask, labels = data or batch()
    model.zero_grad(set_to_none=True)
    logits = model(tokens, position_ids, mask)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def assert_same(a, b, tol=2e-5):
    assert_close(a[0], b[0], tol, tol, "logits")
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        assert_close(a[2][name], b[2][name], tol, tol, f"grad of {name}")


def test_topk_covering_every_block_equals_megatron_dense_attention():
    config = tiny_config(moba_chunk_size=8, moba_topk=SEQ // 8)
    moba, dense = build_gpt(config, "moba"), build_gpt(config, "dense")
    assert torch.equal(
        moba.state_dict()["embedding.word_embeddings.weight"], dense.state_dict()["embedding.word_embeddings.weight"]
    )
    assert_same(run(moba), run(dense))


def test_small_topk_differs_from_dense_and_matches_reference():
    config = tiny_config(moba_chunk_size=8, moba_topk=2)
    moba_out = run(build_gpt(config, "moba"))
    dense_out = run(build_gpt(config, "dense"))
    assert (moba_out[0] - dense_out[0]).abs().max() > 1e-3, "MoBA with topk 2 of 6 blocks must not be dense"
    assert_same(moba_out, run(build_gpt(config, "reference")))


def test_full_attention_layers_and_runtime_switch():
    dense_out = run(build_gpt(tiny_config(), "dense"))
    all_full = tiny_config(moba_full_attn_layers=[1, 2])
    assert_same(run(build_gpt(all_full, "moba")), dense_out)

    model = build_gpt(tiny_config(), "moba")
    moba_out = run(model)
    assert set_moba_enabled(model, False) == 2
    assert_same(run(model), dense_out)
    assert set_moba_enabled(model, True) == 2
    assert_same(run(model), moba_out, tol=0)


def test_one_full_layer_is_a_hybrid():
    hybrid = run(build_gpt(tiny_config(moba_full_attn_layers=[2]), "moba"))
    assert (hybrid[0] - run(build_gpt(tiny_config(), "moba"))[0]).abs().max() > 1e-4
    assert (hybrid[0] - run(build_gpt(tiny_config(), "dense"))[0]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "recompute",
    [dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
     dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)],
)
def test_activation_recompute(recompute):
    plain = run(build_gpt(tiny_config(), "moba"))
    assert_same(run(build_gpt(tiny_config(**recompute), "moba")), plain)


def test_packed_thd_inputs_restart_blocks_at_sequence_starts():
    config = tiny_config()
    attn = MoBAAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal)
    g = torch.Generator().manual_seed(0)
    lens = [20, 5, 23]
    t = sum(lens)
    q, k, v = torch.randn(t, 4, 16, generator=g), torch.randn(t, 2, 16, generator=g), torch.randn(t, 2, 16, generator=g)
    cu = torch.tensor([0, 20, 25, 48], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=23, max_seqlen_kv=23)
    out = attn(q, k, v, None, packed_seq_params=params)
    assert out.shape == (t, 4 * 16)
    expected = moba_attn_varlen(q, k, v, cu, 23, config.moba_chunk_size, config.moba_topk)
    assert_close(out, expected.reshape(t, -1), 0, 0, "thd")
    # sbhd of one sequence equals thd of it
    one = attn(q[:20, None], k[:20, None], v[:20, None], None)
    assert_close(one[:, 0], out[:20], 1e-6, 1e-6, "sbhd vs thd")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(moba_chunk_size=0), "moba_chunk_size must be an integer >= 1"),
        (dict(moba_topk=0), "moba_topk must be an integer >= 1"),
        (dict(moba_full_attn_layers=[0, 2]), r"moba_full_attn_layers must hold 1-based layer numbers in 1..2"),
        (dict(moba_full_attn_layers=[3]), r"in 1..2 \(num_layers\), got \[3\]"),
        (dict(moba_backend="fast"), "moba_backend must be one of"),
        (dict(moba_cp_comm="ring"), "moba_cp_comm must be one of"),
        (dict(attention_dropout=0.1), "attention_dropout must be 0 with MoBA"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_bad_build():
    config = tiny_config()
    with pytest.raises(ValueError, match="AttnMaskType.causal only"):
        MoBAAttention(config, layer_number=1, attn_mask_type=AttnMaskType.padding)
    with pytest.raises(ValueError, match="no attention dropout"):
        MoBAAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_dropout=0.1)
    from megatron.core.transformer.transformer_config import TransformerConfig

    plain = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match="needs a MoBATransformerConfig"):
        MoBAAttention(plain, layer_number=1, attn_mask_type=AttnMaskType.causal)


def test_decoder_block_spec_puts_moba_in_every_layer():
    from megatron.core.models.gpt import GPTModel

    from moba_megatron import get_gpt_decoder_block_with_moba_spec

    config = tiny_config(moba_full_attn_layers=[2])
    block = get_gpt_decoder_block_with_moba_spec(config, use_transformer_engine=False)
    assert len(block.layer_specs) == 2
    assert all(s.submodules.self_attention.submodules.core_attention is MoBAAttention for s in block.layer_specs)
    torch.manual_seed(1234)
    model = GPTModel(config=config, transformer_layer_spec=block, vocab_size=128, max_sequence_length=SEQ,
                     position_embedding_type="rope")
    attention = [m for m in model.modules() if isinstance(m, MoBAAttention)]
    assert [a.full_attention for a in attention] == [False, True]
    hybrid = run(build_gpt(tiny_config(moba_full_attn_layers=[2]), "moba"))
    assert_same(run(model), hybrid)


def test_rotary_percent_turns_part_of_each_head():
    from moba_megatron.megatron.model import build_gpt_model

    from .models import VOCAB

    config = tiny_config()
    head_dim = config.kv_channels
    built = {}
    for percent in (1.0, 0.5):
        torch.manual_seed(7)
        built[percent] = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, rotary_percent=percent)
    assert built[0.5].rotary_pos_emb.inv_freq.numel() * 4 == head_dim  # frequencies for half the dims
    assert built[1.0].rotary_pos_emb.inv_freq.numel() * 2 == head_dim
    half, whole = run(built[0.5]), run(built[1.0])
    assert torch.isfinite(half[0]).all() and (half[0] - whole[0]).abs().max() > 1e-4


def test_key_conv_starts_at_the_identity_in_every_layer():
    """With the convolution at its identity start the model gives the outputs it gives without it,
    full-attention layers included; the convolution's weights get gradients."""
    plain = run(build_gpt(tiny_config(moba_full_attn_layers=[2])))
    model = build_gpt(tiny_config(moba_full_attn_layers=[2], moba_key_conv=3))
    convs = [n for n, _ in model.named_parameters() if "key_conv" in n]
    assert len(convs) == 2  # every layer, the full-attention one too
    logits, loss, grads = run(model)
    assert torch.equal(logits, plain[0])
    assert all(grads[n].abs().sum() > 0 for n in convs)


def test_key_conv_in_packed_sequences_keeps_them_apart():
    """THD: changing the first sequence's tokens leaves the second sequence's outputs as they were."""
    model = build_gpt(tiny_config(moba_key_conv=3))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "key_conv" in name:
                p.add_(0.5)
    cu = torch.tensor([0, 20, SEQ], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=28, max_seqlen_kv=28)
    tokens, _, _, _ = batch(batch_size=1)
    positions = torch.cat([torch.arange(20), torch.arange(SEQ - 20)])[None]
    other = tokens.clone()
    other[0, :20] = (other[0, :20] + 1) % 100
    with torch.no_grad():
        a = model(tokens, positions, None, packed_seq_params=packed)
        b = model(other, positions, None, packed_seq_params=packed)
    assert torch.equal(a[0, 20:], b[0, 20:]) and not torch.equal(a[0, :20], b[0, :20])


@pytest.mark.parametrize("fields,match", [
    (dict(moba_key_conv=1), "moba_key_conv must be 0 \\(off\\) or a width >= 2"),
    (dict(moba_key_conv=9, moba_chunk_size=8), "moba_key_conv 9 is wider than moba_chunk_size 8"),
])
def test_bad_key_conv_is_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**fields)
