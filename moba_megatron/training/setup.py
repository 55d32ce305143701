"""Process groups, the model and its config, from the parsed arguments."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..megatron import MoBATransformerConfig, get_gpt_layer_with_moba_spec
from ..megatron.cpu import enable_cpu_shims, sequence_parallel_block
from ..megatron.model import build_gpt_model
from ..parallel import check_cp_split
from .errors import JobError


def check_layout(args, world_size: int) -> None:
    """The parallel layout's checks, before any process group starts: a JobError naming the flags."""
    tp, cp, pp = args.tensor_model_parallel_size, args.context_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * cp * pp) != 0:
        raise JobError(
            f"--tensor-model-parallel-size {tp} x --context-parallel-size {cp} x --pipeline-model-parallel-size {pp} "
            f"= {tp * cp * pp} does not divide the world size {world_size}"
        )
    if args.num_layers % pp:
        raise JobError(
            f"--num-layers {args.num_layers} does not split into --pipeline-model-parallel-size {pp} equal stages"
        )
    if cp > 1:
        try:
            check_cp_split(args.seq_length, cp, args.moba_chunk_size)
        except ValueError as e:
            raise JobError(f"--seq-length {args.seq_length} does not split into MoBA blocks at --context-parallel-size "
                           f"{cp}: {e}") from None
    if args.bf16 and not torch.cuda.is_available():
        raise JobError("--bf16 needs GPUs; the CPU run trains in fp32")


def check_args(args, world_size: int) -> int:
    """Every check of the training job's flags that needs no process group (``check_layout``, the
    batch, the schedule): a JobError naming the flags and the fix. Fills in --global-batch-size;
    returns the micro batches per step."""
    check_layout(args, world_size)
    tp, cp, pp = args.tensor_model_parallel_size, args.context_parallel_size, args.pipeline_model_parallel_size
    dp = world_size // (tp * cp * pp)
    per_step = args.micro_batch_size * dp
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step != 0:
        raise JobError(f"--global-batch-size {args.global_batch_size} is not a multiple of micro batch "
                       f"{args.micro_batch_size} x data parallel {dp}")
    if args.moba_full_attn_from_iter is not None and args.moba_full_attn_from_iter < 1:
        raise JobError(f"--moba-full-attn-from-iter {args.moba_full_attn_from_iter} must be an iteration >= 1")
    if args.lr_warmup_iters and args.lr_warmup_iters >= args.train_iters:
        raise JobError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --train-iters {args.train_iters}")
    if args.seq_length % tp and args.sequence_parallel:
        raise JobError(f"--seq-length {args.seq_length} must be divisible by --tensor-model-parallel-size with "
                       "--sequence-parallel")
    return args.global_batch_size // per_step


def init_distributed(args) -> str:
    """torchrun's environment (or a single process) -> process groups; returns the device type.
    The flags must have passed ``check_layout``."""
    from megatron.core import parallel_state, tensor_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    tp, cp, pp = args.tensor_model_parallel_size, args.context_parallel_size, args.pipeline_model_parallel_size
    if args.sequence_parallel and tp == 1:  # as Megatron-LM: a config written for TP runs at TP 1 too
        if rank == 0:
            print("moba-pretrain: sequence parallelism disabled: --tensor-model-parallel-size is 1", flush=True)
        args.sequence_parallel = False
    device = default_device()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        enable_cpu_shims()
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=_rendezvous_store(rank, world),
                            rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, context_parallel_size=cp, pipeline_model_parallel_size=pp
    )
    torch.manual_seed(args.seed)
    if device == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    return device


def _rendezvous_store(rank: int, world: int):
    """torchrun's store, under a prefix of its own for each restart of the workers: after
    ``--max-restarts`` brings the job back, the store still holds the dead workers' addresses, and the
    new ones would read those and fail to connect (or hang) before the first step."""
    store, _, _ = next(dist.rendezvous("env://", rank, world))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"moba_megatron/attempt_{attempt}", store)


def default_device() -> str:
    """Where the job's model lives: CUDA where there is a GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def transformer_config(args, device: str | None = None) -> MoBATransformerConfig:
    """The model config of the job's ``args`` for a model built on ``device`` (default: CUDA where
    there is one); on the CPU, megatron initializes the weights without the CUDA RNG tracker."""
    device = device or default_device()
    ffn = args.ffn_hidden_size
    if ffn is None:
        ffn = max(64, int(8 * args.hidden_size / 3) // 64 * 64) if args.swiglu else 4 * args.hidden_size
    from megatron.core.transformer.enums import AttnBackend

    dtype = torch.bfloat16 if args.bf16 else torch.float32  # weights, and activations between stages
    try:
        return MoBATransformerConfig(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            ffn_hidden_size=ffn,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups or args.num_attention_heads,
            normalization=args.normalization,
            layernorm_epsilon=args.norm_epsilon,
            kv_channels=args.kv_channels,
            add_bias_linear=not args.disable_bias_linear,
            gated_linear_unit=args.swiglu,
            activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
            hidden_dropout=args.hidden_dropout,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            context_parallel_size=args.context_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            pipeline_dtype=dtype,
            sequence_parallel=args.sequence_parallel,
            bf16=args.bf16,
            params_dtype=dtype,
            use_cpu_initialization=device == "cpu",
            moba_chunk_size=args.moba_chunk_size,
            moba_topk=args.moba_topk,
            moba_full_attn_layers=args.moba_full_attn_layers,
            moba_enabled=args.moba_enabled,
            moba_backend=args.moba_backend,
            moba_cp_comm=args.moba_cp_comm,
            moba_key_conv=args.moba_key_conv,
            attention_backend=AttnBackend[args.attention_backend],
            **_recompute(args),
        )
    except (ValueError, AssertionError) as e:
        raise JobError(str(e)) from None


def _recompute(args) -> dict:
    """megatron-core's recompute fields; full recompute defaults to one layer per uniform unit."""
    if args.recompute_granularity != "full":
        for flag in ("recompute_method", "recompute_num_layers"):
            if getattr(args, flag) is not None:
                raise JobError(f"--{flag.replace('_', '-')} applies to --recompute-granularity full only")
        return {"recompute_granularity": args.recompute_granularity}
    return {
        "recompute_granularity": "full",
        "recompute_method": args.recompute_method or "uniform",
        "recompute_num_layers": args.recompute_num_layers or 1,
    }


def _fused_norms() -> bool:
    """Whether megatron-core's specs get Transformer Engine or apex norms (which take sequence
    parallelism) rather than its torch norm (which refuses it)."""
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("transformer_engine", "apex"))


def build_model(args, config, device: str):
    spec = get_gpt_layer_with_moba_spec(use_te=None if device == "cuda" else False, normalization=args.normalization)
    if args.sequence_parallel and (device == "cpu" or not _fused_norms()):
        # megatron's torch norm refuses sequence parallelism; apex/TE norms do not run on CPU
        spec = sequence_parallel_block(spec, config.num_layers)
    model = build_gpt_model(
        config, vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        rotary_base=args.rotary_base, rotary_percent=args.rotary_percent,
        rope_scaling=args.use_rope_scaling, rope_scaling_factor=args.rope_scaling_factor,
        share_embeddings=not args.untie_embeddings_and_output_weights, layer_spec=spec,
    )
    model = model.to(device)
    if config.bf16:  # megatron's mixed precision: bf16 weights, fp32 logits for the loss
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    return model
