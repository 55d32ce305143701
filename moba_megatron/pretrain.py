"""Pretrain a GPT whose layers use MoBA, on megatron-core.

    torchrun --nproc-per-node 2 -m moba_megatron.pretrain --config configs/tiny-cpu.yaml

The same command runs on CPU (gloo) and on GPUs (NCCL); see launch/ for multi-node launchers.
"""

from __future__ import annotations

from .training.quiet import SUMMARY, fused_paths_missing, hide_known_warnings

hide_known_warnings()  # before megatron-core is first imported

import torch.distributed as dist  # noqa: E402

from .training import checkpoint  # noqa: E402
from .training.arguments import parse_args
from .training.data import IndexedGPTData, SyntheticRetrieval
from .training.tokenizer import TOKENIZERS
from .training.loop import Logger, train
from .training.optimizer import build_optimizer, build_scheduler, wrap_ddp
from .training.setup import build_model, check_batch, fail, init_distributed, transformer_config


def build_data(args):
    try:
        if not args.data_path:
            return SyntheticRetrieval(args.vocab_size, args.seq_length, args.seed, args.retrieval_pairs)
        tokenizer = TOKENIZERS[args.tokenizer_type]()
        if args.vocab_size < tokenizer.vocab_size:
            fail(f"--vocab-size {args.vocab_size} is smaller than the {args.tokenizer_type}'s {tokenizer.vocab_size} tokens")
        return IndexedGPTData(args.data_path, tokenizer, args.seq_length, args.seed, args.train_iters * args.global_batch_size)
    except ValueError as e:
        fail(str(e))


def main(argv=None) -> None:
    args = parse_args(argv)
    device = init_distributed(args)
    try:
        micro_batches = check_batch(args)
        config = transformer_config(args)
        if args.lr_warmup_iters and args.lr_warmup_iters >= args.train_iters:
            fail(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --train-iters {args.train_iters}")
        if args.seq_length % args.tensor_model_parallel_size and args.sequence_parallel:
            fail(f"--seq-length {args.seq_length} must be divisible by --tensor-model-parallel-size with --sequence-parallel")
        data = build_data(args)
        model = wrap_ddp(build_model(args, config, device), config, args)
        optimizer = build_optimizer(model, args, device)
        scheduler = build_scheduler(optimizer, args)
        log = Logger(args, config)
        if fused_paths_missing():
            log(f"moba-pretrain: {SUMMARY}")
        world = dist.get_world_size()
        log(
            f"moba-pretrain: {world} rank(s) on {device} | TP {args.tensor_model_parallel_size} "
            f"CP {args.context_parallel_size} DP {world // (args.tensor_model_parallel_size * args.context_parallel_size)} "
            f"| {sum(p.numel() for p in model.parameters()) * args.tensor_model_parallel_size / 1e6:.2f}M parameters "
            f"| seq {args.seq_length}, MoBA block {args.moba_chunk_size} top-k {args.moba_topk}"
        )
        start = checkpoint.load(args.load, model, optimizer, scheduler) if args.load else 0
        if start:
            log(f"resumed from iteration {start} of {args.load}")
        elif args.load:
            log(f"--load {args.load}: no checkpoint there yet ({checkpoint.LATEST}); training from scratch")
        train(args, model, optimizer, scheduler, data, start, micro_batches, device, log)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
