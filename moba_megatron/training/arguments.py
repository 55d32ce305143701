"""Command line of the pretraining job: Megatron-LM's flag names and meanings, plus ``--moba-*``
and ``--config FILE`` (YAML whose keys are the flags' names with underscores; flags override it,
and ``--no-bf16`` and the like turn off a switch the config turns on)."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .tokenizer import TOKENIZER_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moba-pretrain", description="Pretrain a GPT with MoBA attention on megatron-core."
    )
    p.add_argument("--config", type=Path, help="YAML of defaults (keys: flag names with underscores)")

    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden (8/3 x with --swiglu)")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-query-groups", type=int, default=None, help="GQA groups; default: one per head")
    g.add_argument("--seq-length", type=int, default=512)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="default: the tokenizer's size (the synthetic task: 256); padded as Megatron-LM pads it")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x the tensor-parallel size")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--kv-channels", type=int, default=None, help="head dim; default: hidden size / heads")
    g.add_argument("--disable-bias-linear", action="store_true", help="no biases in the linear layers (Llama)")
    g.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--untie-embeddings-and-output-weights", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--rotary-base", type=float, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="the fraction of each head's dims that RoPE turns (GPT-NeoX style); the rest match "
                        "content at any distance")
    g.add_argument("--use-rope-scaling", action="store_true", help="Llama-3.x RoPE frequency scaling")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0)
    g.add_argument("--hidden-dropout", type=float, default=0.0)

    g = p.add_argument_group("moba")
    g.add_argument("--moba-chunk-size", type=int, default=64)
    g.add_argument("--moba-topk", type=int, default=3)
    g.add_argument("--moba-full-attn-layers", type=int, nargs="*", default=[])
    g.add_argument("--moba-disable", action="store_false", dest="moba_enabled", help="full attention in every layer")
    g.add_argument("--moba-backend", default=None)
    g.add_argument("--attention-backend", choices=["auto", "flash", "fused"], default="auto",
                   help="dense kernel of the full-attention layers: auto (the fastest: cuDNN on GPUs), "
                        "flash (FlashAttention-2) or fused (cuDNN)")
    g.add_argument("--moba-cp-comm", choices=["auto", "routed", "allgather"], default="auto",
                   help="how context parallelism exchanges MoBA blocks")
    g.add_argument("--moba-key-conv", type=int, default=0, metavar="W",
                   help="width of a learnable causal convolution over each sequence's keys before rotary embedding, "
                        "initialized to the identity (0: none)")
    g.add_argument("--moba-full-attn-from-iter", type=int, default=None, metavar="N",
                   help="every layer on full attention from iteration N on (the last phase of a MoBA run)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=False)

    g = p.add_argument_group("memory")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="activation recompute: whole layers (full) or only the core attention (selective)")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with full: recompute every unit of --recompute-num-layers layers (uniform, the default) "
                        "or only the first --recompute-num-layers layers of each pipeline stage (block)")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="with full; default 1")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel size")
    g.add_argument("--train-iters", type=int, default=60)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 mixed precision (GPU)")
    g.add_argument(
        "--use-distributed-optimizer",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="shard optimizer state over data parallel ranks (GPU)",
    )
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed dataset prefix(es) (PREFIX.bin/.idx); default: synthetic retrieval data")
    g.add_argument("--tokenizer-type", default="ByteTokenizer", choices=TOKENIZER_TYPES,
                   help="with --data-path: the tokenizer the data was made with (megatron-core's)")
    g.add_argument("--tokenizer-model", default=None, help="HuggingFaceTokenizer: a local folder with tokenizer.json")
    g.add_argument("--split", default="969,30,1", help="train,validation,test weights of the indexed data's documents")

    g = p.add_argument_group("validation")
    g.add_argument("--eval-interval", type=int, default=1000, help="iterations between validations")
    g.add_argument("--eval-iters", type=int, default=100,
                   help="global batches per validation (0: none); a last validation runs after training")
    g.add_argument(
        "--retrieval-pairs",
        type=int,
        default=1,
        help="synthetic data: key/value needles per sequence, each asked at its end",
    )

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--save", default=None, help="checkpoint directory to save to")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None, help="checkpoint directory to resume from (none there yet: start)")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: the weights only; iteration 0, a fresh optimizer and schedule")
    g.add_argument(
        "--exit-interval", type=int, default=None, help="save (with --save) and exit after iterations divisible by this"
    )
    g.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="on SIGTERM, every rank finishes its step, a checkpoint is saved (with --save) and the job exits 0",
    )
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save (with --save) and exit 0 once the job has run this long")
    g.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="stop with an error, before any save, at a non-finite loss or grad norm")
    return p


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """``parser``: the job's (``build_parser()``) with more arguments of a tool added, or None."""
    parser = parser or build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        parser.set_defaults(**load_config(first.config, parser))
    args = parser.parse_args(argv)
    head_dim = args.kv_channels or args.hidden_size // args.num_attention_heads
    turned = int(head_dim * args.rotary_percent)  # as megatron-core's RotaryEmbedding takes it
    if not 0 < args.rotary_percent <= 1 or turned == 0 or turned % 2:
        parser.error(f"--rotary-percent {args.rotary_percent}: must be in (0, 1] and turn an even number of "
                     f"the {head_dim} head dims")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    return args


def load_config(path: Path, parser: argparse.ArgumentParser) -> dict:
    if not path.is_file():
        parser.error(f"--config {path}: no such file")
    values = yaml.safe_load(path.read_text()) or {}
    known = {a.dest for a in parser._actions} - {"help", "config"}
    known.add("moba_enabled")
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"unknown key(s) in {path}: {', '.join(unknown)}")
    return values
