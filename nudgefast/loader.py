"""Checkpoint loading: safetensors shards -> the fused parameter layout of model.py.

Pickled checkpoints (*.bin, *.pt, *.pth, *.ckpt) are refused and never opened: unpickling runs
arbitrary code. Only safetensors are read.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .blocks import BlockWeight, concat_rows
from .config import ConfigError, ModelSpec

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (single file or sharded with an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConfigError(f"{index} is not a valid safetensors index: {e}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{model_dir}: shards listed in the index are missing: {missing}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(model_dir.glob("*.safetensors"))
    if shards:
        return shards
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ConfigError(
            f"{model_dir} holds only pickled weights ({', '.join(pickled)}); nudgefast never unpickles "
            "checkpoints (it can run arbitrary code). Convert them to safetensors first.")
    raise ConfigError(f"{model_dir} has no weights: expected model.safetensors or sharded safetensors "
                      "with model.safetensors.index.json")


def read_tensors(model_dir: Path, skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint except the names in `skip` (never read from disk)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name not in skip:
                        tensors[name] = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ConfigError(f"cannot read {path}: {e}") from None
    return tensors


def _strip_prefix(name: str) -> str:
    for prefix in ("model.language_model.", "language_model.model.", "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


# HF per-layer norm names -> our role, per family. Note `post_attention_layernorm` means the
# pre-MLP norm in Llama/Qwen2 but the norm on the attention output in Gemma and OLMo-2.
_NORM_ROLES = {
    "llama": {"input_layernorm": "attn_pre_norm", "post_attention_layernorm": "mlp_pre_norm"},
    "qwen2": {"input_layernorm": "attn_pre_norm", "post_attention_layernorm": "mlp_pre_norm"},
    "olmo": {},
    "olmo2": {"post_attention_layernorm": "attn_post_norm", "post_feedforward_layernorm": "mlp_post_norm"},
    "gemma2": {"input_layernorm": "attn_pre_norm", "post_attention_layernorm": "attn_post_norm",
               "pre_feedforward_layernorm": "mlp_pre_norm", "post_feedforward_layernorm": "mlp_post_norm"},
}
_NORM_ROLES["gemma3"] = _NORM_ROLES["gemma2"]


def _cat(parts: list) -> torch.Tensor | BlockWeight:
    if any(isinstance(p, BlockWeight) for p in parts):
        return concat_rows(parts)
    return torch.cat(parts)


def fused_state_dict(spec: ModelSpec, raw: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Map HF tensor names to model.py's parameters, fusing q/k/v and gate/up into single matmuls.
    Linear weights may be BlockWeights (weights="gguf"); they are fused the same way."""
    # Tensors are popped as they are fused so peak host memory stays near one copy of the weights.
    t = {_strip_prefix(k): v for k, v in raw.items()}
    raw.clear()

    def take(name: str) -> torch.Tensor:
        if name not in t:
            raise ConfigError(f"checkpoint is missing tensor {name!r} (family {spec.family})")
        return t.pop(name).to(dtype)

    out: dict[str, torch.Tensor] = {"embed": take("embed_tokens.weight")}
    if out["embed"].shape[1] != spec.hidden_size:
        raise ConfigError(f"embed_tokens has width {out['embed'].shape[1]}, config says hidden_size={spec.hidden_size}")
    if out["embed"].shape[0] != spec.vocab_size:
        raise ConfigError(f"embed_tokens has {out['embed'].shape[0]} rows, config says vocab_size={spec.vocab_size}")
    roles = _NORM_ROLES[spec.family]
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        a = p + "self_attn."
        q, k, v = take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight")
        if q.shape != (spec.q_size, spec.hidden_size) or k.shape != (spec.kv_size, spec.hidden_size):
            raise ConfigError(f"layer {i}: q/k projection shapes {tuple(q.shape)}/{tuple(k.shape)} do not match "
                              f"the config (heads={spec.num_heads}, kv_heads={spec.num_kv_heads}, head_dim={spec.head_dim})")
        out[p + "qkv"] = _cat([q, k, v])
        if spec.qkv_bias:
            out[p + "qkv_bias"] = torch.cat([take(a + "q_proj.bias"), take(a + "k_proj.bias"), take(a + "v_proj.bias")])
        out[p + "o"] = take(a + "o_proj.weight")
        if spec.o_bias:
            out[p + "o_bias"] = take(a + "o_proj.bias")
        if spec.qk_norm:
            out[p + "q_norm"] = take(a + "q_norm.weight")
            out[p + "k_norm"] = take(a + "k_norm.weight")
        m = p + "mlp."
        out[p + "gate_up"] = _cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")])
        out[p + "down"] = take(m + "down_proj.weight")
        if spec.mlp_bias:
            out[p + "gate_up_bias"] = torch.cat([take(m + "gate_proj.bias"), take(m + "up_proj.bias")])
            out[p + "down_bias"] = take(m + "down_proj.bias")
        for hf_name, role in roles.items():
            out[p + role] = take(p + hf_name + ".weight")
    if spec.norm_kind != "layernorm_np":
        out["final_norm"] = take("norm.weight")
    if spec.tie_word_embeddings:
        out["lm_head"] = out["embed"]
    else:
        head = t.get("lm_head.weight")
        if head is None:
            raise ConfigError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
        out["lm_head"] = head.to(dtype)
    return out
