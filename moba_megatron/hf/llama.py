"""Llama-family weights into and out of a megatron-core GPTModel with MoBA layers (docs/hf.md).

- ``load_llama(hf_dir, ...)``: the GPTModel on the current parallel state (TP/PP shards as megatron
  lays them out) with the folder's architecture and weights.
- ``export_llama(model, out_dir)``: the reverse; one rank writes ``LlamaForCausalLM``'s folder.

Names go through one table (``LAYER_NAMES``, ``MODEL_NAMES``); two megatron tensors fuse several of
Llama's: ``linear_qkv`` holds each query group's query heads, then its key head, then its value head;
``linear_fc1`` holds SwiGLU's gate then up projection, per TP shard. The vocabulary is padded with
zero rows to a multiple of 128 x 8, so any TP up to 8 splits it alike. Problems with a folder or a
model are ``ValueError``s naming the file, field or tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..training.tokenizer import padded_vocab_size

# Megatron's --make-vocab-size-divisible-by 128 at TP 8: the padded vocabulary splits alike for every TP up to 8
VOCAB_DIVISIBLE_BY, VOCAB_TP = 128, 8

# megatron name after "decoder.layers.N." -> Llama's after "model.layers.N." (a tuple: fused in that order).
# The local spec has separate norms; Transformer Engine's fuses them into the next linear layer.
LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_qkv.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# the rest of the model; the output layer of tied embeddings is the embedding itself
MODEL_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
}
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


# ----------------------------------------------------------------------------------------------
# The folder's config


def read_llama_config(hf_dir) -> dict:
    """``config.json`` of a Llama-family folder, checked; ValueError naming the file and field."""
    folder = Path(hf_dir)
    path = folder / "config.json"
    if not folder.is_dir():
        raise ValueError(f"{hf_dir}: no such Hugging Face folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the model config ({e})") from e
    arch = config.get("architectures") or [None]
    if config.get("model_type") != "llama" or arch[0] not in (None, "LlamaForCausalLM"):
        raise ValueError(f"{path}: model_type {config.get('model_type')!r} / architectures {arch} is not "
                         "Llama-family (LlamaForCausalLM); only Llama checkpoints convert")
    for field, want in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if config.get(field, want) != want:
            raise ValueError(f"{path}: {field} = {config[field]!r} is not supported (needs {want!r})")
    rope = _rope(config)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"{path}: rope_type {kind!r} is not supported (default or llama3)")
    if kind == "llama3":
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for field, want in expected.items():
            if float(rope.get(field, want)) != want:
                raise ValueError(f"{path}: rope {field} = {rope[field]} is not supported "
                                 f"(megatron-core's Llama-3 scaling uses {want})")
    return config


def _rope(config: dict) -> dict:
    """RoPE fields: transformers 5's ``rope_parameters``, or 4's ``rope_theta`` + ``rope_scaling``."""
    rope = dict(config.get("rope_parameters") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope.update(config.get("rope_scaling") or {})
    return rope


def _llama3_scaling(config: dict) -> float | None:
    """The Llama-3 RoPE scaling factor, or None without that scaling."""
    rope = _rope(config)
    return float(rope["factor"]) if rope.get("rope_type", rope.get("type")) == "llama3" else None


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _kv_heads(config: dict) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


def padded_vocab(config: dict) -> int:
    return padded_vocab_size(config["vocab_size"], None, VOCAB_DIVISIBLE_BY, VOCAB_TP)


def _shape(config: dict) -> dict:
    """The fields that the job's flags and the model config name alike."""
    return dict(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=config["num_attention_heads"],
        num_query_groups=_kv_heads(config),
        kv_channels=head_dim(config),
        normalization="RMSNorm",
    )


def model_arguments(config: dict) -> dict:
    """The pretraining job's model flags (YAML keys) for this architecture: what hf-to-mcore writes
    into ``moba-config.yaml``."""
    scaling = _llama3_scaling(config)
    fields = dict(
        **_shape(config),
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        swiglu=True,
        disable_bias_linear=True,
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        rotary_base=float(_rope(config)["rope_theta"]),
        use_rope_scaling=scaling is not None,
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        vocab_size=padded_vocab(config),
        make_vocab_size_divisible_by=VOCAB_DIVISIBLE_BY,
    )
    if scaling is not None:
        fields["rope_scaling_factor"] = scaling
    return fields


def transformer_config(config: dict, *, moba_chunk_size: int, moba_topk: int, moba_full_attn_layers=(),
                       device: str = "cpu", **overrides):
    """The ``MoBATransformerConfig`` of a Llama architecture on the current parallel state: the
    fields the pretraining job builds from ``model_arguments(config)`` (a test holds the two alike),
    then ``overrides`` (fields of the config; fp32 unless ``params_dtype`` says otherwise)."""
    from megatron.core import parallel_state

    from ..megatron import MoBATransformerConfig

    dtype = overrides.pop("params_dtype", torch.float32)
    fields = dict(
        **_shape(config),
        layernorm_epsilon=config.get("rms_norm_eps", 1e-6),
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        params_dtype=dtype,
        pipeline_dtype=overrides.pop("pipeline_dtype", dtype),
        use_cpu_initialization=device == "cpu",
        moba_chunk_size=moba_chunk_size,
        moba_topk=moba_topk,
        moba_full_attn_layers=list(moba_full_attn_layers),
    )
    return MoBATransformerConfig(**{**fields, **overrides})


# ----------------------------------------------------------------------------------------------
# Weights


class _Weights:
    """Lazy tensors of a folder's ``model.safetensors`` (or its sharded index)."""

    def __init__(self, hf_dir):
        from safetensors import safe_open

        folder = Path(hf_dir)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ValueError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self.files = {}
        for name in files:
            handle = safe_open(str(folder / name), framework="pt")
            for key in handle.keys():
                self.files[key] = handle

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        return self.files[name].get_tensor(name)


def _tp():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def _llama_names(name: str, config: dict) -> str | tuple[str, ...] | None:
    """Llama's name(s) of the global megatron parameter ``name``; None for a tied output layer."""
    if name in MODEL_NAMES:
        if name == "output_layer.weight" and config.get("tie_word_embeddings", False):
            return None
        return MODEL_NAMES[name]
    parts = name.split(".")
    rest = ".".join(parts[3:])
    if parts[:2] != ["decoder", "layers"] or rest not in LAYER_NAMES:
        raise ValueError(f"no Llama name for megatron parameter {name!r}")
    hf = LAYER_NAMES[rest]
    prefix = f"model.layers.{parts[2]}."
    return tuple(prefix + n for n in hf) if isinstance(hf, tuple) else prefix + hf


def _fuse(name: str, tensors: list[torch.Tensor], config: dict) -> torch.Tensor:
    """The megatron tensor ``name`` from Llama's ``tensors`` (one, or the fused ones in table order)."""
    if name.endswith("linear_qkv.weight"):
        h, d, hq, hkv = config["hidden_size"], head_dim(config), config["num_attention_heads"], _kv_heads(config)
        q, k, v = tensors
        return torch.cat([q.view(hkv, hq // hkv * d, h), k.view(hkv, d, h), v.view(hkv, d, h)], dim=1).reshape(-1, h)
    if name.endswith("linear_fc1.weight"):  # each TP shard [gate_r; up_r]
        _, tp = _tp()
        gate, up = tensors
        return torch.cat([torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))])
    return tensors[0]


def _split(name: str, full: torch.Tensor, config: dict) -> list[torch.Tensor]:
    """The inverse of ``_fuse``: Llama's tensors of the megatron tensor ``name``, in table order."""
    if name.endswith("linear_qkv.weight"):
        h, d, hq, hkv = config["hidden_size"], head_dim(config), config["num_attention_heads"], _kv_heads(config)
        parts = full.view(hkv, hq // hkv + 2, d, h).split([hq // hkv, 1, 1], dim=1)
        return [x.reshape(-1, h) for x in parts]
    if name.endswith("linear_fc1.weight"):
        _, tp = _tp()
        halves = [shard.chunk(2) for shard in full.chunk(tp)]
        return [torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])]
    if name in _VOCAB_ROWS:
        return [full[: config["vocab_size"]]]
    return [full]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] > rows:
        raise ValueError(f"the checkpoint's vocabulary ({x.shape[0]}) is larger than the model's ({rows})")
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])]) if x.shape[0] < rows else x


def _megatron_tensor(weights, config: dict, name: str, rows: int) -> torch.Tensor:
    """The full (unsharded) megatron tensor ``name`` from the Llama weights; ``rows``: the model's
    padded vocabulary, for the embedding and output layer."""
    hf = _llama_names(name, config)
    if hf is None:  # tied: the output layer is the embedding
        hf = MODEL_NAMES["embedding.word_embeddings.weight"]
    full = _fuse(name, [weights(n) for n in (hf if isinstance(hf, tuple) else (hf,))], config)
    return _pad_rows(full, rows) if name in _VOCAB_ROWS else full


def _global_name(name: str, layer_offsets: dict) -> str:
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(layer_offsets[int(parts[2])])
    return ".".join(parts)


def _layer_numbers(model) -> dict:
    """Local layer index -> global (0-based) of this pipeline stage's layers."""
    return {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}


def load_llama(hf_dir, *, moba_chunk_size: int, moba_topk: int, moba_full_attn_layers=(), device: str | None = None,
               **config_overrides):
    """A megatron-core GPTModel with MoBA layers and a Llama folder's architecture and weights, on
    the current parallel state (its TP/PP shards), on ``device`` (default: CUDA where there is one).
    ``config_overrides`` are fields of its ``MoBATransformerConfig``; fp32 unless ``params_dtype``
    is overridden."""
    from ..megatron.model import build_gpt_model
    from ..megatron.specs import get_gpt_layer_with_moba_spec
    from ..training.setup import default_device

    config = read_llama_config(hf_dir)
    weights = _Weights(hf_dir)
    device = device or default_device()
    mcfg = transformer_config(config, moba_chunk_size=moba_chunk_size, moba_topk=moba_topk,
                              moba_full_attn_layers=moba_full_attn_layers, device=device, **config_overrides)
    scaling = _llama3_scaling(config)
    model = build_gpt_model(
        mcfg, vocab_size=padded_vocab(config), max_sequence_length=config.get("max_position_embeddings", 4096),
        rotary_base=float(_rope(config)["rope_theta"]), rope_scaling=scaling is not None,
        rope_scaling_factor=scaling or 8.0, share_embeddings=config.get("tie_word_embeddings", False),
        layer_spec=get_gpt_layer_with_moba_spec(use_te=None if device == "cuda" else False, normalization="RMSNorm"),
    ).to(device)
    if mcfg.bf16:  # megatron's mixed precision, as the job wraps it
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(mcfg, model)
    load_llama_weights(model, hf_dir, config, weights)
    getattr(model, "module", model).hf_config = config  # what export_llama writes back
    return model


def load_llama_weights(model, hf_dir, config: dict | None = None, weights=None) -> None:
    """Copy a Llama folder's weights into ``model`` (this rank's shards). ValueError naming the
    tensor when a shape does not fit the model's config."""
    config = config or read_llama_config(hf_dir)
    weights = weights or _Weights(hf_dir)
    model = getattr(model, "module", model)  # bf16's Float16Module, or a bare model
    rank, tp = _tp()
    layers = _layer_numbers(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            full_shape = list(param.shape)
            sharded = getattr(param, "tensor_model_parallel", False)
            if sharded:
                full_shape[param.partition_dim] *= tp
            global_name = _global_name(name, layers)
            rows = full_shape[0] if global_name in _VOCAB_ROWS else 0
            full = _megatron_tensor(weights, config, global_name, rows)
            if list(full.shape) != full_shape:
                raise ValueError(f"{hf_dir}: {name} is {tuple(full.shape)} in the checkpoint but "
                                 f"{tuple(full_shape)} in the model; the checkpoint does not fit its config.json")
            if sharded:
                full = full.chunk(tp, dim=param.partition_dim)[rank]
            param.copy_(full.to(param.dtype))


def _gather_tp(param: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    _, tp = _tp()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach()
    parts = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(parts, param.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)


def llama_state_dict(model, config: dict) -> dict[str, torch.Tensor]:
    """This pipeline stage's weights under Llama's names (TP shards gathered), on the CPU."""
    layers = _layer_numbers(model)
    out = {}
    for name, param in model.named_parameters():
        full = _gather_tp(param).float().cpu()
        name = _global_name(name, layers)
        hf = _llama_names(name, config)
        if hf is None:
            continue
        out.update(zip(hf if isinstance(hf, tuple) else (hf,), _split(name, full, config)))
    return out


def check_llama_form(moba_key_conv: int) -> None:
    """A ValueError for a model that has no Llama form: one with the key convolution."""
    if moba_key_conv:
        raise ValueError(f"the model has a key convolution (moba_key_conv {moba_key_conv}), which a Llama has no "
                         "place for; export a model trained without --moba-key-conv")


def export_llama(model, out_dir, hf_config: dict | None = None) -> None:
    """Write ``model`` (a GPTModel from ``load_llama``, or one built on the same architecture with
    ``hf_config`` given) as a Hugging Face Llama folder: config.json and model.safetensors. Under
    TP/PP the shards are gathered and global rank 0 writes; every rank must call it."""
    from safetensors.torch import save_file

    module = getattr(model, "module", model)
    check_llama_form(getattr(module.config, "moba_key_conv", 0))
    config = hf_config or getattr(module, "hf_config", None)
    if config is None:
        raise ValueError("export_llama needs the Llama config: pass hf_config (the original config.json as a dict)")
    stage = llama_state_dict(module, config)
    if _tp()[0] != 0:
        stage = {}  # every TP rank holds the gathered tensors; one of them sends
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized() and dist.get_world_size() > 1:
        stages = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(stage, stages, dst=0)
    else:
        stages = [stage]
    if rank != 0:
        return
    state = {}
    for part in stages:
        state.update(part)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    cast = getattr(torch, dtype) if isinstance(dtype, str) and hasattr(torch, dtype) else torch.float32
    save_file({k: v.to(cast).contiguous() for k, v in sorted(state.items())}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
