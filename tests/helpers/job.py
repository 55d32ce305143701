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
    """The job under torchrun, as users launch it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "moba_megatron.pretrain", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def run_job(*args, nproc=2, check=True):
    """The job's own ``main`` on ``nproc`` ranks, for tests of what the job computes at a layout (the
    launch itself is ``pretrain``'s to test). Without CUDA the ranks fork from the tests' fork server,
    with torch and megatron-core already imported: a torchrun launch spends most of a small test's
    time importing them in every process. With CUDA it is ``pretrain``. Returns what ``pretrain``
    returns: the output of every rank, rank 0 first, and the exit code."""
    import tempfile

    import torch

    from tests.megatron.harness import spawn_ranks

    if torch.cuda.is_available():
        return pretrain(*args, nproc=nproc, check=check)
    with tempfile.TemporaryDirectory() as logs:
        spawn_ranks(_job_rank, nproc, argv=list(args), logs=logs)
        outputs = [(Path(logs) / f"rank{r}.log").read_text() for r in range(nproc)]
        codes = [int((Path(logs) / f"rank{r}.code").read_text()) for r in range(nproc)]
    result = subprocess.CompletedProcess(["moba-pretrain", *args], max(codes), "".join(outputs), "".join(outputs))
    if check and result.returncode != 0:
        raise AssertionError(f"the job failed:\n{result.stdout[-5000:]}")
    return result


def _job_rank(rank: int, world: int, port: int, argv: list[str], logs: str) -> None:
    """One rank of ``run_job``: torchrun's environment, the output into ``logs/rank{rank}.log`` and
    the exit code into ``logs/rank{rank}.code``."""
    import traceback

    os.chdir(ROOT)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    with open(Path(logs) / f"rank{rank}.log", "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        sys.stdout = sys.stderr = os.fdopen(1, "w", buffering=1, closefd=False)
        code = 0
        try:
            from moba_megatron.pretrain import main

            main(argv)
        except SystemExit as e:  # the job's one-line errors
            code = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int):
                print(e.code)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
    (Path(logs) / f"rank{rank}.code").write_text(str(code))


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
    run_job(*args, "--save", str(tmp_path), "--exit-interval", "1", nproc=1)
    single = losses(run_job(*args, "--load", str(tmp_path), nproc=1))
    split = losses(run_job(*args, "--load", str(tmp_path), "--pipeline-model-parallel-size", "2"))
    assert sorted(split) == [2, 3, 4]
    for it in (2, 3, 4):
        assert abs(float(split[it]) - float(single[it])) <= rtol * float(single[it]), (it, split, single)
