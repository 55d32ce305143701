"""Pretrain a GPT whose layers use MoBA, on megatron-core.

    torchrun --nproc-per-node 2 -m moba_megatron.pretrain --config configs/tiny-cpu.yaml

The same command runs on CPU (gloo) and on GPUs (NCCL); see launch/ for multi-node launchers.
"""

from __future__ import annotations

from .training.quiet import SUMMARY, fused_paths_missing, hide_known_warnings

hide_known_warnings()  # before megatron-core is first imported

import os  # noqa: E402

import torch.distributed as dist  # noqa: E402

from .training import checkpoint  # noqa: E402
from .training.arguments import parse_args
from .training.data import DEFAULT_VOCAB, IndexedGPTData, SyntheticRetrieval, SyntheticSplit
from .training.errors import JobError, one_line_errors
from .training.loop import Logger, train
from .training.optimizer import build_optimizer, build_scheduler, wrap_ddp
from .training.setup import build_model, check_args, init_distributed, transformer_config
from .training.tokenizer import build_tokenizer, set_padded_vocab


def build_data(args):
    """(train, validation or None) batches, and sets ``args.padded_vocab_size``."""
    try:
        valid_samples = args.eval_iters * args.global_batch_size
        if not args.data_path:
            set_padded_vocab(args, args.vocab_size or DEFAULT_VOCAB)
            task = SyntheticRetrieval(args.vocab_tokens, args.seq_length, args.seed, args.retrieval_pairs)
            valid = SyntheticSplit(task, SyntheticSplit.VALID) if valid_samples else None
            return SyntheticSplit(task, SyntheticSplit.TRAIN), valid
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
        set_padded_vocab(args, tokenizer.vocab_size, f"the {args.tokenizer_type}")
        data = IndexedGPTData(args.data_path, tokenizer, args.seq_length, args.seed,
                              args.train_iters * args.global_batch_size, args.split, valid_samples)
        return data.train, data.valid
    except ValueError as e:
        raise JobError(str(e)) from None


def main(argv=None) -> None:
    args = parse_args(argv)
    with one_line_errors("moba-pretrain"):
        pretrain(args)


def pretrain(args) -> None:
    """The job on torchrun's ranks (or one process) from its parsed flags."""
    micro_batches = check_args(args, int(os.environ.get("WORLD_SIZE", "1")))
    device = init_distributed(args)
    try:
        config = transformer_config(args, device)
        data, valid = build_data(args)
        model = wrap_ddp(build_model(args, config, device), config, args)
        optimizer = build_optimizer(model, args, device)
        scheduler = build_scheduler(optimizer, args)
        log = Logger(args, config)
        if fused_paths_missing():
            log(f"moba-pretrain: {SUMMARY}")
        log(f" > padded vocab (size: {args.vocab_tokens}) with {args.padded_vocab_size - args.vocab_tokens} "
            f"dummy tokens (new size: {args.padded_vocab_size})")
        world = dist.get_world_size()
        log(
            f"moba-pretrain: {world} rank(s) on {device} | TP {args.tensor_model_parallel_size} "
            f"CP {args.context_parallel_size} "
            f"DP {world // (args.tensor_model_parallel_size * args.context_parallel_size)} "
            f"| {sum(p.numel() for p in model.parameters()) * args.tensor_model_parallel_size / 1e6:.2f}M parameters "
            f"| seq {args.seq_length}, MoBA block {args.moba_chunk_size} top-k {args.moba_topk}"
        )
        start = 0
        if args.load and args.save and dist.get_rank() == 0:
            from .tools.convert import carry_model_files

            carry_model_files(args.load, args.save)  # the model's config and tokenizer travel with it
        if args.load and (args.finetune or checkpoint.holds_weights_only(args.load)):
            loaded = checkpoint.load_weights(args.load, model, log)
            # bf16: the optimizer's fp32 main weights were copied from the initialization when it was
            # built; without this its first step writes the initialization back over what was loaded.
            optimizer.reload_model_params()
            log(f"loaded the weights of {args.load} (iteration {loaded}); training from iteration 0 "
                "with a fresh optimizer and schedule")
        elif args.load:
            start = checkpoint.load(args.load, model, optimizer, scheduler)
            if start:
                log(f"resumed from iteration {start} of {args.load}")
            else:
                log(f"--load {args.load}: no checkpoint there yet ({checkpoint.LATEST}); training from scratch")
        train(args, model, optimizer, scheduler, data, valid, start, micro_batches, device, log)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
