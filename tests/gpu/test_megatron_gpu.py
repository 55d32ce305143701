"""MoBA in a megatron-core GPTModel on the GPU: bf16 mixed precision (Float16Module), cuDNN kernels."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def single_gpu():
    from tests.megatron.harness import destroy_parallel, free_port, init_parallel

    init_parallel(0, 1, free_port(), device="cuda")
    yield
    destroy_parallel()


def _loss_and_grads(config, kind, bf16, data):
    from megatron.core.transformer.module import Float16Module

    from tests.megatron.models import build_gpt

    model = build_gpt(config, kind).cuda()
    if bf16:
        model = Float16Module(config, model)
    tokens, position_ids, mask, labels = data
    loss = model(tokens, position_ids, mask, labels=labels).float().mean()
    loss.backward()
    return float(loss), {n.removeprefix("module."): p.grad.float() for n, p in model.named_parameters()}


def test_bf16_moba_is_as_accurate_as_bf16_dense(single_gpu):
    """With every block selected MoBA is causal attention: in bf16 it must stay as close to the
    fp32 result as megatron's own dense attention in bf16 does."""
    from tests.megatron.models import batch, tiny_config

    shape = dict(moba_chunk_size=64, moba_topk=8, num_attention_heads=8, hidden_size=256, num_query_groups=4,
                 ffn_hidden_size=512)
    data = batch(seq=512, device="cuda")
    truth = _loss_and_grads(tiny_config(**shape), "dense", False, data)
    errors = {}
    for kind in ("moba", "dense"):
        loss, grads = _loss_and_grads(tiny_config(bf16=True, **shape), kind, True, data)
        worst = max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in truth[1].items())
        errors[kind] = (abs(loss - truth[0]), worst)
    assert errors["moba"][0] <= 2 * errors["dense"][0] + 1e-3, errors
    assert errors["moba"][1] <= 2 * errors["dense"][1] + 5e-3, errors


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
