"""Every patch applies to the Megatron-LM files shipped in the installed megatron-core wheel (the
files of Megatron-LM's tag core_v0.19.0), upstream's own argument code takes the MoBA flags through
to a MoBATransformerConfig, and every spec the README documents for ``--spec`` resolves through
megatron-core's own ``import_module``."""

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PATCHES = Path(__file__).resolve().parent.parent / "patches"


def patched_module(tmp_path, relpath: str, patch: Path):
    """Copy the wheel's ``relpath`` under tmp_path, apply ``patch`` there, import the result."""
    spec = importlib.util.find_spec(relpath.removesuffix(".py").replace("/", "."))
    if spec is None:  # pragma: no cover - megatron-core is a requirement
        pytest.skip(f"megatron-core does not ship {relpath}")
    target = tmp_path / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(spec.origin, target)
    subprocess.run(["git", "apply", "--verbose", str(patch)], cwd=tmp_path, check=True, capture_output=True)
    module_spec = importlib.util.spec_from_file_location(f"patched_{target.stem}", target)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_args_patch_adds_moba_flags(tmp_path):
    args_mod = patched_module(
        tmp_path, "megatron/training/arguments.py", PATCHES / "megatron-lm-core_r0.19-moba-args.patch"
    )
    parser = args_mod.add_megatron_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--moba-chunk-size", "2048", "--moba-topk", "3", "--moba-full-attn-layers", "22", "23", "24",
         "--moba-disable", "--moba-backend", "torch", "--moba-cp-comm", "routed"]
    )
    assert (args.moba_chunk_size, args.moba_topk, args.moba_full_attn_layers) == (2048, 3, [22, 23, 24])
    assert args.moba_enabled is False and args.moba_backend == "torch" and args.moba_cp_comm == "routed"
    defaults = parser.parse_args([])
    assert (defaults.moba_chunk_size, defaults.moba_topk, defaults.moba_enabled) == (4096, 12, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--moba-backend", "nope"])


def test_config_patch_builds_a_moba_config_for_a_moba_spec(tmp_path):
    import torch

    from moba_megatron import MoBATransformerConfig
    from moba_megatron.megatron import MoBAAttention, specs

    args_mod = patched_module(
        tmp_path, "megatron/training/arguments.py", PATCHES / "megatron-lm-core_r0.19-moba-args.patch"
    )
    utils = patched_module(
        tmp_path, "megatron/training/argument_utils.py", PATCHES / "megatron-lm-core_r0.19-moba-config.patch"
    )
    parser = args_mod.add_megatron_arguments(argparse.ArgumentParser())
    common = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--no-rope-fusion"]
    args = parser.parse_args(
        common
        + [
            "--attention-dropout",
            "0",
            "--moba-chunk-size",
            "128",
            "--moba-topk",
            "3",
            "--moba-full-attn-layers",
            "2",
            "--spec",
            "moba_megatron.megatron.specs",
            "moba_layer_spec",
        ]
    )
    args.params_dtype = torch.float32  # set by Megatron-LM's validate_args
    config = utils.core_transformer_config_from_args(args)
    assert isinstance(config, MoBATransformerConfig)
    assert (config.moba_chunk_size, config.moba_topk, config.moba_full_attn_layers) == (128, 3, [2])
    # the object --spec names is a layer spec with MoBA as its core attention
    assert specs.moba_layer_spec.submodules.self_attention.submodules.core_attention is MoBAAttention
    # without a MoBA spec nothing changes
    plain = parser.parse_args(common)
    plain.params_dtype = torch.float32
    assert type(utils.core_transformer_config_from_args(plain)).__name__ == "TransformerConfig"


# The flags upstream's pretrain_gpt.py needs without TE and apex (patches/README.md), plus a model.
UPSTREAM_ARGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "256",
    "--max-position-embeddings", "256", "--micro-batch-size", "1", "--lr", "1e-4", "--train-iters", "10",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--mock-data", "--bf16",
    "--transformer-impl", "local", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion", "--no-persist-layer-norm", "--attention-dropout", "0",
]


@pytest.mark.parametrize("spec_name", ["moba_layer_spec", "moba_layer_local_spec"])
def test_upstream_argument_code_builds_the_moba_config(tmp_path, monkeypatch, spec_name):
    """Upstream's parse_args + validate_args + core_transformer_config_from_args, patched, on the
    command line patches/README.md documents."""
    from moba_megatron import MoBATransformerConfig

    args_mod = patched_module(
        tmp_path, "megatron/training/arguments.py", PATCHES / "megatron-lm-core_r0.19-moba-args.patch"
    )
    utils = patched_module(
        tmp_path, "megatron/training/argument_utils.py", PATCHES / "megatron-lm-core_r0.19-moba-config.patch"
    )
    moba = ["--spec", "moba_megatron.megatron.specs", spec_name, "--moba-chunk-size", "64", "--moba-topk", "3",
            "--moba-full-attn-layers", "2", "--moba-backend", "torch", "--moba-cp-comm", "allgather",
            "--moba-key-conv", "3"]
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *UPSTREAM_ARGS, *moba])
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    args = args_mod.parse_args()
    args_mod.validate_args(args, {})
    config = utils.core_transformer_config_from_args(args)
    assert type(config) is MoBATransformerConfig
    assert (config.moba_chunk_size, config.moba_topk, config.moba_full_attn_layers) == (64, 3, [2])
    assert (config.moba_enabled, config.moba_backend, config.moba_cp_comm) == (True, "torch", "allgather")
    assert config.moba_key_conv == 3
    assert config.num_layers == 2 and config.params_dtype.is_floating_point and config.bf16


@pytest.mark.parametrize("spec_name", ["moba_layer_spec", "moba_layer_local_spec"])
def test_documented_specs_resolve_through_megatron_import_module(spec_name):
    """``--spec MODULE NAME`` is resolved by megatron-core's import_module (``vars(module)[NAME]``)."""
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    from moba_megatron.megatron import MoBAAttention

    spec = import_module(("moba_megatron.megatron.specs", spec_name))
    assert isinstance(spec, ModuleSpec)
    assert spec.submodules.self_attention.submodules.core_attention is MoBAAttention


def test_readme_specs_are_the_tested_ones():
    """Every ``--spec moba_megatron...`` pair written in the docs is one the test above resolves."""
    import re

    root = PATCHES.parent
    docs = "".join(p.read_text() for p in [root / "README.md", PATCHES / "README.md", *(root / "docs").glob("*.md")])
    pairs = set(re.findall(r"--spec (moba_megatron[\w.]*) (moba_\w+)", docs))
    assert pairs and pairs <= {("moba_megatron.megatron.specs", n) for n in ("moba_layer_spec", "moba_layer_local_spec",
                                                                            "moba_layer_te_spec")}
