"""The pretraining job end to end on CPU: torchrun with 2 gloo ranks, as the README runs it; its
flag checks in-process."""

import math
import re
import subprocess
import sys

import pytest

from moba_megatron.training.arguments import parse_args
from tests.helpers.job import (  # noqa: F401
    LOSS,
    ROOT,
    SMALL,
    VALIDATION,
    bpe_tokenizer,
    check_pipeline_matches_single_rank,
    losses,
    pretrain,
    run_job,
)


@pytest.mark.slow
def test_loss_falls_with_two_ranks():
    result = pretrain("--config", "configs/tiny-cpu.yaml", "--train-iters", "30")
    found = losses(result)
    assert len(found) == 3 and found[30] and float(found[30]) < 0.7 * float(found[10]), result.stdout
    # the synthetic task validates every --eval-interval (20 in the config) and after training
    assert [int(i) for i, _, _ in VALIDATION.findall(result.stdout)] == [20, 30]
    assert "TFLOP/s per GPU" in result.stdout and "tokens/s" in result.stdout
    # megatron-core's ~25 startup warnings about TE/apex: hidden, said once by the job instead
    everything = result.stdout + result.stderr
    assert "are not installed" not in everything and "IS DEPRECATED" not in everything, everything[:3000]
    assert result.stdout.count("no Transformer Engine or apex") == 1


def test_other_warnings_still_show():
    import warnings

    from moba_megatron.training.quiet import hide_known_warnings

    with warnings.catch_warnings(record=True) as seen:
        hide_known_warnings()
        warnings.warn("Apex is not installed. Falling back to Torch Norm")
        warnings.warn("a real problem")
    assert [str(w.message) for w in seen] == ["a real problem"]


@pytest.mark.slow
def test_preprocess_train_and_validate_with_a_bpe_tokenizer(tmp_path):
    import json

    pytest.importorskip("transformers")
    lines = [f"block {i % 7} routes query {i % 11} to key {(3 * i) % 13} at depth {i % 5}" for i in range(400)]
    bpe_tokenizer(tmp_path / "tok", "\n".join(lines))
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(lines[i : i + 8])}) + "\n" for i in range(0, 400, 8))
    )
    subprocess.run([sys.executable, "-m", "moba_megatron.tools.preprocess_data", "--input", str(tmp_path / "c.jsonl"),
                    "--output-prefix", str(tmp_path / "c"), "--tokenizer-type", "HuggingFaceTokenizer",
                    "--tokenizer-model", str(tmp_path / "tok"), "--append-eod", "--workers", "2"],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    data = ["--data-path", str(tmp_path / "c_text_document"), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", str(tmp_path / "tok"), "--split", "90,10,0"]
    result = run_job(*SMALL, "--train-iters", "8", *data, "--eval-interval", "4", "--eval-iters", "2",
                      "--tensorboard-dir", str(tmp_path / "tb"))
    found = losses(result)
    assert sorted(found) == list(range(1, 9)) and float(found[8]) < float(found[1])
    validation = VALIDATION.findall(result.stdout)
    assert [int(i) for i, _, _ in validation] == [4, 8]  # every --eval-interval, and after training
    for _, loss, ppl in validation:
        assert abs(math.exp(float(loss)) - float(ppl)) < 1e-4 * float(ppl)
    assert float(validation[1][1]) < float(validation[0][1])
    vocab = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    padded = -(-len(vocab) // 128) * 128  # --make-vocab-size-divisible-by 128, TP 1
    assert (
        f"padded vocab (size: {len(vocab)}) with {padded - len(vocab)} dummy tokens (new size: {padded})"
        in result.stdout
    )
    assert list((tmp_path / "tb").iterdir()), "TensorBoard events written"
    # an explicit --vocab-size below the tokenizer's is one clear line
    bad = run_job(*SMALL, "--train-iters", "2", *data, "--vocab-size", "100", check=False)
    assert (
        bad.returncode != 0
        and f"--vocab-size 100 is smaller than the HuggingFaceTokenizer's {len(vocab)} tokens" in bad.stderr
    )


@pytest.mark.slow
def test_resume_is_exact_and_reshards(tmp_path):
    straight = losses(run_job(*SMALL, "--train-iters", "6"))
    run_job(*SMALL, "--train-iters", "6", "--save", str(tmp_path), "--exit-interval", "3")
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"
    resumed = losses(run_job(*SMALL, "--train-iters", "6", "--load", str(tmp_path)))
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):  # same layout: bit-identical losses
        assert resumed[it] == straight[it], (it, resumed[it], straight[it])
    # The DP=2 checkpoint loads into TP=2: weights and Adam moments are resharded, so the losses
    # follow the straight run up to TP's different summation order.
    for layout in ("--tensor-model-parallel-size", "--context-parallel-size"):
        resharded = losses(run_job(*SMALL, "--train-iters", "6", "--load", str(tmp_path), layout, "2"))
        for it in (4, 5, 6):
            assert abs(float(resharded[it]) - float(straight[it])) < 1e-4 * float(straight[it]), (
                layout,
                it,
                resharded,
                straight,
            )


@pytest.mark.slow
def test_pipeline_parallel_run_matches_single_rank(tmp_path):
    check_pipeline_matches_single_rank(tmp_path, SMALL, rtol=2e-5)


@pytest.mark.slow
def test_context_parallel_run_matches_single_rank():
    # CP=2 splits every sequence over the two ranks; the losses are those of one rank holding all.
    # Full-attention layer included (it runs as MoBA with every block selected under CP).
    args = [*SMALL, "--train-iters", "3", "--global-batch-size", "4", "--moba-full-attn-layers", "2"]
    single = losses(run_job(*args, nproc=1))
    for comm in ("routed", "allgather"):
        split = losses(run_job(*args, "--context-parallel-size", "2", "--moba-cp-comm", comm))
        assert sorted(split) == [1, 2, 3]
        for it in (1, 2, 3):
            assert abs(float(split[it]) - float(single[it])) < 2e-5 * float(single[it]), (comm, it, split, single)


@pytest.mark.slow
def test_activation_recompute_keeps_the_losses():
    from moba_megatron.training.arguments import parse_args
    from moba_megatron.training.setup import transformer_config

    config = transformer_config(parse_args(["--config", "configs/tiny-cpu.yaml", "--recompute-granularity", "full"]))
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == (
        "full",
        "uniform",
        1,
    )
    args = [*SMALL, "--train-iters", "3", "--moba-full-attn-layers", "2"]
    plain = losses(run_job(*args))
    for extra in (["--recompute-granularity", "full"], ["--recompute-granularity", "selective"]):
        again = losses(run_job(*args, *extra))
        assert sorted(again) == [1, 2, 3]
        for it in (1, 2, 3):
            assert abs(float(again[it]) - float(plain[it])) < 1e-6 * float(plain[it]), (extra, again, plain)


@pytest.mark.slow
def test_8_gpu_layout_matches_single_rank():
    # The 8-GPU validation's layout (TP 2 x CP 4, configs/llama3-8b-2layer-1m.yaml) at toy sizes on
    # 8 gloo ranks: the losses of one rank holding the whole model and sequence.
    args = ["--config", "configs/llama3-8b-2layer-1m.yaml", "--no-bf16", "--hidden-size", "64", "--ffn-hidden-size",
            "128", "--num-attention-heads", "8", "--num-query-groups", "4", "--seq-length", "2048",
            "--moba-chunk-size", "64", "--moba-topk", "4", "--train-iters", "3", "--moba-backend", "torch"]
    single = losses(run_job(*args, "--tensor-model-parallel-size", "1", "--context-parallel-size", "1", nproc=1))
    split = losses(run_job(*args, nproc=8))
    assert sorted(split) == [1, 2, 3]
    for it in (1, 2, 3):
        assert abs(float(split[it]) - float(single[it])) < 2e-5 * float(single[it]), (it, split, single)


def job_checks(argv, world_size=2):
    """What the job checks of its flags before it trains, in its order, in this process: the
    layout and batch, the model config, the data."""
    from moba_megatron.pretrain import build_data
    from moba_megatron.training.setup import check_args, transformer_config

    args = parse_args(argv)
    check_args(args, world_size)
    transformer_config(args, "cpu")
    build_data(args)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--train-iters", "1", "--tensor-model-parallel-size", "4"],
         "--tensor-model-parallel-size 4 x --context-parallel-size 1 x --pipeline-model-parallel-size 1 = 4 "
         "does not divide the world size 2"),
        (["--pipeline-model-parallel-size", "2", "--num-layers", "3"],
         "--num-layers 3 does not split into --pipeline-model-parallel-size 2 equal stages"),
        (["--context-parallel-size", "2", "--seq-length", "384"],
         "--seq-length 384 does not split into MoBA blocks at --context-parallel-size 2"),
        (["--moba-chunk-size", "0"], "moba_chunk_size must be an integer >= 1"),
        (["--global-batch-size", "6"], "--global-batch-size 6 is not a multiple"),
        (["--train-iters", "3"], "--lr-warmup-iters 5 must be below --train-iters 3"),
        (["--recompute-method", "block"], "--recompute-method applies to --recompute-granularity full only"),
        (["--data-path", "/nonexistent/corpus"], "/nonexistent/corpus.bin and /nonexistent/corpus.idx not found"),
        (["--data-path", "/nonexistent/corpus", "--tokenizer-type", "HuggingFaceTokenizer"],
         "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR"),
        (["--data-path", "/nonexistent/corpus", "--tokenizer-type", "HuggingFaceTokenizer",
          "--tokenizer-model", "/nonexistent/tok"], "--tokenizer-model /nonexistent/tok: no such folder"),
        (["--moba-key-conv", "1"], "moba_key_conv must be 0 (off) or a width >= 2, got 1"),
        (["--moba-key-conv", "65"], "moba_key_conv 65 is wider than moba_chunk_size 64"),
        (["--moba-full-attn-from-iter", "0"], "--moba-full-attn-from-iter 0 must be an iteration >= 1"),
    ],
)
def test_bad_flags_name_the_problem(args, message):
    from moba_megatron.training.errors import JobError

    with pytest.raises(JobError, match=re.escape(message)):
        job_checks(["--config", "configs/tiny-cpu.yaml", *args])


def test_bad_flags_are_checked_in_parse_args(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--config", "configs/tiny-cpu.yaml", "--rotary-percent", "0.3"])
    assert (
        "--rotary-percent 0.3: must be in (0, 1] and turn an even number of the 32 head dims" in capsys.readouterr().err
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layers: 2\nnum_layerz: 3\n")
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--config", str(bad)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown key(s) in" in err and "num_layerz" in err


@pytest.mark.slow
def test_a_bad_flag_stops_the_job_with_one_line():
    """The job under torchrun: the check's message as moba-pretrain's one error line, a failed exit."""
    result = pretrain("--config", "configs/tiny-cpu.yaml", "--train-iters", "1", "--tensor-model-parallel-size", "4",
                      check=False)
    assert result.returncode != 0
    assert "moba-pretrain: error: --tensor-model-parallel-size 4 x --context-parallel-size 1 x " in result.stderr


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_parse(config):
    if config.name.startswith("demo"):
        pytest.skip("the op demo's config, read by moba_megatron.demo")
    from moba_megatron.training.arguments import parse_args

    args = parse_args(["--config", str(config)])
    assert args.seq_length % args.moba_chunk_size == 0 and args.num_layers >= 1
    assert parse_args(["--config", str(config), "--train-iters", "7"]).train_iters == 7  # flags override


def test_flags_turn_off_switches_a_config_turns_on():
    from moba_megatron.training.arguments import parse_args

    config = ["--config", "configs/llama3-8b-2layer-1m.yaml"]
    assert parse_args(config).bf16 and parse_args(config).sequence_parallel
    off = parse_args([*config, "--no-bf16", "--no-sequence-parallel"])
    assert not off.bf16 and not off.sequence_parallel


@pytest.mark.slow
def test_key_conv_finetune_and_full_attention_phase(tmp_path):
    """--finetune adds the key convolution to a model trained without it, at the identity (the first
    step's loss is the plain model's); --moba-full-attn-from-iter switches every layer to full
    attention at that iteration, and a run resumed past it stays there; one past --train-iters says
    so."""
    base, run = str(tmp_path / "base"), str(tmp_path / "run")
    run_job(*SMALL, "--train-iters", "2", "--save", base, "--eval-iters", "0")
    tune = [*SMALL, "--load", base, "--finetune", "--eval-iters", "0", "--lr", "1e-3"]
    plain_run = run_job(*tune, "--train-iters", "1", "--moba-full-attn-from-iter", "2")
    assert "--moba-full-attn-from-iter 2 is past --train-iters 1: no step runs on full attention" in plain_run.stdout
    plain = losses(plain_run)
    flags = ["--moba-key-conv", "3", "--moba-full-attn-from-iter", "3", "--train-iters", "4"]
    first = run_job(*tune, *flags, "--save", run, "--exit-interval", "3")
    assert losses(first)[1] == plain[1], (losses(first), plain)
    assert "the checkpoint has no key convolution; it starts at the identity" in first.stdout
    assert "every layer on full attention from iteration 3 on" in first.stdout
    resumed = run_job(*SMALL, "--load", run, "--eval-iters", "0", "--lr", "1e-3", *flags)
    assert sorted(losses(resumed)) == [4]
    assert "every layer on full attention from iteration 4 on" in resumed.stdout

