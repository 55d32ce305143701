"""Hugging Face interop (docs/hf.md). Needs the ``[hf]`` extra (transformers, safetensors); no
Transformer Engine.

- ``register_moba(chunk, topk)``: ``from_pretrained(..., attn_implementation="moba")`` then runs
  MoBA in any model that uses transformers' attention interface (``attention.py``).
- ``load_llama(hf_dir, ...)`` / ``export_llama(model, out_dir)``: a Llama-family folder into a
  megatron-core GPTModel with MoBA layers on the current parallel state, and back (``llama.py``).
"""

from .attention import register_moba
from .llama import (
    check_llama_form,
    export_llama,
    llama_state_dict,
    load_llama,
    load_llama_weights,
    model_arguments,
    read_llama_config,
)

__all__ = ["register_moba", "load_llama", "load_llama_weights", "export_llama", "llama_state_dict",
           "read_llama_config", "model_arguments", "check_llama_form"]
