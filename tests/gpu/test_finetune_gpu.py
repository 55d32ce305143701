"""``--finetune`` (and released weights, as ``moba-convert hf-to-mcore`` writes them) in bf16 on one
GPU: megatron-core's optimizer keeps fp32 main weights, which must be the loaded ones, not the
initialization (the CPU optimizer steps the model's own parameters, so only the GPU can show this)."""

import pytest
import torch

from tests.helpers.job import SMALL, losses, pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


@pytest.mark.parametrize("extra", [[], ["--moba-key-conv", "3"]], ids=["plain", "key-conv-added"])
def test_finetune_in_bf16_trains_the_loaded_weights(tmp_path, extra):
    """Also with the key convolution added by the fine-tune (it starts at the identity, so the loaded
    model's loss holds)."""
    base = losses(pretrain(*SMALL, "--bf16", "--train-iters", "40", "--save", str(tmp_path), nproc=1))
    start = float(base[1])
    # A learning rate of almost nothing: every step must keep the loaded model's loss. With the
    # initialization's main weights the second step would be back near the first step of the base.
    tuned = losses(pretrain(*SMALL, *extra, "--bf16", "--train-iters", "4", "--load", str(tmp_path), "--finetune",
                            "--lr", "1e-9", "--min-lr", "1e-9", nproc=1))
    trained = float(base[40])
    assert trained < 0.7 * start, base
    for it in (1, 2, 3, 4):
        assert abs(float(tuned[it]) - trained) < 0.25 * (start - trained), (it, tuned, trained, start)
