"""Convert between Hugging Face Llama folders and megatron-core checkpoints of the MoBA model.

    moba-convert hf-to-mcore --hf-dir LLAMA --save CKPT --moba-chunk-size 4096 --moba-topk 12 \\
        --moba-full-attn-layers 30 31 32
    moba-pretrain --config CKPT/moba-config.yaml --load CKPT --finetune --save RUN ...   # any TP/PP/CP
    moba-convert mcore-to-hf --load RUN --output LLAMA_MOBA

``hf-to-mcore`` writes the weights as a megatron dist checkpoint (``CKPT/release``, which loads
into any TP/PP layout), ``CKPT/moba-config.yaml`` (the model's moba-pretrain flags, usable as
``--config``), the original ``config.json`` as ``CKPT/hf_config.json`` and the tokenizer files under
``CKPT/tokenizer``. moba-pretrain carries these three into its ``--save`` folder, so
``mcore-to-hf`` takes a trained run's folder as it takes a converted one. Conversion runs in one
process on the CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

MODEL_CONFIG = "moba-config.yaml"
HF_CONFIG = "hf_config.json"
TOKENIZER = "tokenizer"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "generation_config.json", "chat_template.jinja")


def _single_process() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from ..megatron.cpu import enable_cpu_shims

    if not dist.is_initialized():
        enable_cpu_shims()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one process: no port
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def carry_model_files(source: str, destination: str) -> None:
    """Copy the model files a converted checkpoint holds (config, HF config, tokenizer) from one
    checkpoint folder to another, where they are not there yet."""
    src, dst = Path(source), Path(destination)
    for name in (MODEL_CONFIG, HF_CONFIG, TOKENIZER):
        if (src / name).exists() and not (dst / name).exists():
            dst.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, dst / name)


def hf_to_mcore(args) -> None:
    import yaml

    from .. import hf
    from ..training import checkpoint

    config = hf.read_llama_config(args.hf_dir)
    _single_process()
    model = hf.load_llama(args.hf_dir, moba_chunk_size=args.moba_chunk_size, moba_topk=args.moba_topk,
                          moba_full_attn_layers=args.moba_full_attn_layers, device="cpu")
    save = Path(args.save)
    checkpoint.save_weights(str(save), model)
    fields = hf.model_arguments(config)
    fields.update(moba_chunk_size=args.moba_chunk_size, moba_topk=args.moba_topk,
                  moba_full_attn_layers=list(args.moba_full_attn_layers),
                  seq_length=args.seq_length or min(fields["max_position_embeddings"], 8192))
    hf_dir = Path(args.hf_dir)
    if (hf_dir / "tokenizer.json").is_file():
        (save / TOKENIZER).mkdir(exist_ok=True)
        for name in _TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copy(hf_dir / name, save / TOKENIZER / name)
        fields.update(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str((save / TOKENIZER).resolve()))
    (save / MODEL_CONFIG).write_text(
        f"# moba-convert hf-to-mcore --hf-dir {args.hf_dir}\n" + yaml.safe_dump(fields, sort_keys=False)
    )
    (save / HF_CONFIG).write_text(json.dumps(config, indent=2))
    print(f"wrote {save}/release (weights), {save}/{MODEL_CONFIG}, {save}/{HF_CONFIG}")


def mcore_to_hf(args) -> None:
    from .. import hf
    from ..training import checkpoint
    from ..training.arguments import parse_args
    from ..training.setup import build_model, transformer_config
    from ..training.tokenizer import set_padded_vocab

    load = Path(args.load)
    config_path = Path(args.config) if args.config else load / MODEL_CONFIG
    for path, what in ((config_path, "--config"), (load / HF_CONFIG, "the Hugging Face config")):
        if not path.is_file():
            raise ValueError(f"{path}: no such file ({what}; written by hf-to-mcore, "
                             "carried by moba-pretrain into its --save folder)")
    job = parse_args(["--config", str(config_path)])
    hf.check_llama_form(job.moba_key_conv)
    if job.rotary_percent != 1.0:
        raise ValueError(f"{config_path}: rotary_percent {job.rotary_percent}; a Llama turns every head dim by "
                         "RoPE, so this model has no Llama form (train it with rotary_percent 1)")
    _single_process()
    set_padded_vocab(job, job.vocab_size)
    model = build_model(job, transformer_config(job, "cpu"), "cpu")
    iteration = checkpoint.load_weights(str(load), model)
    hf_config = json.loads((load / HF_CONFIG).read_text())
    hf.export_llama(model, args.output, hf_config)
    if (load / TOKENIZER).is_dir():
        for item in (load / TOKENIZER).iterdir():
            shutil.copy(item, Path(args.output) / item.name)
    print(f"wrote {args.output} (the weights of iteration {iteration} of {load})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="moba-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="a Hugging Face Llama folder -> a megatron dist checkpoint")
    to_mcore.add_argument("--hf-dir", required=True)
    to_mcore.add_argument("--save", required=True)
    to_mcore.add_argument("--moba-chunk-size", type=int, default=4096)
    to_mcore.add_argument("--moba-topk", type=int, default=12)
    to_mcore.add_argument("--moba-full-attn-layers", type=int, nargs="*", default=[])
    to_mcore.add_argument("--seq-length", type=int, default=None, help="written into the config; default: the "
                          "model's max_position_embeddings, at most 8192")
    to_hf = sub.add_parser("mcore-to-hf", help="a megatron checkpoint (converted or trained) -> a Hugging Face folder")
    to_hf.add_argument("--load", required=True)
    to_hf.add_argument("--output", required=True)
    to_hf.add_argument("--config", default=None, help=f"the model's moba-pretrain config; default: LOAD/{MODEL_CONFIG}")
    args = parser.parse_args(argv)
    from ..training.quiet import hide_known_warnings

    hide_known_warnings()
    try:
        (hf_to_mcore if args.command == "hf-to-mcore" else mcore_to_hf)(args)
    except ValueError as e:  # a bad folder, config or checkpoint: one line, as argparse reports bad flags
        parser.exit(2, f"moba-convert: error: {e}\n")


if __name__ == "__main__":
    main()
