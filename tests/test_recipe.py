"""The Llama recipe (docs/recipe-llama.md), run as written: its shell
block and its Python block, on CPU with a tiny random Llama (2 layers, vocab 512) and a BPE tokenizer
trained here, through the installed console scripts and torchrun with 2 gloo ranks at TP=2; and once
on a GPU at the 125M-class shape."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.job import ROOT, VALIDATION, bpe_tokenizer

pytestmark = pytest.mark.slow  # each test launches processes

pytest.importorskip("transformers")


def recipe_blocks() -> tuple[str, str]:
    text = (ROOT / "docs" / "recipe-llama.md").read_text()
    recipe = text[text.index("<!-- recipe -->") : text.index("<!-- end recipe -->")]
    (shell,) = re.findall(r"```bash\n(.*?)```", recipe, re.S)
    (python,) = re.findall(r"```python\n(.*?)```", recipe, re.S)
    return shell, python


def run_recipe(tmp_path, llama: dict, env: dict) -> str:
    """Runs the README's recipe blocks on a random Llama of shape ``llama`` with the recipe's
    variables ``env``; returns the shell block's output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sentences = [
        f"block {i % 7} routes query {i % 11} to key {(3 * i) % 13}; the pass key is {10000 + i}." for i in range(600)
    ]
    folder = tmp_path / "llama"
    LlamaForCausalLM(
        LlamaConfig(**llama, rope_parameters={"rope_theta": 5000.0, "rope_type": "default"})
    ).save_pretrained(folder)
    bpe_tokenizer(folder, "\n".join(sentences))  # the tokenizer beside the weights, as in a hub folder
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": " ".join(sentences[i : i + 3])}) + "\n"
                                                   for i in range(0, 600, 3)))
    shell, python = recipe_blocks()
    env = dict(
        os.environ,
        LLAMA=str(folder),
        CORPUS="corpus.jsonl",
        **env,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", shell], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(VALIDATION.findall(done.stdout)) == 1  # the validation after training
    for out in ("needle-moba", "needle-full"):
        cells = json.loads((tmp_path / out / "needle.json").read_text())
        assert len(cells) == len(env["LENGTHS"].split(",")) * 5 and (tmp_path / out / "needle.png").is_file()
    assert (tmp_path / "llama-moba" / "tokenizer.json").is_file()
    generated = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.startswith("The pass key is")
    return done.stdout


def test_readme_recipe_runs_as_written(tmp_path):
    run_recipe(tmp_path, dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
               dict(NPROC="2", TP="2", SEQ="64", ITERS="4", WARMUP="0", BF16="", CHUNK="16", TOPK="2",
                    FULL_LAYERS="2", LENGTHS="128,256", OMP_NUM_THREADS="1"))


@pytest.mark.gpu
def test_readme_recipe_on_a_gpu_at_the_125m_shape(tmp_path):
    """The same commands on one GPU in bf16, a 125M-class Llama (12 layers, hidden 768, 12 heads over 4
    kv heads, vocab 32000) at 8K tokens, MoBA 1024 / 3 with the last layer on full attention."""
    out = run_recipe(tmp_path, dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                    num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                                    max_position_embeddings=8192),
                     dict(NPROC="1", TP="1", SEQ="8192", ITERS="20", WARMUP="5", BF16="--bf16", CHUNK="1024", TOPK="3",
                          FULL_LAYERS="12", LENGTHS="4096,8192"))
    print(out)
