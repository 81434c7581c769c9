"""ModelSpec: everything the one transformer implementation needs, read from a config.json.

Six families share one implementation (model.py); what differs between them is data here, not code
there. Both config.json styles are read: the transformers 4 style (`rope_theta`, `rope_scaling`,
`rope_local_base_freq`, `sliding_window_pattern`) found in real checkpoints, and the transformers 5
style (`rope_parameters`, `layer_types`) written by current tooling.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError

# architectures entry -> family
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "OlmoForCausalLM": "olmo",
    "Olmo2ForCausalLM": "olmo2",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}
MODEL_TYPES = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "olmo": "olmo", "olmo2": "olmo2",
    "gemma2": "gemma2", "gemma3_text": "gemma3",
}


class ConfigError(UserError, ValueError):
    """A model directory or config.json that nudgefast cannot serve (a user error: errors.py)."""


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    scaling: dict | None = None  # {"rope_type": "linear"|"llama3", ...} or None

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """Inverse frequencies (float32), following the published RoPE variants."""
        inv = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        kind = (self.scaling or {}).get("rope_type", "default")
        if kind == "default":
            return inv
        if kind == "linear":
            return inv / float(self.scaling["factor"])
        if kind == "llama3":
            s = self.scaling
            factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
            old_ctx = float(s["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < old_ctx / hi) * ~(wavelen > old_ctx / lo)
            return torch.where(medium, smoothed, scaled)
        raise ConfigError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    norm_kind: str                 # "rms" (w*x), "rms_gemma" ((1+w)*x), "layernorm_np" (no weights)
    pre_norms: bool                # norm before attention and MLP (all but OLMo-2)
    post_norms: bool               # norm on the attention and MLP outputs (Gemma-2/3, OLMo-2)
    qk_norm: str | None            # None, "full" (OLMo-2: over the whole projection), "head" (Gemma-3)
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    clip_qkv: float | None
    activation: str                # "silu" or "gelu_tanh"
    embed_scale: float | None      # Gemma multiplies embeddings by sqrt(hidden)
    attn_scale: float
    attn_softcap: float            # 0 = none
    final_softcap: float           # 0 = none
    layer_windows: tuple[int, ...]  # per layer, 0 = full attention
    layer_rope: tuple[int, ...]    # per layer, index into ropes
    ropes: tuple[RopeSpec, ...]
    tie_word_embeddings: bool
    dtype: torch.dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_scaling(cfg: dict, params: dict | None) -> dict | None:
    scaling = dict(params) if params else None
    if scaling is not None:
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            return None
        if scaling["rope_type"] == "llama3":
            scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return scaling


def _ropes(cfg: dict, layer_types: list[str]) -> tuple[tuple[RopeSpec, ...], tuple[int, ...]]:
    """One RopeSpec per distinct layer type. Handles rope_parameters (flat or nested by layer type)
    and the older rope_theta / rope_scaling / rope_local_base_freq fields."""
    params = cfg.get("rope_parameters")
    nested = isinstance(params, dict) and any(isinstance(v, dict) for v in params.values())
    by_type: dict[str, RopeSpec] = {}
    for lt in dict.fromkeys(layer_types):
        if nested:
            p = params.get(lt) or params.get("full_attention") or {}
            theta = p.get("rope_theta", cfg.get("rope_theta", 10000.0))
            by_type[lt] = RopeSpec(float(theta), _rope_scaling(cfg, p))
        elif params:
            by_type[lt] = RopeSpec(float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                                   _rope_scaling(cfg, params))
        else:
            theta = float(cfg.get("rope_theta", 10000.0))
            scaling = _rope_scaling(cfg, cfg.get("rope_scaling"))
            if lt == "sliding_attention" and "rope_local_base_freq" in cfg:
                # Gemma-3 v4-style configs: local layers use their own base and no scaling
                theta, scaling = float(cfg["rope_local_base_freq"]), None
            by_type[lt] = RopeSpec(theta, scaling)
    kinds = list(by_type)
    return tuple(by_type[k] for k in kinds), tuple(kinds.index(lt) for lt in layer_types)


def _layer_types(family: str, cfg: dict, n_layers: int) -> list[str]:
    if cfg.get("layer_types"):
        types = list(cfg["layer_types"])
        if len(types) != n_layers:
            raise ConfigError(f"layer_types has {len(types)} entries for {n_layers} layers")
        return types
    if family == "gemma2":
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    if family == "gemma3":
        pattern = int(cfg.get("sliding_window_pattern", 6))
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    if family == "qwen2" and cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        first_full = int(cfg.get("max_window_layers", n_layers))
        return ["sliding_attention" if i >= first_full else "full_attention" for i in range(n_layers)]
    if family == "llama" and cfg.get("sliding_window"):
        return ["sliding_attention"] * n_layers  # Mistral with a window
    return ["full_attention"] * n_layers


def spec_from_config(cfg: dict, generation_config: dict | None = None) -> ModelSpec:
    archs = cfg.get("architectures") or []
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None and archs:
        raise ConfigError(
            f"unknown architecture {archs!r}; supported: {sorted(ARCHITECTURES)}")
    if family is None:
        family = MODEL_TYPES.get(cfg.get("model_type", ""))
        if family is None:
            raise ConfigError(f"config.json names no known architecture (model_type={cfg.get('model_type')!r}); "
                              f"supported: {sorted(ARCHITECTURES)}")
    try:
        hidden = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        n_layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
        inter = int(cfg["intermediate_size"])
    except KeyError as e:
        raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    if n_heads % n_kv:
        raise ConfigError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    gemma = family in ("gemma2", "gemma3")
    layer_types = _layer_types(family, cfg, n_layers)
    window = int(cfg.get("sliding_window") or 0)
    windows = tuple(window if lt == "sliding_attention" else 0 for lt in layer_types)
    ropes, layer_rope = _ropes(cfg, layer_types)
    scale = float(cfg["query_pre_attn_scalar"]) ** -0.5 if gemma else head_dim ** -0.5
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    act = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}.get(act)
    if act is None:
        raise ConfigError(f"activation {cfg.get('hidden_activation') or cfg.get('hidden_act')!r} is not supported")
    dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    gen = generation_config or {}
    eos = _ids(gen.get("eos_token_id")) or _ids(cfg.get("eos_token_id"))
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    return ModelSpec(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        norm_eps=float(cfg.get("rms_norm_eps") or cfg.get("layer_norm_eps") or 1e-5),
        norm_kind="rms_gemma" if gemma else ("layernorm_np" if family == "olmo" else "rms"),
        pre_norms=family != "olmo2",
        post_norms=family in ("olmo2", "gemma2", "gemma3"),
        qk_norm={"olmo2": "full", "gemma3": "head"}.get(family),
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias")),
        o_bias=bool(cfg.get("attention_bias")),
        mlp_bias=bool(cfg.get("mlp_bias")),
        clip_qkv=float(cfg["clip_qkv"]) if cfg.get("clip_qkv") is not None else None,
        activation=act,
        embed_scale=hidden ** 0.5 if gemma else None,
        attn_scale=scale,
        attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0) if gemma else 0.0,
        final_softcap=float(cfg.get("final_logit_softcapping") or 0.0) if gemma else 0.0,
        layer_windows=windows,
        layer_rope=layer_rope,
        ropes=ropes,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        dtype=_DTYPES.get(str(dtype_name).replace("torch.", ""), torch.float32),
        bos_token_id=int(bos) if isinstance(bos, int) else None,
        eos_token_ids=eos,
    )


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def load_spec(model_dir: str | Path) -> ModelSpec:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {str(model_dir)!r} does not exist")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{model_dir} has no config.json")
    gen_path = model_dir / "generation_config.json"
    gen = read_json(gen_path) if gen_path.is_file() else None
    return spec_from_config(read_json(cfg_path), gen)
