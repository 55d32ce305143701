"""Runs that survive faults (docs/faults.md), each launched with torchrun as users launch it (2 gloo
ranks): a worker killed and restarted by ``torchrun --max-restarts``, SIGTERM with
``--exit-signal-handler``, a save killed midway, ``--exit-duration-in-mins``, a non-finite loss.
Every interrupted run must end at exactly the uninterrupted run's loss. Every launch is bounded in
time and its whole process group is killed when the test is done with it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers.job import LOSS, ROOT, SMALL

pytestmark = pytest.mark.slow  # each test launches processes

ITERS = 12
ARGS = [*SMALL, "--train-iters", str(ITERS)]
TIMEOUT = 240


class Job:
    """``torchrun -m moba_megatron.pretrain`` in its own process group, its output collected."""

    def __init__(self, *args, restarts=0, env=None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               f"--max-restarts={restarts}", "-m", "moba_megatron.pretrain", *args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines = []

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        for line in self.proc.stdout:
            self.lines.append(line)
            if text in line:
                return
            assert time.monotonic() < deadline, f"no {text!r} within {TIMEOUT} s"
        raise AssertionError(f"the job ended before {text!r}:\n{self.output[-3000:]}")

    def workers(self) -> list[psutil.Process]:
        children = psutil.Process(self.proc.pid).children(recursive=True)
        return [p for p in children if "moba_megatron.pretrain" in " ".join(p.cmdline()) and "-u" in p.cmdline()]

    def finish(self) -> int:
        try:
            rest, _ = self.proc.communicate(timeout=TIMEOUT)
            self.lines.append(rest)
            return self.proc.returncode
        finally:
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def last_loss(self, iteration: int) -> str:
        found = [loss for i, loss in LOSS.findall(self.output) if int(i) == iteration]
        assert found, f"no loss at iteration {iteration}:\n{self.output[-3000:]}"
        return found[-1]


def run(*args, **kwargs) -> Job:
    job = Job(*args, **kwargs)
    assert job.finish() == 0, job.output[-3000:]
    return job


@pytest.fixture(scope="module")
def straight() -> str:
    return run(*ARGS).last_loss(ITERS)


def test_worker_killed_and_restarted_resumes_exactly(tmp_path, straight):
    job = Job(*ARGS, "--save", str(tmp_path), "--load", str(tmp_path), "--save-interval", "4", restarts=1)
    try:
        job.wait_for("training from scratch")  # --load on a folder with no checkpoint yet starts
        job.wait_for(f"iteration {6:8d}/")
        job.workers()[-1].send_signal(signal.SIGKILL)
        assert job.finish() == 0, job.output[-3000:]
    finally:
        job.kill()
    assert "resumed from iteration 4" in job.output
    assert job.last_loss(ITERS) == straight


def test_sigterm_saves_exits_0_and_resumes_exactly(tmp_path, straight):
    args = [*ARGS, "--save", str(tmp_path), "--load", str(tmp_path), "--exit-signal-handler"]
    job = Job(*args)
    try:
        job.wait_for(f"iteration {5:8d}/")
        job.workers()[-1].send_signal(signal.SIGTERM)  # one rank only: every rank must stop at one step
        assert job.finish() == 0, job.output[-3000:]
    finally:
        job.kill()
    assert "SIGTERM received" in job.output
    stopped = int((tmp_path / "latest_checkpointed_iteration.txt").read_text())
    assert 5 <= stopped < ITERS and f"saved checkpoint at iteration {stopped}" in job.output
    resumed = run(*args)
    assert f"resumed from iteration {stopped}" in resumed.output
    assert resumed.last_loss(ITERS) == straight


def test_save_killed_midway_keeps_the_previous_checkpoint(tmp_path, straight):
    job = Job(*ARGS, "--save", str(tmp_path), "--load", str(tmp_path), "--save-interval", "4", restarts=1,
              env={"MOBA_FAULT_KILL_IN_SAVE": "8"})
    assert job.finish() == 0, job.output[-3000:]
    # The killed save of iteration 8 wrote shards but not the tracker: the restart took iteration 4,
    # and saved 8 again over what the killed save had left.
    assert "resumed from iteration 4" in job.output
    assert job.last_loss(ITERS) == straight
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)


def test_exit_duration_saves_and_exits_0(tmp_path):
    job = run(*ARGS, "--save", str(tmp_path), "--exit-duration-in-mins", "0")
    assert "exiting at iteration 1 (--exit-duration-in-mins 0.0 reached)" in job.output
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"


def test_non_finite_loss_stops_before_saving(tmp_path):
    job = Job(*ARGS, "--save", str(tmp_path), "--save-interval", "1", "--lr", "1e20")
    assert job.finish() != 0
    assert "iteration 2: lm loss is nan (not finite); stopped before saving" in job.output, job.output[-3000:]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert not Path(tmp_path, "iter_0000002").exists()
    # the last good checkpoint still loads
    loaded = run(*SMALL, "--train-iters", "1", "--lr", "1e20", "--load", str(tmp_path))
    assert "resumed from iteration 1" in loaded.output
