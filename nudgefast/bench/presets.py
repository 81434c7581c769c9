"""Models for `nudgefast bench`: published shape presets with random "planted" weights built on the
device, and engines over real model directories (see the package docstring)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ..api import LoadedModel, NudgingEngine
from ..config import ModelSpec, spec_from_config
from ..ops import Backend
from ..model import Transformer

# ---- shape presets (published config.json values) -------------------------------------------------
_OLMO2 = dict(architectures=["Olmo2ForCausalLM"], model_type="olmo2", vocab_size=100352, max_position_embeddings=4096,
              bos_token_id=None, eos_token_id=100257, pad_token_id=100277, rms_norm_eps=1e-6, rope_theta=500000.0,
              tie_word_embeddings=False, hidden_act="silu")
_LLAMA2 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, max_position_embeddings=4096,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False, hidden_act="silu")
SHAPES = {
    "olmo2-7b": dict(_OLMO2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    "olmo2-1b": dict(_OLMO2, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=16),
    "llama2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40),
    "llama2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    # small shapes of the same families, for tests and smoke runs on the CPU
    "olmo2-tiny": dict(_OLMO2, vocab_size=1000, eos_token_id=2, pad_token_id=0, hidden_size=96, intermediate_size=160,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512),
    "llama-tiny": dict(_LLAMA2, vocab_size=1000, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}
PRESETS = {"olmo2-7b+1b": ("olmo2-7b", "olmo2-1b"), "llama2-13b+7b": ("llama2-13b", "llama2-7b"),
           "olmo2-tiny+tiny": ("olmo2-tiny", "olmo2-tiny"), "llama-tiny+tiny": ("llama-tiny", "llama-tiny")}


# ---- Random "planted" weights at real shapes, built on the device --------------------------------
class SyntheticTokenizer:
    """What the engine needs of a tokenizer when there is none (random presets): a word-start table
    (a seeded random 40% of the vocabulary, about the share in real BPE vocabularies) and no text."""

    def __init__(self, vocab_size: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self._word_start = torch.rand(vocab_size, generator=gen) < 0.4
        self.eos_token = None

    def word_start_table(self, size: int) -> torch.Tensor:
        table = torch.zeros(size, dtype=torch.bool)
        n = min(size, self.vocab_size)
        table[:n] = self._word_start[:n]
        return table

    def end_of_turn_id(self):
        return None

    def decode(self, ids) -> str:
        return ""

    def same_vocabulary(self, other) -> bool:
        return isinstance(other, SyntheticTokenizer) and other.vocab_size == self.vocab_size


def planted_next_map(vocab: int, seed: int, like: torch.Tensor | None = None, agreement: float = 0.0) -> torch.Tensor:
    """The token each token leads to: a random permutation, or (for a nudger) `like` on a random
    `agreement` share of tokens and random elsewhere (an aligned model mostly agrees with its base)."""
    gen = torch.Generator().manual_seed(seed)
    own = torch.randperm(vocab, generator=gen)
    if like is None:
        return own
    keep = torch.rand(vocab, generator=gen) < agreement
    return torch.where(keep, like, own)


def planted_weights(spec: ModelSpec, seed: int, device, dtype: torch.dtype, next_map: torch.Tensor,
                    confident_fraction: float = 0.7, residual_noise: float = 0.3) -> dict[str, torch.Tensor]:
    """Weights in model.py's fused layout: Gaussian layers (scaled so that all of them together add
    about `residual_noise` (rms) to the unit-scale residual stream) and a head planted so that after token x the logit of next_map[x] is
    alpha above the rest. alpha is ln(V) + 1.5..3.5 (top probability ~0.8-0.97) for a
    `confident_fraction` of target tokens and ln(V) - 3..-1.2 (~0.05-0.23) for the others: far from
    any usual threshold, so the gate decides the same way in every implementation and precision."""
    if spec.tie_word_embeddings:
        raise ValueError("planted weights need an untied output head (tie_word_embeddings=false)")
    V, d, I = spec.vocab_size, spec.hidden_size, spec.intermediate_size
    gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)

    def gauss(*shape, std=1.0, keep_fp32=False):
        t = torch.randn(*shape, generator=dev_gen, device=device, dtype=torch.float32) * std
        return t if keep_fp32 else t.to(dtype)

    def norm_weight(n, value=1.0):  # Gemma's norms hold w and scale by (1 + w)
        return torch.full((n,), value - 1.0 if spec.norm_kind == "rms_gemma" else value, dtype=dtype, device=device)

    w: dict[str, torch.Tensor] = {}
    embed32 = gauss(V, d, keep_fp32=True)
    w["embed"] = embed32.to(dtype)
    confident = torch.rand(V, generator=gen) < confident_fraction
    margin = torch.where(confident, 1.5 + 2.0 * torch.rand(V, generator=gen), -3.0 + 1.8 * torch.rand(V, generator=gen))
    alpha = (math.log(V) + margin).to(device)
    target = next_map.to(device)
    head = torch.zeros(V, d, dtype=torch.float32, device=device)
    head.index_add_(0, target, embed32 * (alpha[target] / d)[:, None])
    w["lm_head"] = head.to(dtype)
    del embed32, head
    layer_gain = residual_noise / math.sqrt(2 * spec.num_layers)  # two blocks per layer, random-walk sum
    # Each block adds about layer_gain to the unit-scale residual stream: through small post-norm
    # weights where the family has post-norms (a post-norm would undo small projections), else
    # through small output projections.
    out_gain = 1.0 if spec.post_norms else layer_gain
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        w[p + "qkv"] = gauss(spec.q_size + 2 * spec.kv_size, d, std=d ** -0.5)
        w[p + "o"] = gauss(d, spec.q_size, std=out_gain * spec.q_size ** -0.5)
        w[p + "gate_up"] = gauss(2 * I, d, std=d ** -0.5)
        w[p + "down"] = gauss(d, I, std=out_gain * I ** -0.5)
        if spec.qkv_bias:
            w[p + "qkv_bias"] = torch.zeros(spec.q_size + 2 * spec.kv_size, dtype=dtype, device=device)
        if spec.o_bias:
            w[p + "o_bias"] = torch.zeros(d, dtype=dtype, device=device)
        if spec.mlp_bias:
            w[p + "gate_up_bias"] = torch.zeros(2 * I, dtype=dtype, device=device)
            w[p + "down_bias"] = torch.zeros(d, dtype=dtype, device=device)
        if spec.pre_norms:
            w[p + "attn_pre_norm"], w[p + "mlp_pre_norm"] = norm_weight(d), norm_weight(d)
        if spec.post_norms:
            w[p + "attn_post_norm"], w[p + "mlp_post_norm"] = norm_weight(d, layer_gain), norm_weight(d, layer_gain)
        if spec.qk_norm:
            n_q, n_k = (spec.q_size, spec.kv_size) if spec.qk_norm == "full" else (spec.head_dim, spec.head_dim)
            w[p + "q_norm"], w[p + "k_norm"] = norm_weight(n_q), norm_weight(n_k)
    if spec.norm_kind != "layernorm_np":
        w["final_norm"] = norm_weight(d)
    return w


def hf_state_dict(spec: ModelSpec, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under transformers' names, as views (no copies) of the fused tensors."""
    from ..loader import _NORM_ROLES

    sd = {"model.embed_tokens.weight": w["embed"]}
    if not spec.tie_word_embeddings:
        sd["lm_head.weight"] = w["lm_head"]
    for i in range(spec.num_layers):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = w[p + "qkv"].split([spec.q_size, spec.kv_size, spec.kv_size])
        sd.update({hp + "self_attn.q_proj.weight": q, hp + "self_attn.k_proj.weight": k,
                   hp + "self_attn.v_proj.weight": v, hp + "self_attn.o_proj.weight": w[p + "o"]})
        gate, up = w[p + "gate_up"].split([spec.intermediate_size] * 2)
        sd.update({hp + "mlp.gate_proj.weight": gate, hp + "mlp.up_proj.weight": up,
                   hp + "mlp.down_proj.weight": w[p + "down"]})
        if spec.qkv_bias or spec.o_bias or spec.mlp_bias:
            raise ValueError("hf_state_dict: biased presets are not supported")
        for hf_name, role in _NORM_ROLES[spec.family].items():
            sd[hp + hf_name + ".weight"] = w[p + role]
        if spec.qk_norm:
            sd[hp + "self_attn.q_norm.weight"] = w[p + "q_norm"]
            sd[hp + "self_attn.k_norm.weight"] = w[p + "k_norm"]
    if spec.norm_kind != "layernorm_np":
        sd["model.norm.weight"] = w["final_norm"]
    return sd


def hf_twin(hf_config: dict, spec: ModelSpec, w: dict[str, torch.Tensor], device, dtype: torch.dtype):
    """A transformers model sharing `w` (views, no second copy of the weights)."""
    import transformers as tf

    kwargs = {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type")}
    cfg = tf.AutoConfig.for_model(hf_config["model_type"], **kwargs)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.load_state_dict(hf_state_dict(spec, w), strict=True, assign=True)
    # non-persistent buffers (the rotary tables) were made on the meta device: make them again
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            with torch.device(device):
                setattr(parent, name.rpartition(".")[2], type(module)(config=model.config))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"hf_twin: tensors left on the meta device: {left[:5]}")
    return model.eval()


# ---- Engines and models --------------------------------------------------------------------------
def engine_from_models(base: tuple | None, nudger: tuple | None, device, *, kv_cache_tokens: int, page_size: int = 16,
                       **engine_kw) -> NudgingEngine:
    """A NudgingEngine over models built in memory: base/nudger are (spec, weights, tokenizer) or None."""
    backend = Backend.for_device(torch.device(device), engine_kw.get("native"))

    def loaded(name, given):
        if given is None:
            return None
        spec, weights, tokenizer = given
        dtype = next(iter(weights.values())).dtype
        model = Transformer(spec, weights, torch.device(device), dtype, backend)
        return LoadedModel.from_model(name, model, tokenizer, kv_cache_tokens, page_size)

    return NudgingEngine(base=loaded("base", base), nudger=loaded("nudger", nudger), device=device,
                         kv_cache_tokens=kv_cache_tokens, page_size=page_size, **engine_kw)


@dataclasses.dataclass
class Models:
    """Everything a benchmark needs about its models: the engines nudgefast runs ("nudgefast" on
    dense weights; "nudgefast-gguf" on the GGUF blocks with --weights gguf), the transformers twins
    (loaded on demand), what each engine reads, and a description for the JSON."""
    engine: NudgingEngine          # the dense engine: prompts, stop ids and the anchors come from it
    hf: dict                       # "base"/"nudger" -> transformers model, filled by load_hf()
    hf_loader: object              # () -> {"base": model, "nudger": model}
    random_weights: bool
    description: dict
    engines: dict = dataclasses.field(default_factory=dict)   # runner name -> NudgingEngine
    weights: dict = dataclasses.field(default_factory=dict)   # runner name -> describe_weights(engine)

    def __post_init__(self):
        self.engines = {"nudgefast": self.engine, **self.engines}
        self.weights = {name: describe_weights(e) for name, e in self.engines.items()}

    @property
    def dense_dtype(self) -> str:
        return str((self.engine.base or self.engine.nudger).model.dtype).replace("torch.", "")

    def load_hf(self):
        if not self.hf:
            self.hf.update(self.hf_loader())
        return self.hf


def describe_weights(engine: NudgingEngine) -> dict:
    """What one engine's forwards read: per model, the tensors kept as GGUF blocks (by bit width and
    block size, and the GGUF file's quantization types) and the dense ones (by dtype); a short label
    for tables. Block layouts are nudgefast's (blocks.py widens 5- and 6-bit types to 8-bit codes)."""
    from ..blocks import BlockWeight

    sides, formats, act8 = {}, set(), False
    for role in ("base", "nudger"):
        loaded = getattr(engine, role)
        if loaded is None:
            continue
        model = loaded.model
        tensors = [t for layer in model.layers for t in layer.values() if isinstance(t, (torch.Tensor, BlockWeight))]
        tensors.append(model.lm_head)
        layouts: dict[str, int] = {}
        for t in tensors:
            key = (f"{t.bits}-bit codes, block {t.block}" if isinstance(t, BlockWeight)
                   else f"dense {str(t.dtype).replace('torch.', '')}")
            layouts[key] = layouts.get(key, 0) + 1
        blocks = any(isinstance(t, BlockWeight) for t in tensors)
        act8 = act8 or any(isinstance(t, BlockWeight) and t.act8 for t in tensors)
        formats.add("gguf" if blocks else "dense")
        side = {"format": "gguf" if blocks else "dense", "tensors": layouts}
        if blocks:
            side["gguf_file_types"] = gguf_file_types(loaded.dir)
        sides[role] = side
    fmt = "gguf" if formats == {"gguf"} else "dense" if formats == {"dense"} else "mixed"
    dtype = str((engine.base or engine.nudger).model.dtype).replace("torch.", "")
    if fmt == "dense":
        label = f"{dtype} dense"
    else:
        types = sorted({t for side in sides.values() for t in side.get("gguf_file_types", {})
                        if t not in ("F32", "F16", "BF16")})
        label = f"GGUF blocks ({', '.join(types)}) + {dtype} norms"
        if act8:  # weights="gguf-q8": decode multiplies by activations quantized to int8 per block
            label += ", 8-bit activations (gguf-q8)"
    return {"format": fmt, "label": label, "sides": sides}


def gguf_file_types(model_dir) -> dict:
    """{GGML type name: tensor count} of the GGUF file `model_dir` was converted from."""
    from ..blocks import gguf_source
    from ..gguf import _gguf_constants, read_gguf_header

    _, types = _gguf_constants()
    header = read_gguf_header(gguf_source(model_dir))
    out: dict[str, int] = {}
    for info in header.tensors.values():
        name = types(info.ggml_type).name
        out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))


def model_identity(model_dir) -> dict | None:
    """A model directory as a result file may record it: its name (relative to the nudgefast cache
    when it lives there), the sha256 of its config.json and the GGUF it was converted from (file
    name, size), never an absolute path of the machine that ran."""
    import hashlib
    import json

    from ..gguf import CONVERSION_MARKER
    from ..paths import cache_dir

    if model_dir is None:
        return None
    d = Path(model_dir).resolve()
    try:
        name = str(d.relative_to(cache_dir().resolve()))
        where = "nudgefast cache"
    except ValueError:
        name, where = d.name, "given directory"
    out = {"name": name, "location": where,
           "config_sha256": hashlib.sha256((d / "config.json").read_bytes()).hexdigest()}
    try:
        marker = json.loads((d / CONVERSION_MARKER).read_text())
        out["converted_from"] = {"gguf_file": Path(marker["source"]).name, "size": marker.get("source_size")}
    except (OSError, ValueError, KeyError):
        pass
    return out


def preset_models(name: str, device, dtype: torch.dtype, kv_cache_tokens: int, seed: int = 0, **engine_kw) -> Models:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    base_shape, nudger_shape = PRESETS[name]
    cfgs = {"base": SHAPES[base_shape], "nudger": SHAPES[nudger_shape]}
    specs = {k: spec_from_config(dict(v, torch_dtype=str(dtype).replace("torch.", ""))) for k, v in cfgs.items()}
    if specs["base"].vocab_size != specs["nudger"].vocab_size:
        raise ValueError(f"preset {name}: base and nudger vocabularies differ")
    base_map = planted_next_map(specs["base"].vocab_size, seed)
    maps = {"base": base_map, "nudger": planted_next_map(specs["base"].vocab_size, seed + 1, base_map, 0.7)}
    weights = {k: planted_weights(specs[k], seed + 10 * (k == "nudger"), device, dtype, maps[k],
                                  confident_fraction=0.7 if k == "base" else 1.0) for k in specs}
    tok = SyntheticTokenizer(specs["base"].vocab_size, seed)
    engine = engine_from_models((specs["base"], weights["base"], tok), (specs["nudger"], weights["nudger"], tok),
                                device, kv_cache_tokens=kv_cache_tokens, **engine_kw)

    def loader():
        return {k: hf_twin(cfgs[k], specs[k], weights[k], device, dtype) for k in specs}

    return Models(engine, {}, loader, True, {
        "source": f"preset:{name}", "same_model_both_roles": False, "base": base_shape, "nudger": nudger_shape, "dtype": str(dtype),
        "weights": "random, planted next-token map (Gaussian layers adding ~0.3 rms to the unit residual stream; the base "
                   "head is confident on 70% of tokens, the nudger agrees with the base on 70% of tokens)",
        "params": {k: sum(t.numel() for t in weights[k].values()) for k in weights}})


def dir_models(base_dir, nudger_dir, device, dtype: torch.dtype | None, kv_cache_tokens: int, weights: str = "dense",
               **engine_kw) -> Models:
    """Engines over real model directories: always one on the dense weights (what the anchors and
    the dense-vs-dense speed-ups use); with weights="gguf" (or "gguf-q8") a second on the GGUF blocks,
    "nudgefast-gguf" (or "nudgefast-gguf-q8"), so every GGUF figure has a dense one from the same run
    beside it."""
    engine = NudgingEngine(base=base_dir, nudger=nudger_dir, device=device, dtype=dtype,
                           kv_cache_tokens=kv_cache_tokens, weights="dense", **engine_kw)
    engines = {}
    if weights in ("gguf", "gguf-q8"):
        engines[f"nudgefast-{weights}"] = NudgingEngine(base=base_dir, nudger=nudger_dir, device=device, dtype=dtype,
                                                        kv_cache_tokens=kv_cache_tokens, weights=weights, **engine_kw)

    def loader():
        import transformers as tf

        out = {}
        for name in ("base", "nudger"):
            loaded = getattr(engine, name)
            if loaded is not None:
                out[name] = tf.AutoModelForCausalLM.from_pretrained(loaded.dir, dtype=loaded.model.dtype).to(
                    engine.device).eval()
        return out

    same = base_dir is not None and nudger_dir is not None and Path(base_dir).resolve() == Path(nudger_dir).resolve()
    return Models(engine, {}, loader, False, {
        "source": "dirs", "base": model_identity(base_dir), "nudger": model_identity(nudger_dir),
        "same_model_both_roles": same, "dtype": str((engine.base or engine.nudger).model.dtype)}, engines)
