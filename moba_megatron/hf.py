"""Hugging Face interop (DESIGN §8): MoBA as a transformers attention, and Llama-family weights into
and out of a megatron-core GPTModel with MoBA layers. Needs the ``[hf]`` extra (transformers,
safetensors); no Transformer Engine.

- ``register_moba(chunk, topk)``: ``from_pretrained(..., attn_implementation="moba")`` then runs
  MoBA: prefill through ``moba_attn_varlen`` (GQA without repeating K/V), and decoding with the KV
  cache as exact MoBA for the new queries (``ops/moba/decode.py``), not a dense fallback.
- ``load_llama(hf_dir, ...)``: the GPTModel on the current parallel state (TP/PP shards as megatron
  lays them out) with the folder's architecture and weights.
- ``export_llama(model, out_dir)``: the reverse; one rank writes ``LlamaForCausalLM``'s folder.

Megatron's layouts, against Llama's: ``linear_qkv`` holds each query group's query heads, then its
key head, then its value head; ``linear_fc1`` holds SwiGLU's gate then up projection, per TP shard;
the vocabulary is padded with zero rows to a multiple of 128 x 8 (so any TP up to 8 splits it alike).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist

from .ops import moba_attn_varlen
from .ops.moba.decode import moba_attn_decode
from .training.tokenizer import padded_vocab_size

# Megatron's --make-vocab-size-divisible-by 128 at TP 8: the padded vocabulary splits alike for every TP up to 8
VOCAB_DIVISIBLE_BY, VOCAB_TP = 128, 8

# ----------------------------------------------------------------------------------------------
# MoBA as a transformers attention


def register_moba(moba_chunk_size: int, moba_topk: int, name: str = "moba", *, moba_full_attn_layers=()) -> str:
    """Register MoBA under ``name`` with transformers' AttentionInterface (and a mask function with
    AttentionMaskInterface); returns ``name`` for ``attn_implementation=``. Layers in
    ``moba_full_attn_layers`` (1-based, as in Megatron's config) run full causal attention, as the
    hybrid model trained."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .ops.moba.validate import check_positive_int

    check_positive_int("moba_chunk_size", moba_chunk_size)
    check_positive_int("moba_topk", moba_topk)
    full_layers = {int(n) - 1 for n in moba_full_attn_layers}

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if getattr(module, "layer_idx", None) in full_layers:  # MoBA with one block spanning the context
            return _moba_attention(query, key, value, attention_mask, dropout, scaling, key.shape[2], 1)
        return _moba_attention(query, key, value, attention_mask, dropout, scaling, moba_chunk_size, moba_topk)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, _padding_mask)
    return name


def _padding_mask(*, attention_mask=None, kv_length=None, **kwargs):
    """The mask MoBA takes: the 2D padding mask (True: a real token), None when nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError("MoBA attention takes a 2D padding attention_mask [batch, tokens], got a "
                         f"{attention_mask.dim()}D mask; pass the tokenizer's attention_mask")
    mask = attention_mask[:, -kv_length:].bool() if kv_length is not None else attention_mask.bool()
    return None if bool(mask.all()) else mask


def _moba_attention(query, key, value, mask, dropout, scaling, chunk, topk):
    """``query [B, Hq, q_len, D]``, ``key, value [B, Hkv, kv_len, D]`` (the cache and the new
    tokens); returns ``([B, q_len, Hq, D], None)``. Queries are the last ``q_len`` positions."""
    if dropout:
        raise ValueError(f"MoBA attention has no dropout; set attention_dropout=0 (got {dropout})")
    b, hq, q_len, d = query.shape
    kv_len = key.shape[2]
    scale = scaling if scaling is not None else d**-0.5
    spans = []
    for row in range(b):  # each row's real tokens: one span, left or right of the padding
        if mask is None:
            spans.append((0, kv_len))
            continue
        real = mask[row].nonzero().flatten()
        if real.numel() == 0:
            spans.append((0, 0))
            continue
        s0, s1 = int(real[0]), int(real[-1]) + 1
        if real.numel() != s1 - s0:
            raise ValueError(f"MoBA attention: row {row} of the attention_mask has padding between real tokens; "
                             "pad on one side only (left or right)")
        spans.append((s0, s1))
    out = query.new_zeros(b, q_len, hq, d)
    first_query = kv_len - q_len
    if q_len == kv_len:  # prefill: every row's real tokens as one packed varlen batch
        rows = [(r, s0, s1) for r, (s0, s1) in enumerate(spans) if s1 > s0]
        if rows:
            q = torch.cat([query[r, :, s0:s1].transpose(0, 1) for r, s0, s1 in rows])
            k = torch.cat([key[r, :, s0:s1].transpose(0, 1) for r, s0, s1 in rows])
            v = torch.cat([value[r, :, s0:s1].transpose(0, 1) for r, s0, s1 in rows])
            lens = [s1 - s0 for _, s0, s1 in rows]
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
            packed = moba_attn_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, max(lens), chunk, topk,
                                      softmax_scale=scale)
            for (r, s0, s1), piece in zip(rows, packed.split(lens)):
                out[r, s0:s1] = piece
        return out, None
    for r, (s0, s1) in enumerate(spans):  # decoding: the new queries against the cache
        lo = max(s0, first_query)
        if s1 <= lo:
            continue
        positions = torch.arange(lo - s0, s1 - s0, device=query.device)
        piece = moba_attn_decode(query[r, :, lo - first_query : s1 - first_query], key[r, :, s0:s1], value[r, :, s0:s1],
                                 positions, chunk, topk, scale)
        out[r, lo - first_query : s1 - first_query] = piece.transpose(0, 1)
    return out, None


# ----------------------------------------------------------------------------------------------
# Llama folders


def read_llama_config(hf_dir) -> dict:
    """``config.json`` of a Llama-family folder, checked; SystemExit naming the file and field."""
    folder = Path(hf_dir)
    path = folder / "config.json"
    if not folder.is_dir():
        raise SystemExit(f"moba: error: {hf_dir}: no such Hugging Face folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"moba: error: {path}: cannot read the model config ({e})")
    arch = config.get("architectures") or [None]
    if config.get("model_type") != "llama" or arch[0] not in (None, "LlamaForCausalLM"):
        raise SystemExit(f"moba: error: {path}: model_type {config.get('model_type')!r} / architectures {arch} is not "
                         "Llama-family (LlamaForCausalLM); only Llama checkpoints convert")
    for field, want in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if config.get(field, want) != want:
            raise SystemExit(f"moba: error: {path}: {field} = {config[field]!r} is not supported (needs {want!r})")
    rope = _rope(config)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise SystemExit(f"moba: error: {path}: rope_type {kind!r} is not supported (default or llama3)")
    if kind == "llama3":
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for field, want in expected.items():
            if float(rope.get(field, want)) != want:
                raise SystemExit(f"moba: error: {path}: rope {field} = {rope[field]} is not supported "
                                 f"(megatron-core's Llama-3 scaling uses {want})")
    return config


def _rope(config: dict) -> dict:
    """RoPE fields: transformers 5's ``rope_parameters``, or 4's ``rope_theta`` + ``rope_scaling``."""
    rope = dict(config.get("rope_parameters") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope.update(config.get("rope_scaling") or {})
    return rope


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def padded_vocab(config: dict) -> int:
    return padded_vocab_size(config["vocab_size"], None, VOCAB_DIVISIBLE_BY, VOCAB_TP)


def model_arguments(config: dict) -> dict:
    """The pretraining job's model flags (YAML keys) for this architecture."""
    rope = _rope(config)
    llama3 = rope.get("rope_type", rope.get("type")) == "llama3"
    fields = dict(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=config["num_attention_heads"],
        num_query_groups=config.get("num_key_value_heads") or config["num_attention_heads"],
        kv_channels=head_dim(config),
        normalization="RMSNorm",
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        swiglu=True,
        disable_bias_linear=True,
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        rotary_base=float(rope["rope_theta"]),
        use_rope_scaling=llama3,
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        vocab_size=padded_vocab(config),
        make_vocab_size_divisible_by=VOCAB_DIVISIBLE_BY,
    )
    if llama3:
        fields["rope_scaling_factor"] = float(rope["factor"])
    return fields


def job_arguments(config: dict, **flags) -> argparse.Namespace:
    """The pretraining job's arguments for a Llama config: the job's defaults, the architecture's
    flags (``model_arguments``, what hf-to-mcore writes into its config), then ``flags`` (the job's
    argument names), with TP/PP/CP of the current parallel state. One flag-to-config mapping serves
    the job and the HF loader: ``training.setup.transformer_config``."""
    from megatron.core import parallel_state

    from .training.arguments import parse_args

    args = parse_args([])
    parallel = dict(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
    )
    for name, value in {**model_arguments(config), **parallel, **flags}.items():
        if not hasattr(args, name):
            raise TypeError(f"job_arguments: no job argument {name!r}")
        setattr(args, name, value)
    args.padded_vocab_size = padded_vocab_size(args.vocab_size, None, args.make_vocab_size_divisible_by,
                                               args.tensor_model_parallel_size)
    return args


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
            raise SystemExit(f"moba: error: {hf_dir}: no model.safetensors or model.safetensors.index.json")
        self.files = {}
        for name in files:
            handle = safe_open(str(folder / name), framework="pt")
            for key in handle.keys():
                self.files[key] = handle

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise SystemExit(f"moba: error: the checkpoint has no tensor {name!r}")
        return self.files[name].get_tensor(name)


def _tp():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def _megatron_tensors(weights, config: dict, name: str, shape) -> torch.Tensor:
    """The full (unsharded) megatron tensor ``name`` of a GPTModel from the Llama weights."""
    h, d = config["hidden_size"], head_dim(config)
    hq, hkv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if name == "embedding.word_embeddings.weight":
        return _pad_rows(weights("model.embed_tokens.weight"), shape[0])
    if name == "output_layer.weight":
        tied = config.get("tie_word_embeddings", False)
        return _pad_rows(weights("model.embed_tokens.weight" if tied else "lm_head.weight"), shape[0])
    if name == "decoder.final_layernorm.weight":
        return weights("model.norm.weight")
    parts = name.split(".")
    layer, rest = int(parts[2]), ".".join(parts[3:])
    hf = f"model.layers.{layer}."
    if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
        return weights(hf + "input_layernorm.weight")
    if rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return weights(hf + "post_attention_layernorm.weight")
    if rest == "self_attention.linear_qkv.weight":
        q = weights(hf + "self_attn.q_proj.weight").view(hkv, hq // hkv * d, h)
        k = weights(hf + "self_attn.k_proj.weight").view(hkv, d, h)
        v = weights(hf + "self_attn.v_proj.weight").view(hkv, d, h)
        return torch.cat([q, k, v], dim=1).reshape(-1, h)
    if rest == "self_attention.linear_proj.weight":
        return weights(hf + "self_attn.o_proj.weight")
    if rest == "mlp.linear_fc1.weight":  # gate then up, each TP shard [gate_r; up_r]
        _, tp = _tp()
        gate, up = weights(hf + "mlp.gate_proj.weight"), weights(hf + "mlp.up_proj.weight")
        return torch.cat([torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))])
    if rest == "mlp.linear_fc2.weight":
        return weights(hf + "mlp.down_proj.weight")
    raise SystemExit(f"moba: error: no Llama weight for megatron parameter {name!r}")


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] > rows:
        raise SystemExit(f"moba: error: the checkpoint's vocabulary ({x.shape[0]}) is larger than the model's ({rows})")
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])]) if x.shape[0] < rows else x


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
    the current parallel state (its TP/PP shards): the pretraining job's model, built from
    ``job_arguments``, on ``device`` (default: CUDA where there is one). ``config_overrides`` are
    fields of its ``MoBATransformerConfig``; fp32 unless ``params_dtype`` is overridden."""
    from .training.setup import build_model, default_device, transformer_config

    config = read_llama_config(hf_dir)
    weights = _Weights(hf_dir)
    args = job_arguments(config, moba_chunk_size=moba_chunk_size, moba_topk=moba_topk,
                         moba_full_attn_layers=list(moba_full_attn_layers))
    device = device or default_device()
    mcfg = transformer_config(args, device)
    if config_overrides:
        if "params_dtype" in config_overrides:
            config_overrides.setdefault("pipeline_dtype", config_overrides["params_dtype"])
        mcfg = dataclasses.replace(mcfg, **config_overrides)
    model = build_model(args, mcfg, device)
    load_llama_weights(model, hf_dir, config, weights)
    model.hf_config = config  # what export_llama writes back
    return model


def load_llama_weights(model, hf_dir, config: dict | None = None, weights=None) -> None:
    """Copy a Llama folder's weights into ``model`` (this rank's shards). SystemExit naming the
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
            full = _megatron_tensors(weights, config, _global_name(name, layers), full_shape)
            if list(full.shape) != full_shape:
                raise SystemExit(f"moba: error: {hf_dir}: {name} is {tuple(full.shape)} in the checkpoint but "
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
    h, d, v = config["hidden_size"], head_dim(config), config["vocab_size"]
    hq, hkv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    _, tp = _tp()
    layers = _layer_numbers(model)
    out = {}
    for name, param in model.named_parameters():
        full = _gather_tp(param).float().cpu()
        name = _global_name(name, layers)
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = full[:v]
            continue
        if name == "output_layer.weight":
            if not config.get("tie_word_embeddings", False):
                out["lm_head.weight"] = full[:v]
            continue
        if name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = full
            continue
        parts = name.split(".")
        hf, rest = f"model.layers.{parts[2]}.", ".".join(parts[3:])
        if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
            out[hf + "input_layernorm.weight"] = full
        elif rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
            out[hf + "post_attention_layernorm.weight"] = full
        elif rest == "self_attention.linear_qkv.weight":
            q, k, vv = full.view(hkv, hq // hkv + 2, d, h).split([hq // hkv, 1, 1], dim=1)
            out[hf + "self_attn.q_proj.weight"] = q.reshape(-1, h)
            out[hf + "self_attn.k_proj.weight"] = k.reshape(-1, h)
            out[hf + "self_attn.v_proj.weight"] = vv.reshape(-1, h)
        elif rest == "self_attention.linear_proj.weight":
            out[hf + "self_attn.o_proj.weight"] = full
        elif rest == "mlp.linear_fc1.weight":
            halves = [shard.chunk(2) for shard in full.chunk(tp)]
            out[hf + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in halves])
            out[hf + "mlp.up_proj.weight"] = torch.cat([u for _, u in halves])
        elif rest == "mlp.linear_fc2.weight":
            out[hf + "mlp.down_proj.weight"] = full
        else:
            raise SystemExit(f"moba: error: no Llama name for megatron parameter {name!r}")
    return out


def export_llama(model, out_dir, hf_config: dict | None = None) -> None:
    """Write ``model`` (a GPTModel from ``load_llama``, or one built on the same architecture with
    ``hf_config`` given) as a Hugging Face Llama folder: config.json and model.safetensors. Under
    TP/PP the shards are gathered and global rank 0 writes; every rank must call it."""
    from safetensors.torch import save_file

    module = getattr(model, "module", model)
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
