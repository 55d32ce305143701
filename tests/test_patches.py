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
    spec = importlib.util.find_spec("megatron.training.arguments")
    if spec is None:  # pragma: no cover - megatron-core is a requirement
        pytest.skip("megatron-core does not ship megatron/training")
    target = tmp_path / relpath
    target.parent.mkdir(parents=True)
    shutil.copy(spec.origin, target)
    subprocess.run(["git", "apply", "--verbose", str(patch)], cwd=tmp_path, check=True, capture_output=True)
    module_spec = importlib.util.spec_from_file_location("patched_arguments", target)
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
