"""Launching the pretraining job as users do (torchrun, gloo ranks on CPU) and reading its log."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VALIDATION = re.compile(r" validation loss at iteration (\d+) \| lm loss value: (\S+) \| lm loss PPL: (\S+) \|")
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ .*\| lm loss: (\S+) \|")
SMALL = ["--config", "configs/tiny-cpu.yaml", "--seq-length", "256", "--log-interval", "1", "--lr-warmup-iters", "0",
         "--global-batch-size", "8"]


def pretrain(*args, nproc=2, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "moba_megatron.pretrain", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def losses(result) -> dict[int, str]:
    return {int(i): loss for i, loss in LOSS.findall(result.stdout)}


def bpe_tokenizer(folder, text: str) -> None:
    """A small byte-level BPE tokenizer trained on ``text`` with the tokenizers library, saved as a
    Hugging Face tokenizer folder (tokenizer.json, eos_token set)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)


def check_pipeline_matches_single_rank(tmp_path, base_args, rtol):
    """PP=2 puts one layer on each rank (megatron-core's 1F1B schedule over 2 micro batches, the
    tied embedding kept in sync between the first and last stage). Stages draw their initial
    weights from other random streams, so both runs start from one saved step."""
    args = [*base_args, "--train-iters", "4", "--global-batch-size", "4", "--micro-batch-size", "2"]
    pretrain(*args, "--save", str(tmp_path), "--exit-interval", "1", nproc=1)
    single = losses(pretrain(*args, "--load", str(tmp_path), nproc=1))
    split = losses(pretrain(*args, "--load", str(tmp_path), "--pipeline-model-parallel-size", "2"))
    assert sorted(split) == [2, 3, 4]
    for it in (2, 3, 4):
        assert abs(float(split[it]) - float(single[it])) <= rtol * float(single[it]), (it, split, single)
