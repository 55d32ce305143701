"""Every patch applies to the Megatron-LM files shipped in the installed megatron-core wheel,
and the patched argument parser accepts the MoBA flags."""

import argparse
import importlib.util
import shutil
import subprocess
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
    from moba_megatron.megatron import MoBAAttention
    from moba_megatron.megatron import specs

    args_mod = patched_module(tmp_path, "megatron/training/arguments.py", PATCHES / "megatron-lm-core_r0.19-moba-args.patch")
    utils = patched_module(tmp_path, "megatron/training/argument_utils.py", PATCHES / "megatron-lm-core_r0.19-moba-config.patch")
    parser = args_mod.add_megatron_arguments(argparse.ArgumentParser())
    common = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--no-rope-fusion"]
    args = parser.parse_args(common + ["--attention-dropout", "0", "--moba-chunk-size", "128", "--moba-topk", "3",
                                       "--moba-full-attn-layers", "2", "--spec", "moba_megatron.megatron.specs", "moba_layer_spec"])
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
