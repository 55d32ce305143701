"""Layer and block specs: megatron-core's GPT specs with ``core_attention`` swapped for MoBA, and
``self_attention`` for ``MoBASelfAttention`` (megatron's SelfAttention, plus the key convolution when
``moba_key_conv`` asks for it).

Everything else (linear layers, norms, MLP, the Transformer Engine or local flavour) is exactly what
megatron-core builds.
"""

from __future__ import annotations

import copy

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from .attention import MoBAAttention
from .self_attention import MoBASelfAttention


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # a broken TE install fails in many ways; any of them means "not usable"
        return False
    return True


def _with_moba(layer_spec: ModuleSpec) -> ModuleSpec:
    spec = copy.deepcopy(layer_spec)
    attention = spec.submodules.self_attention
    if not hasattr(attention.submodules, "core_attention"):
        raise ValueError(f"layer spec {layer_spec.module} has no self_attention.core_attention to replace")
    attention.submodules.core_attention = MoBAAttention
    if attention.module is SelfAttention:
        attention.module = MoBASelfAttention
    return spec


def get_gpt_layer_with_moba_spec(use_te: bool | None = None, **kwargs) -> ModuleSpec:
    """A GPT TransformerLayer spec whose core attention is MoBA.

    ``use_te=None`` picks the Transformer Engine flavour when TE imports, else the local one;
    other keyword arguments go to megatron-core's ``get_gpt_layer_{local,with_transformer_engine}_spec``
    (``qk_layernorm``, ``normalization``, ...). Multi-latent attention is not supported.
    """
    if kwargs.get("multi_latent_attention"):
        raise ValueError("MoBA specs do not support multi_latent_attention")
    if use_te is None:
        use_te = te_available()
    if use_te:
        base = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**kwargs)
    else:
        base = gpt_layer_specs.get_gpt_layer_local_spec(**kwargs)
    return _with_moba(base)


def get_gpt_decoder_block_with_moba_spec(config, use_transformer_engine: bool | None = None, **kwargs):
    """megatron-core's GPT decoder block spec (per-layer specs, dense/MoE pattern and pipeline
    slicing included) with MoBA in every layer. Layers listed in ``config.moba_full_attn_layers``
    run full causal attention inside the same module."""
    if use_transformer_engine is None:
        use_transformer_engine = te_available()
    block = gpt_layer_specs.get_gpt_decoder_block_spec(config, use_transformer_engine, **kwargs)
    block.layer_specs = [_with_moba(spec) for spec in block.layer_specs]
    return block


# Spec objects by name, for upstream Megatron-LM's ``--spec MODULE NAME`` (megatron-core's
# ``spec_utils.import_module`` reads ``vars(module)[NAME]``, so they must be real attributes):
#   --spec moba_megatron.megatron.specs moba_layer_spec        TE flavour when TE imports, else local
#   --spec moba_megatron.megatron.specs moba_layer_local_spec  local (``--transformer-impl local``)
#   --spec moba_megatron.megatron.specs moba_layer_te_spec     TE flavour (only where TE imports)
moba_layer_local_spec = get_gpt_layer_with_moba_spec(use_te=False)
if te_available():
    moba_layer_te_spec = get_gpt_layer_with_moba_spec(use_te=True)
    moba_layer_spec = moba_layer_te_spec
else:
    moba_layer_spec = moba_layer_local_spec
