"""Hugging Face interop (moba_megatron.hf) on CPU in fp32, against tiny random LlamaForCausalLM
models that transformers builds and saves here: MoBA in transformers (prefill against the dense
reference, exact decoding with the KV cache, padded batches), the megatron-core model of a Llama
folder against transformers' own logits at TP=1 and TP=2, and the round trip back."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from moba_megatron import hf  # noqa: E402
from moba_megatron.ops.moba import moba_attn_varlen_reference  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.megatron.harness import destroy_parallel, init_parallel, spawn_ranks  # noqa: E402

CHUNK, TOPK = 8, 3
VOCAB = 300  # not a multiple of 128: the megatron model pads it


def tiny_llama(folder, *, tied=False, llama3=False, seed=0):
    torch.manual_seed(seed)
    rope = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192} if llama3 else {"rope_theta": 5000.0,
                                                                                            "rope_type": "default"}
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        rope_parameters=rope,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """docs/semantics.md as the dense masked reference, one row at a time (no padding)."""
    b, hq, s, d = query.shape
    cu = torch.tensor([0, s], dtype=torch.int32)
    rows = [moba_attn_varlen_reference(query[r].transpose(0, 1), key[r].transpose(0, 1), value[r].transpose(0, 1), cu,
                                       CHUNK, TOPK, softmax_scale=scaling) for r in range(b)]
    return torch.stack(rows), None


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama(folder)
    return folder


def test_prefill_matches_the_dense_reference_and_handles_right_padding(llama):
    name = hf.register_moba(CHUNK, TOPK)
    AttentionInterface.register("moba_reference", reference_attention)
    AttentionMaskInterface.register("moba_reference", hf.attention._padding_mask)
    moba = LlamaForCausalLM.from_pretrained(llama, attn_implementation=name).eval()
    ref = LlamaForCausalLM.from_pretrained(llama, attn_implementation="moba_reference").eval()
    dense = LlamaForCausalLM.from_pretrained(llama, attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (3, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = moba(ids).logits
        assert_close(out, ref(ids).logits, 1e-4, 1e-4, "moba vs reference")
        assert (out - dense(ids).logits).abs().max() > 1e-3  # a test that can fail: MoBA is not dense here
        mask = torch.ones_like(ids)
        mask[1, 30:] = 0
        padded = moba(ids, attention_mask=mask).logits
        assert_close(padded[1, :30], moba(ids[1:2, :30]).logits[0], 1e-5, 1e-5, "right-padded row")
        assert_close(padded[0], out[0], 1e-6, 1e-6, "unpadded row of a padded batch")
        holes = mask.clone()
        holes[2, 10] = 0
        with pytest.raises(ValueError, match="row 2 of the attention_mask has padding between real tokens"):
            moba(ids, attention_mask=holes)


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_decoding_is_exact_moba(llama, batch):
    """generate's logits with the KV cache equal, at every step, a full forward over the sequence."""
    name = hf.register_moba(CHUNK, TOPK)
    model = LlamaForCausalLM.from_pretrained(llama, attn_implementation=name).eval()
    prompt = torch.randint(0, VOCAB, (batch, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        run = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        for step, logits in enumerate(run.logits):  # crosses block boundaries (8) several times
            full = model(run.sequences[:, : 21 + step]).logits[:, -1]
            assert_close(logits, full, 2e-5, 2e-5, f"step {step}")


def megatron_logits(rank, world, port, folder, out, tp, topk, export=None, pp=1):
    init_parallel(rank, world, port, tp=tp, pp=pp)
    try:
        from megatron.core import parallel_state

        model = hf.load_llama(folder, moba_chunk_size=CHUNK, moba_topk=topk)
        if pp == 1:
            ids = torch.randint(0, VOCAB, (2, 45), generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                logits = model(ids, torch.arange(45).expand(2, -1), None)  # [b, s, padded vocab / tp]
            parts = [torch.empty_like(logits) for _ in range(tp)]
            torch.distributed.all_gather(parts, logits, group=parallel_state.get_tensor_model_parallel_group())
            if rank == 0:
                torch.save((ids, torch.cat(parts, -1)), out)
        if export is not None:
            hf.export_llama(model, export)
    finally:
        destroy_parallel()


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_model_gives_transformers_logits(llama, tmp_path, tp):
    name = hf.register_moba(CHUNK, TOPK)
    for topk, attn in ((1000, "eager"), (TOPK, name)):  # top-k beyond the blocks is dense causal attention
        spawn_ranks(megatron_logits, tp, folder=str(llama), out=str(tmp_path / "logits.pt"), tp=tp, topk=topk)
        ids, logits = torch.load(tmp_path / "logits.pt")
        assert logits.shape[-1] == 1024  # the vocabulary padded to 128 x 8
        assert torch.all(logits[..., VOCAB:] == 0)  # zero rows of the padding
        want = LlamaForCausalLM.from_pretrained(llama, attn_implementation=attn).eval()
        with torch.no_grad():
            assert_close(logits[..., :VOCAB], want(ids).logits, 1e-4, 1e-4, f"top-k {topk} vs transformers {attn}")


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,tied,llama3", [(1, 1, False, False), (2, 1, True, True), (1, 2, False, True)])
def test_round_trip_gives_identical_tensors(tmp_path, tp, pp, tied, llama3):
    from safetensors.torch import load_file

    tiny_llama(tmp_path / "in", tied=tied, llama3=llama3, seed=tp + 2 * pp)
    spawn_ranks(megatron_logits, tp * pp, folder=str(tmp_path / "in"), out=str(tmp_path / "l.pt"), tp=tp, topk=TOPK,
                export=str(tmp_path / "out"), pp=pp)
    before, after = load_file(tmp_path / "in" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (tmp_path / "in" / "config.json").read_text()
    )
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out")  # transformers takes it back
    assert reloaded.config.tie_word_embeddings == tied


@pytest.mark.slow
def test_bad_folders_name_the_problem(tmp_path, llama):
    with pytest.raises(ValueError, match="no such Hugging Face folder"):
        hf.read_llama_config(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty/config.json: cannot read the model config"):
        hf.read_llama_config(tmp_path / "empty")
    other = tmp_path / "gpt2"
    shutil.copytree(llama, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(ValueError, match="is not Llama-family"):
        hf.read_llama_config(other)
    (other / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    spawn_ranks(_load_only, 1, folder=str(other), out=str(tmp_path / "error.txt"))
    error = (tmp_path / "error.txt").read_text()
    assert "mlp.linear_fc1.weight is (192, 64) in the checkpoint but (256, 64) in the model" in error, error


def _load_only(rank, world, port, folder, out):
    init_parallel(rank, world, port)
    try:
        hf.load_llama(folder, moba_chunk_size=CHUNK, moba_topk=TOPK)
    except ValueError as e:
        with open(out, "w") as f:
            f.write(str(e))
    finally:
        destroy_parallel()


def _load_bf16(rank, world, port, folder, out):
    init_parallel(rank, world, port)
    try:
        model = hf.load_llama(folder, moba_chunk_size=CHUNK, moba_topk=TOPK, params_dtype=torch.bfloat16)
        qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
        try:
            hf.load_llama(folder, moba_chunk_size=CHUNK, moba_topk=TOPK, no_such_field=1)
            unknown = "accepted"
        except TypeError as e:
            unknown = str(e)
        torch.save(
            (qkv.dtype, model.config.pipeline_dtype, model.embedding.word_embeddings.weight.detach(), unknown), out
        )
    finally:
        destroy_parallel()


def _both_configs(rank, world, port, folder, out):
    """The model config load_llama builds, and the job's from the flags hf-to-mcore writes."""
    init_parallel(rank, world, port)
    try:
        import dataclasses

        from moba_megatron.hf.llama import transformer_config as llama_config
        from moba_megatron.training.arguments import parse_args
        from moba_megatron.training.setup import transformer_config as job_config

        config = hf.read_llama_config(folder)
        flags = {
            **hf.model_arguments(config),
            "moba_chunk_size": CHUNK,
            "moba_topk": TOPK,
            "moba_full_attn_layers": [2],
        }
        argv = []
        for name, value in flags.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not False:
                argv += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
        job = job_config(parse_args(argv), "cpu")
        mine = llama_config(config, moba_chunk_size=CHUNK, moba_topk=TOPK, moba_full_attn_layers=[2])
        fields = [f.name for f in dataclasses.fields(mine)]
        torch.save({f: (repr(getattr(mine, f)), repr(getattr(job, f))) for f in fields}, out)
    finally:
        destroy_parallel()


@pytest.mark.slow
def test_load_llama_config_is_the_jobs(tmp_path):
    """load_llama's config equals the job's for the flags it writes, so a converted model trains as it loaded."""
    tiny_llama(tmp_path / "llama", llama3=True)
    spawn_ranks(_both_configs, 1, folder=str(tmp_path / "llama"), out=str(tmp_path / "configs.pt"))
    differ = {f: pair for f, pair in torch.load(tmp_path / "configs.pt").items() if pair[0] != pair[1]}
    assert not differ, differ


@pytest.mark.slow
def test_config_overrides_reach_the_model(llama, tmp_path):
    """``load_llama``'s keyword overrides are fields of the model config (docs/hf.md): bf16 weights."""
    spawn_ranks(_load_bf16, 1, folder=str(llama), out=str(tmp_path / "bf16.pt"))
    dtype, pipeline_dtype, embedding, unknown = torch.load(tmp_path / "bf16.pt")
    assert dtype == pipeline_dtype == embedding.dtype == torch.bfloat16
    want = LlamaForCausalLM.from_pretrained(llama).model.embed_tokens.weight.detach()
    assert torch.equal(embedding[:VOCAB], want.to(torch.bfloat16))
    assert "no_such_field" in unknown


@pytest.mark.slow
def test_convert_continue_training_at_tp2_and_export(tmp_path):
    """The documented path: moba-convert hf-to-mcore, moba-pretrain --finetune at TP=2 (2 gloo ranks),
    moba-convert mcore-to-hf, then transformers loads the result."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.helpers.job import ROOT, losses, pretrain

    tiny_llama(tmp_path / "llama", llama3=True)

    def convert(*args):
        subprocess.run([sys.executable, "-m", "moba_megatron.tools.convert", *args], cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=300)

    ckpt, run, out = tmp_path / "ckpt", tmp_path / "run", tmp_path / "out"
    convert("hf-to-mcore", "--hf-dir", str(tmp_path / "llama"), "--save", str(ckpt), "--moba-chunk-size", "16",
            "--moba-topk", "2", "--moba-full-attn-layers", "2")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "release"
    result = pretrain("--config", str(ckpt / "moba-config.yaml"), "--load", str(ckpt), "--finetune", "--save", str(run),
                      "--tensor-model-parallel-size", "2", "--seq-length", "64", "--micro-batch-size", "2",
                      "--train-iters", "3", "--log-interval", "1", "--lr", "1e-3", "--lr-warmup-iters", "0",
                      "--eval-iters", "1")
    assert f"loaded the weights of {ckpt} (iteration 0)" in result.stdout
    assert sorted(losses(result)) == [1, 2, 3]
    convert("mcore-to-hf", "--load", str(run), "--output", str(out))
    trained = LlamaForCausalLM.from_pretrained(out)
    assert trained.config.num_hidden_layers == 2
    before, after = load_file(tmp_path / "llama" / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after) and any(not torch.equal(before[k], after[k]) for k in before)
    # the converted checkpoint itself comes back bit for bit
    convert("mcore-to-hf", "--load", str(ckpt), "--output", str(tmp_path / "back"))
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert all(torch.equal(before[k], back[k]) for k in before)
    # a model with RoPE on part of each head has no Llama form: refused, not written wrong
    half = tmp_path / "half-rope.yaml"
    half.write_text((ckpt / "moba-config.yaml").read_text() + "rotary_percent: 0.5\n")
    refused = subprocess.run([sys.executable, "-m", "moba_megatron.tools.convert", "mcore-to-hf", "--load", str(ckpt),
                              "--config", str(half), "--output", str(tmp_path / "half")], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "rotary_percent 0.5; a Llama turns every head dim" in refused.stderr
    assert not (tmp_path / "half").exists()
    # nor a model with the key convolution
    conv = tmp_path / "key-conv.yaml"
    conv.write_text((ckpt / "moba-config.yaml").read_text() + "moba_key_conv: 3\n")
    refused = subprocess.run([sys.executable, "-m", "moba_megatron.tools.convert", "mcore-to-hf", "--load", str(ckpt),
                              "--config", str(conv), "--output", str(tmp_path / "conv")], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "moba-convert: error: the model has a key convolution (moba_key_conv 3)" \
        in refused.stderr and not (tmp_path / "conv").exists()


def test_export_refuses_a_model_with_the_key_convolution(tmp_path):
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="has a key convolution \\(moba_key_conv 3\\), which a Llama has no place"):
        hf.export_llama(SimpleNamespace(config=SimpleNamespace(moba_key_conv=3)), tmp_path / "out", {"vocab_size": 1})
    assert not (tmp_path / "out").exists()


def test_full_attention_layers_of_the_hybrid(llama):
    """moba_full_attn_layers=[1, 2] (every layer of the tiny model) gives dense causal attention."""
    name = hf.register_moba(CHUNK, TOPK, "moba_hybrid", moba_full_attn_layers=[1, 2])
    hybrid = LlamaForCausalLM.from_pretrained(llama, attn_implementation=name).eval()
    dense = LlamaForCausalLM.from_pretrained(llama, attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_close(hybrid(ids).logits, dense(ids).logits, 1e-4, 1e-4, "hybrid with every layer full")
        run = hybrid.generate(ids[:1, :20], attention_mask=torch.ones_like(ids[:1, :20]), max_new_tokens=5,
                              do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        for step, logits in enumerate(run.logits):
            assert_close(logits, dense(run.sequences[:, : 20 + step]).logits[:, -1], 1e-4, 1e-4, f"step {step}")
