"""MoBA in a megatron-core GPTModel on the GPU: bf16 mixed precision (Float16Module), cuDNN kernels."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def single_gpu():
    from tests.megatron.cpu_support import destroy_parallel, free_port, init_parallel

    init_parallel(0, 1, free_port(), device="cuda")
    yield
    destroy_parallel()


def test_bf16_model_matches_dense_when_every_block_is_selected(single_gpu):
    from megatron.core.transformer.module import Float16Module

    from tests.megatron.models import batch, build_gpt, tiny_config

    config = tiny_config(bf16=True, moba_chunk_size=64, moba_topk=8, num_attention_heads=8, hidden_size=256,
                         num_query_groups=4, ffn_hidden_size=512)
    tokens, position_ids, mask, labels = batch(seq=512, device="cuda")
    losses, grads = [], []
    for kind in ("moba", "dense"):
        model = Float16Module(config, build_gpt(config, kind).cuda())
        loss = model(tokens, position_ids, mask, labels=labels).float().mean()
        loss.backward()
        losses.append(float(loss))
        grads.append({n: p.grad.float() for n, p in model.named_parameters()})
    assert abs(losses[0] - losses[1]) < 1e-2
    for name, g in grads[1].items():
        err = float((grads[0][name] - g).norm() / g.norm().clamp_min(1e-12))
        assert err < 3e-2, f"{name}: relative grad error {err:.3e}"


def test_bf16_moba_model_trains(single_gpu):
    from megatron.core.transformer.module import Float16Module

    from tests.megatron.models import batch, build_gpt, tiny_config

    config = tiny_config(bf16=True, moba_chunk_size=64, moba_topk=3)
    model = Float16Module(config, build_gpt(config, "moba").cuda())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    tokens, position_ids, mask, labels = batch(seq=512, device="cuda")
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(tokens, position_ids, mask, labels=tokens).float().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
