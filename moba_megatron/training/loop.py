"""The training loop and its Megatron-style log lines."""

from __future__ import annotations

import math
import signal
import sys
import time

import torch
import torch.distributed as dist

from . import checkpoint
from .errors import JobError


def flops_per_token(args, config) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): matmuls of the weights plus the
    attention keys each layer actually attends (MoBA: own block + topk-1 full blocks)."""
    h, layers, s = args.hidden_size, args.num_layers, args.seq_length
    kv = h * config.num_query_groups // args.num_attention_heads
    per_layer = 2 * (h * h + 2 * h * kv + h * h) + 2 * (3 if args.swiglu else 2) * h * config.ffn_hidden_size
    c, k = args.moba_chunk_size, args.moba_topk
    moba_keys = (
        sum(min(c, s - b * c) * ((min(c, s - b * c) + 1) / 2 + min(b, k - 1) * c) for b in range(-(-s // c))) / s
    )
    full_keys = (s + 1) / 2
    attention = sum(
        4 * h * (full_keys if (not args.moba_enabled or n in args.moba_full_attn_layers) else moba_keys)
        for n in range(1, layers + 1)
    )
    return 3 * (layers * per_layer + attention + 2 * h * args.padded_vocab_size)


_START = time.time()  # the job's start, as Megatron-LM counts --exit-duration-in-mins


class Stopper:
    """When to leave training before ``--train-iters``: ``--exit-interval``, SIGTERM with
    ``--exit-signal-handler`` (SLURM's warning before a time limit or preemption), or
    ``--exit-duration-in-mins``. Every rank takes the same decision after the same step: the
    signal may reach one rank only, and clocks differ, so the flags are all-reduced."""

    def __init__(self, args, device: str):
        self.args, self.device = args, device
        self.signalled = False
        if args.exit_signal_handler:
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def reason(self, iteration: int) -> str | None:
        a = self.args
        if a.exit_interval and iteration % a.exit_interval == 0:
            return f"--exit-interval {a.exit_interval}"
        if not (a.exit_signal_handler or a.exit_duration_in_mins is not None):
            return None
        late = a.exit_duration_in_mins is not None and (time.time() - _START) / 60 > a.exit_duration_in_mins
        flags = torch.tensor([float(self.signalled), float(late)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return "SIGTERM received, --exit-signal-handler"
        if flags[1] > 0:
            return f"--exit-duration-in-mins {a.exit_duration_in_mins} reached"
        return None


def check_finite(args, iteration: int, loss: float, grad_norm) -> None:
    """A non-finite loss or grad norm ends the run before anything is saved, so the last good
    checkpoint stays the one ``--load`` picks (Megatron-LM's --check-for-nan-in-loss-and-grad)."""
    for name, value in (("lm loss", loss), ("grad norm", grad_norm)):
        if value is not None and not math.isfinite(float(value)):
            kept = f"; the last checkpoint in {args.save} is kept" if args.save else ""
            raise JobError(f"iteration {iteration}: {name} is {float(value)} "
                             f"(not finite); stopped before saving{kept}")


class Logger:
    def __init__(self, args, config):
        self.rank0 = dist.get_rank() == 0
        self.args = args
        self.flops = flops_per_token(args, config)
        self.interactive = self.rank0 and sys.stdout.isatty()
        self.writer = None
        if args.tensorboard_dir and dist.get_rank() in (0, dist.get_world_size() - 1):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise JobError("--tensorboard-dir needs the tensorboard package (pip install tensorboard)")
            self.writer = SummaryWriter(args.tensorboard_dir)

    def __call__(self, message: str) -> None:
        if self.rank0:
            print(("\r\033[K" if self.interactive else "") + message, flush=True)

    def validation(self, iteration: int, loss: float) -> None:
        """Megatron-LM's validation lines, printed by the last rank (which holds the last stage)."""
        ppl = math.exp(min(20.0, loss))
        if dist.get_rank() == dist.get_world_size() - 1:
            line = f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
            rule = "-" * len(line)
            print(("\r\033[K" if self.interactive else "") + f"{rule}\n{line}\n{rule}", flush=True)
        if self.writer is not None:
            self.writer.add_scalar("lm loss validation", loss, iteration)
            self.writer.add_scalar("lm loss validation ppl", ppl, iteration)
            self.writer.flush()

    def progress(self, iteration: int) -> None:
        if self.interactive:
            done = int(30 * iteration / self.args.train_iters)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {iteration}/{self.args.train_iters}", end="", flush=True)

    def memory(self, iteration: int) -> None:
        """Megatron's memory report line (rank 0's GPU)."""
        mb = 2**20
        self(
            f"[Rank {dist.get_rank()}] (after {iteration} iterations) memory (MB) | allocated: "
            f"{torch.cuda.memory_allocated() / mb:.1f} | max allocated: {torch.cuda.max_memory_allocated() / mb:.1f} "
            f"| reserved: {torch.cuda.memory_reserved() / mb:.1f} "
            f"| max reserved: {torch.cuda.max_memory_reserved() / mb:.1f}"
        )

    def step(self, iteration, loss, grad_norm, lr, seconds) -> None:
        a = self.args
        tokens = a.global_batch_size * a.seq_length
        tflops = tokens * self.flops / seconds / dist.get_world_size() / 1e12
        self(
            f" iteration {iteration:8d}/{a.train_iters:8d} | consumed samples: {iteration * a.global_batch_size:12d} "
            f"| elapsed time per iteration (ms): {seconds * 1e3:.1f} | learning rate: {lr:.6E} "
            f"| global batch size: {a.global_batch_size:5d} | lm loss: {loss:.6E} | grad norm: {grad_norm:.3f} "
            f"| tokens/s: {tokens / seconds:.0f} | TFLOP/s per GPU: {tflops:.2f} |"
        )
        if self.writer is not None:
            for name, value in (
                ("lm loss", loss),
                ("grad norm", grad_norm),
                ("learning rate", lr),
                ("tokens per second", tokens / seconds),
            ):
                self.writer.add_scalar(name, value, iteration)
            self.writer.flush()


def forward_backward_func(args, model, positions, micro_batches: int, forward_only: bool = False):
    """One step's forward and backward over its micro batches through megatron-core's schedule
    (1F1B across stages when PP > 1). Returns a function of the micro-batch iterator that gives the
    step's mean loss on the last pipeline stage (0 on the others)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    schedule = get_forward_backward_func()

    def forward_step(batches, model):
        tokens, labels = next(batches)
        output = model(tokens, positions, None, labels=labels)

        def loss_func(per_token):
            # (sum, tokens): the schedule divides, so each rank's loss is the mean over its tokens
            # and DDP's average over the data- and context-parallel ranks gives the global mean.
            total = per_token.float().sum()
            count = torch.tensor(per_token.numel(), device=total.device)
            return total, count, {"lm loss": total.detach() / count}

        return output, loss_func

    def step(batches) -> torch.Tensor:
        reported = schedule(
            forward_step_func=forward_step, data_iterator=batches, model=[model], num_microbatches=micro_batches,
            seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, forward_only=forward_only,
        )
        loss = torch.zeros((), device=positions.device)
        for item in reported:  # the last stage's per-micro-batch losses
            loss += item["lm loss"] / micro_batches
        return loss

    return step


def _micro_batches(args, data, first_sample: int, micro_batches: int, mine, device):
    """This data-parallel rank's micro batches of the global batch starting at ``first_sample``,
    cut to this context-parallel rank's positions."""
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    batches = []
    for micro in range(micro_batches):
        first = first_sample + (micro * dp_size + dp_rank) * args.micro_batch_size
        batches.append([x.to(device)[:, mine] for x in data.batch(list(range(first, first + args.micro_batch_size)))])
    return batches


def _global_mean(loss: torch.Tensor) -> float:
    """The step's mean loss over stages (from the last) and data/context-parallel ranks."""
    from megatron.core import parallel_state

    dist.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())  # from the last stage
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return float(loss) / dist.get_world_size(parallel_state.get_data_parallel_group(with_context_parallel=True))


def evaluate(args, model, valid, positions, mine, micro_batches: int, device: str) -> float:
    """Mean lm loss over the first ``--eval-iters`` global batches of the validation data (the same
    ones every time, so validations compare), forward only."""
    step = forward_backward_func(args, model, positions, micro_batches, forward_only=True)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(args.eval_iters):
            total += _global_mean(
                step(iter(_micro_batches(args, valid, i * args.global_batch_size, micro_batches, mine, device)))
            )
    model.train()
    return total / args.eval_iters


def switch_to_full_attention(model, iteration: int, log: Logger) -> None:
    """``--moba-full-attn-from-iter``: every layer on full attention from ``iteration`` on (also when a
    run resumes past it)."""
    from ..megatron import set_moba_enabled

    if set_moba_enabled(model, False):
        log(f" > every layer on full attention from iteration {iteration} on (--moba-full-attn-from-iter)")


def train(args, model, optimizer, scheduler, data, valid, start: int, micro_batches: int, device: str, log: Logger):
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from ..parallel import local_positions

    # This rank's share of every sequence under context parallelism (all positions at CP=1). Every
    # CP rank holds as many tokens, so each averages its own and DDP's average over the
    # data-and-context-parallel ranks gives the global mean's gradient.
    mine = local_positions(
        args.seq_length, args.context_parallel_size, parallel_state.get_context_parallel_rank(), device
    )
    positions = mine[None].expand(args.micro_batch_size, -1)
    model.train()
    step = forward_backward_func(args, model, positions, micro_batches)
    stopper = Stopper(args, device)
    validate = valid is not None and args.eval_iters > 0
    window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
    iteration = start
    full_from = args.moba_full_attn_from_iter
    if full_from is not None and full_from > args.train_iters:  # a config's last phase, for longer runs
        log(f" > --moba-full-attn-from-iter {full_from} is past --train-iters {args.train_iters}: no step runs "
            "on full attention")
    for iteration in range(start + 1, args.train_iters + 1):
        if full_from is not None and iteration == max(start + 1, full_from):
            switch_to_full_attention(model, iteration, log)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        batches = _micro_batches(args, data, (iteration - 1) * args.global_batch_size, micro_batches, mine, device)
        step_loss = step(iter(batches))
        finalize_model_grads([model])
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        loss = _global_mean(step_loss)
        window_loss += loss
        window_steps += 1
        log.progress(iteration)
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - window_start) / window_steps
            log.step(iteration, window_loss / window_steps, grad_norm or 0.0, optimizer.param_groups[0]["lr"], seconds)
            if device == "cuda" and iteration == args.log_interval:
                log.memory(iteration)
            window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
        if args.check_for_nan_in_loss_and_grad:
            check_finite(args, iteration, loss, grad_norm)
        stop = stopper.reason(iteration)
        if args.save and (
            (args.save_interval and iteration % args.save_interval == 0) or stop or iteration == args.train_iters
        ):
            checkpoint.save(args.save, iteration, model, optimizer, scheduler)
            log(f"saved checkpoint at iteration {iteration} to {args.save}")
            window_start = time.perf_counter()  # saving time is not step time
        if stop:
            log(f"exiting at iteration {iteration} ({stop})")
            return
        if validate and args.eval_interval and iteration % args.eval_interval == 0 and iteration < args.train_iters:
            log.validation(iteration, evaluate(args, model, valid, positions, mine, micro_batches, device))
            window_start = time.perf_counter()  # validation time is not step time
    if validate:  # after training, as Megatron-LM validates at the end
        log.validation(iteration, evaluate(args, model, valid, positions, mine, micro_batches, device))
