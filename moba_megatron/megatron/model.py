"""A megatron-core GPTModel with MoBA layers on the current parallel state (pipeline stages as
megatron lays them out): what the pretraining job and the Hugging Face loader both build."""

from __future__ import annotations

from .specs import get_gpt_layer_with_moba_spec


def build_gpt_model(config, *, vocab_size: int, max_sequence_length: int, rotary_base: float = 10000,
                    rotary_percent: float = 1.0, rope_scaling: bool = False, rope_scaling_factor: float = 8.0,
                    share_embeddings: bool = True, layer_spec=None):
    """``vocab_size`` is the padded vocabulary; ``layer_spec`` defaults to the MoBA layer spec
    (Transformer Engine flavour when TE imports) with ``config.normalization``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if layer_spec is None:
        layer_spec = get_gpt_layer_with_moba_spec(normalization=config.normalization)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        rotary_percent=rotary_percent,
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_scaling_factor,
        share_embeddings_and_output_weights=share_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
