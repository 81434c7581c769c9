"""`nudgefast bench`: decode benchmarks of nudgefast against the transformers anchors.

    nudgefast bench --packaged smollm2-135m-instruct --mode base_only,nudging --granularity token,word \
        --anchors --prompt-len 128 --new-tokens 128 --repeats 5 --out benchmarks/results/cpu-x.json
    nudgefast bench --suite gpu-olmo2 --out benchmarks/results/h100-olmo2.json --plot h100-olmo2.png

A *case* is one configuration (mode, granularity, speculate K, batch, prompt and output lengths,
dtype). Each case runs nudgefast and, at batch 1 with --anchors, the transformers anchors of
benchmarks/anchors/ on the same weights and prompts. Every anchor's tokens are checked against
nudgefast's before it is timed. Runs are interleaved (ours, anchor, ours, anchor, ...) so a busy
machine slows both alike; figures are medians over the repeats.

Models: real directories (--base/--nudger, or --packaged NAME for one packaged model as both base
and nudger), or a shape preset with random weights built on the device (--preset, e.g.
olmo2-7b+1b): nothing is written to disk. The random weights are "planted": Gaussian layers whose
residual contribution is small, and an output head that maps each token to a fixed next token with
a per-token margin, so greedy outputs are stable across implementations in bf16 (the anchor check
can pass) and the base model is confident on a chosen fraction of tokens (the gate mixes sources).
The memory traffic per step, which is what decode speed depends on, is that of the real shapes.

Per case: tokens/s (aggregate and per sequence), ms/token p50/p90/p99, time to first token, host
synchronizations per token, nudged fraction, speculative acceptance, bytes read per step and,
against the measured copy bandwidth, the memory-bandwidth bound and the fraction of it reached.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from .api import LoadedModel, NudgeConfig, NudgingEngine
from .blocks import BlockWeight
from .config import ModelSpec, spec_from_config
from .kv_cache import KVPool
from .model import Transformer

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "nudgefast-bench/1"
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUDGEFAST_NATIVE", "TRITON_INTERPRET")  # recorded with the command
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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

# ---- named suites (the scenario sets of issue 6 and issues 2/3) ----------------------------------
SUITES = {
    "gpu-olmo2": dict(preset="olmo2-7b+1b", device="cuda", dtype="bfloat16", prompt_len=128, new_tokens=256,
                      batch=[1, 8, 32], anchors=True,
                      cases=[("base_only", "word", 0), ("nudging", "token", 0), ("nudging", "word", 0),
                             ("nudging", "word", 4)]),
    "gpu-llama2": dict(preset="llama2-13b+7b", device="cuda", dtype="bfloat16", prompt_len=128, new_tokens=256,
                       batch=[1, 8, 32], anchors=False,
                       cases=[("base_only", "word", 0), ("nudging", "token", 0), ("nudging", "word", 0),
                              ("nudging", "word", 4)]),
    "cpu-smollm2": dict(packaged="smollm2-135m-instruct", device="cpu", dtype="float32", prompt_len=128,
                        new_tokens=128, batch=[1], anchors=True,
                        cases=[("base_only", "word", 0), ("nudging", "token", 0), ("nudging", "word", 0),
                               ("nudging", "word", 4)]),
}


# =================================================================================================
# Random "planted" weights at real shapes, built on the device
# =================================================================================================
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
    from .loader import _NORM_ROLES

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


# =================================================================================================
# Engines and models
# =================================================================================================
def _loaded(name: str, model: Transformer, tokenizer, kv_tokens: int, page_size: int) -> LoadedModel:
    """A LoadedModel around a model built in memory (LoadedModel's constructor reads a directory)."""
    lm = LoadedModel.__new__(LoadedModel)
    lm.name, lm.dir, lm.model, lm.spec, lm.tokenizer = name, Path(f"<in-memory {name}>"), model, model.spec, tokenizer
    lm.kv = KVPool(model.spec, max(1, -(-kv_tokens // page_size)), page_size, model.dtype, model.device)
    lm.eos_ids = list(model.spec.eos_token_ids)
    return lm


def engine_from_models(base: tuple | None, nudger: tuple | None, device, *, kv_cache_tokens: int, page_size: int = 16,
                       **engine_kw) -> NudgingEngine:
    """A NudgingEngine over models built in memory: base/nudger are (spec, weights, tokenizer) or None.

    NudgingEngine's own constructor runs (every knob it sets stays right); only its per-model
    loader is swapped, for the duration of the call, for one that wraps the given weights. An
    in-memory constructor hook in api.py would make the swap unnecessary."""
    from . import api

    given = {"base": base, "nudger": nudger}

    def load(name, _dir, device, _dtype, backend, kv_tokens, page, _weights="dense"):
        spec, weights, tokenizer = given[name]
        dtype = next(iter(weights.values())).dtype
        return _loaded(name, Transformer(spec, weights, device, dtype, backend), tokenizer, kv_tokens, page)

    real = api.LoadedModel
    api.LoadedModel = load
    try:
        return NudgingEngine(base="<in-memory base>" if base else None, nudger="<in-memory nudger>" if nudger else None,
                             device=device, kv_cache_tokens=kv_cache_tokens, page_size=page_size, **engine_kw)
    finally:
        api.LoadedModel = real


@dataclasses.dataclass
class Models:
    """Everything a benchmark needs about its models: the engine, the transformers twins (loaded on
    demand), how to make prompts and a description for the JSON."""
    engine: NudgingEngine
    hf: dict                       # "base"/"nudger" -> transformers model, filled by load_hf()
    hf_loader: object              # () -> {"base": model, "nudger": model}
    random_weights: bool
    description: dict

    def load_hf(self):
        if not self.hf:
            self.hf.update(self.hf_loader())
        return self.hf


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
        "source": f"preset:{name}", "base": base_shape, "nudger": nudger_shape, "dtype": str(dtype),
        "weights": "random, planted next-token map (Gaussian layers adding ~0.3 rms to the unit residual stream; the base "
                   "head is confident on 70% of tokens, the nudger agrees with the base on 70% of tokens)",
        "params": {k: sum(t.numel() for t in weights[k].values()) for k in weights}})


def dir_models(base_dir, nudger_dir, device, dtype: torch.dtype | None, kv_cache_tokens: int, **engine_kw) -> Models:
    engine = NudgingEngine(base=base_dir, nudger=nudger_dir, device=device, dtype=dtype,
                           kv_cache_tokens=kv_cache_tokens, **engine_kw)

    def loader():
        import transformers as tf

        out = {}
        for name in ("base", "nudger"):
            loaded = getattr(engine, name)
            if loaded is not None:
                out[name] = tf.AutoModelForCausalLM.from_pretrained(loaded.dir, dtype=loaded.model.dtype).to(
                    engine.device).eval()
        return out

    return Models(engine, {}, loader, False, {
        "source": "dirs", "base": str(base_dir) if base_dir else None, "nudger": str(nudger_dir) if nudger_dir else None,
        "dtype": str((engine.base or engine.nudger).model.dtype), "weights": engine.weights})


# =================================================================================================
# Prompts
# =================================================================================================
PASSAGE = (
    "Studying well is less about the number of hours spent at a desk than about how those hours are used. "
    "Attention drifts after a while, so short sessions with a clear goal tend to beat long sessions without one. "
    "A quiet place, a phone left in another room and a written list of what to finish all help. Testing yourself "
    "on the material, rather than rereading it, shows what you actually remember and what you only recognise. "
    "Sleep matters as well: memories are consolidated at night, and a tired mind learns slowly the next day. "
    "Regular breaks, a glass of water and a short walk restore focus more than a cup of coffee does. Spacing the "
    "review of a topic over several days works better than cramming it into one evening, because each return to "
    "the material strengthens it. Explaining an idea to a friend, or to an empty chair, reveals the gaps in it. "
)
QUESTIONS = ["What are three tips for staying focused while studying?", "Why does sleep help learning?",
             "How should I plan a week of revision?", "What is the benefit of testing yourself?"]
SYSTEM = "Answer the question helpfully and concisely."


def make_prompts(models: Models, batch: int, prompt_len: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(base_prompts, nudger_prompts), one row per sequence. With real tokenizers: the base prompt
    is exactly prompt_len tokens (the head of a passage, then a question, as plain text); the
    nudger gets the same passage and question in its chat template. Without: random token ids."""
    engine = models.engine
    sides = [s for s in (engine.base, engine.nudger) if s is not None]
    tok = sides[0].tokenizer
    if tok is None or isinstance(tok, SyntheticTokenizer):
        gen = torch.Generator().manual_seed(seed)
        vocab = min(s.spec.vocab_size for s in sides)
        rows = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
        return rows, [list(r) for r in rows]
    base_rows, nudger_rows = [], []
    passage = tok.encode(PASSAGE * (1 + prompt_len // 100), add_special_tokens=False)
    specials = tok.encode("", add_special_tokens=True)  # the BOS the base tokenizer adds, if any
    for r in range(batch):
        question = QUESTIONS[r % len(QUESTIONS)]
        tail = tok.encode(f"\n{question}\n", add_special_tokens=False)
        if len(tail) > prompt_len // 2:  # a very short prompt (or a tiny tokenizer): the passage alone
            question, tail = "", []
        keep = prompt_len - len(tail) - len(specials)
        head = passage[r:r + keep]  # rows start at different offsets so no two rows are identical
        base_rows.append(specials + head + tail)
        ntok = (engine.nudger or engine.base).tokenizer
        context = tok.decode(head)
        nudger_rows.append(ntok.encode(ntok.render_chat(SYSTEM, f"{context}\n\n{question}".strip(), "")
                                       if ntok.chat_template else f"{context}\n{question}\n",
                                       add_special_tokens=not ntok.chat_template))
    return base_rows, nudger_rows


# =================================================================================================
# Timing: a clock on the decode loop that adds no host synchronization
# =================================================================================================
class StepClock:
    """Timestamps of the decode loop's steps without extra host syncs: on the CPU perf_counter() at
    the end of each gate step, driver-model forward and CUDA-graph replay; on CUDA an event recorded
    on the stream at the same points (a few microseconds each), read after the run. Installed by
    patching, for one run: decode.gate_fn, the driver model's forward (instance attribute) and
    torch.cuda.CUDAGraph.replay. A step hook in decode.py would replace the patching."""

    def __init__(self, engine: NudgingEngine):
        self.engine = engine
        self.cuda = engine.device.type == "cuda"
        self.marks = {"gate": [], "forward": [], "replay": []}
        self._start = None

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _wrap(self, fn, kind):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            if not (self.cuda and torch.cuda.is_current_stream_capturing()):  # never inside a graph capture
                self.marks[kind].append(self._mark())
            return out
        return wrapped

    @contextlib.contextmanager
    def installed(self, driver: Transformer):
        from . import decode

        saved_gate_fn = decode.gate_fn
        decode.gate_fn = lambda engine: self._wrap(saved_gate_fn(engine), "gate")
        driver.forward = self._wrap(Transformer.forward.__get__(driver), "forward")
        saved_replay = torch.cuda.CUDAGraph.replay if self.cuda else None
        if self.cuda:
            torch.cuda.CUDAGraph.replay = self._wrap(saved_replay, "replay")
        self._start = self._mark()
        try:
            yield self
        finally:
            decode.gate_fn = saved_gate_fn
            del driver.forward
            if self.cuda:
                torch.cuda.CUDAGraph.replay = saved_replay

    def seconds(self, kind) -> list[float]:
        """Seconds since the start of the run, for each mark of `kind`."""
        if self.cuda:
            torch.cuda.synchronize()
            return [self._start.elapsed_time(e) / 1e3 for e in self.marks[kind]]
        return [t - self._start for t in self.marks[kind]]


def percentiles(samples: list[float]) -> dict:
    if not samples:
        return {"p50": None, "p90": None, "p99": None, "n": 0}
    s = sorted(samples)

    def q(p):
        k = (len(s) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)
    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "n": len(s)}


@contextlib.contextmanager
def count_cuda_syncs(enabled: bool):
    """Counts the host synchronizations torch reports in sync-debug mode (CUDA only)."""
    box = {"count": None}
    if not enabled:
        yield box
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode("default")
    box["count"] = sum("synchroniz" in str(w.message) for w in caught)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# =================================================================================================
# Runners: nudgefast and the anchors, each returning one RunRecord per run
# =================================================================================================
@dataclasses.dataclass
class RunRecord:
    seconds: float
    token_ids: list[list[int]]
    from_nudger: list[list[bool]]
    finish: list[str]
    host_reads: float | None = None          # per emitted token of one sequence
    ttft: float | None = None
    latencies: list[float] | None = None     # seconds per token
    latency_source: str | None = None
    stats: list[dict] | None = None
    row_tokens: list[int] | None = None      # emitted tokens per row where they differ from token_ids
    cpu_seconds: float | None = None         # process CPU time of the run (CPU devices)

    @property
    def tokens(self) -> int:
        return sum(self.row_tokens) if self.row_tokens is not None else sum(len(t) for t in self.token_ids)


class NudgefastRunner:
    name = "nudgefast"

    def __init__(self, models: Models, config: NudgeConfig, base_prompts, nudger_prompts):
        self.engine, self.config = models.engine, config
        self.base_prompts = base_prompts if config.mode != "nudger_only" else None
        self.nudger_prompts = nudger_prompts if config.mode != "base_only" else None
        self.crossvocab = config.mode == "nudging" and not same_vocabulary(models.engine)
        if self.crossvocab:
            from . import crossvocab

            crossvocab.check_config(config)  # token granularity and speculation need one vocabulary
            self._generate = lambda: crossvocab.generate_ids(self.engine, self.base_prompts, self.nudger_prompts, config)
        else:
            self._generate = lambda: self.engine.generate_ids(self.base_prompts, self.nudger_prompts, config)

    def run(self, count_syncs: bool = False) -> RunRecord:
        engine, cfg = self.engine, self.config
        clock = StepClock(engine)
        driver = (engine.nudger if cfg.mode == "nudger_only" else engine.base).model
        _sync(engine.device)
        with count_cuda_syncs(count_syncs) as syncs:
            with clock.installed(driver):
                c0, t0 = time.process_time(), time.perf_counter()
                outs = self._generate()
                _sync(engine.device)
                seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        rec = RunRecord(seconds, [o.token_ids for o in outs], [o.from_nudger for o in outs],
                        [o.finish_reason for o in outs], stats=[o.stats for o in outs], cpu_seconds=cpu_seconds)
        if self.crossvocab:  # max_new_tokens counts tokens emitted, each in its writer's vocabulary
            rec.row_tokens = [o.stats["emitted_tokens"] for o in outs]
        per_row = max(1, max(rec.row_tokens or [len(o.token_ids) for o in outs]))
        if syncs["count"] is not None:
            rec.host_reads = syncs["count"] / per_row
        elif not self.crossvocab:
            rec.host_reads = outs[0].stats.get("flag_reads", 0) / per_row
        if self.crossvocab:
            rec.latency_source = "unavailable (the cross-vocabulary path has no fixed decode step)"
        else:
            self._latencies(rec, clock, outs)
        return rec

    def _latencies(self, rec: RunRecord, clock: StepClock, outs) -> None:
        gate = clock.seconds("gate")
        if not gate:
            rec.latency_source = "unavailable (no gate step observed)"
            return
        rec.ttft = gate[0]
        replay = clock.seconds("replay")
        if self.config.speculate:
            rounds = replay or [t for t in clock.seconds("forward") if t > gate[0]]
            periods = [b - a for a, b in zip([gate[0]] + rounds[:-1], rounds)]
            per_round = statistics.mean(o.stats.get("tokens_per_round", 1.0) or 1.0 for o in outs)
            rec.latencies = [p / per_round for p in periods]
            rec.latency_source = "speculative round time / mean tokens per round"
        else:
            steps = replay or gate[1:]
            rec.latencies = [b - a for a, b in zip([gate[0]] + steps[:-1], steps)]
            rec.latency_source = "decode step period" + (" (CUDA graph replays)" if replay else "")


class AnchorRunner:
    """One transformers anchor, batch 1."""

    def __init__(self, name: str, models: Models, config: NudgeConfig, base_prompts, nudger_prompts, stop_ids,
                 word_start):
        self.name, self.models, self.config = name, models, config
        self.base_prompt, self.nudger_prompt = base_prompts[0], nudger_prompts[0]
        self.stop_ids, self.word_start = set(stop_ids), word_start

    def run(self, count_syncs: bool = False) -> RunRecord:
        anchors = load_anchors()
        hf, cfg = self.models.load_hf(), self.config
        device = self.models.engine.device
        _sync(device)
        with count_cuda_syncs(count_syncs) as syncs:
            c0, t0 = time.process_time(), time.perf_counter()
            if self.name == "hf_generate":
                side = "nudger" if cfg.mode == "nudger_only" else "base"
                prompt = self.nudger_prompt if side == "nudger" else self.base_prompt
                res = anchors.hf_generate(hf[side], prompt, cfg, self.stop_ids, from_nudger=side == "nudger")
            else:
                res = anchors.ANCHORS[self.name](hf["base"], hf["nudger"], self.base_prompt, self.nudger_prompt,
                                                 cfg, self.stop_ids, self.word_start)
            _sync(device)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        rec = RunRecord(seconds, [res.token_ids], [res.from_nudger], [res.finish_reason], cpu_seconds=cpu_seconds)
        n = max(1, len(res.token_ids))
        rec.host_reads = syncs["count"] / n if syncs["count"] is not None else (
            res.host_reads / n if res.host_reads is not None else None)
        if res.token_times:
            rec.ttft = res.token_times[0] - t0
            rec.latencies = [b - a for a, b in zip(res.token_times, res.token_times[1:])]
            rec.latency_source = "time between emitted tokens"
        return rec


def same_vocabulary(engine: NudgingEngine) -> bool:
    """Both models read the same ids (else nudging runs on text: nudgefast/crossvocab.py)."""
    b, n = engine.base, engine.nudger
    if b is None or n is None or b.tokenizer is None or n.tokenizer is None:
        return True
    return b.tokenizer.same_vocabulary(n.tokenizer)


def load_anchors():
    """benchmarks.anchors from the source checkout (the anchors are not part of the installed package)."""
    try:
        import benchmarks.anchors as anchors
    except ImportError:
        if not (REPO_ROOT / "benchmarks" / "anchors" / "__init__.py").is_file():
            raise ImportError("the transformers anchors live in the source checkout (benchmarks/anchors/); "
                              "run nudgefast bench from an editable install of the repository") from None
        sys.path.insert(0, str(REPO_ROOT))
        import benchmarks.anchors as anchors
    return anchors


def anchors_for(config: NudgeConfig) -> list[str]:
    if config.mode in ("base_only", "nudger_only"):
        return ["hf_generate"]
    return ["hf_nudging_token"] if config.granularity == "token" else ["hf_nudging_chunked"]


def compare_outputs(ours: RunRecord, theirs: RunRecord) -> dict:
    a, b = ours.token_ids[0], theirs.token_ids[0]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    flags_equal = ours.from_nudger[0] == theirs.from_nudger[0]
    finish_equal = ours.finish[0] == theirs.finish[0]
    return {"ran": True, "against": "nudgefast", "equal": first is None and flags_equal and finish_equal,
            "tokens_compared": max(len(a), len(b)), "first_divergence": first, "provenance_equal": flags_equal,
            "finish_reason_equal": finish_equal}


# =================================================================================================
# Bytes per step and the bandwidth bound
# =================================================================================================
def measure_copy_bandwidth(device, nbytes: int | None = None, repeats: int = 20) -> float:
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written. CUDA: 1 GiB copied
    `repeats` times between two events, best of 3 batches; CPU: 256 MiB, median of `repeats`."""
    device = torch.device(device)
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        best = 0.0
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                dst.copy_(src)
            end.record()
            end.synchronize()
            best = max(best, 2 * nbytes * repeats / (start.elapsed_time(end) / 1e3) / 1e9)
        return best
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def weight_bytes(model: Transformer) -> int:
    """Bytes of weights one decode forward reads: every layer tensor, the final norm and the whole
    output head (the embedding table is only gathered, a few rows, unless it is the head)."""
    seen, total = set(), 0
    tensors = [t for layer in model.layers for t in layer.values() if isinstance(t, (torch.Tensor, BlockWeight))]
    tensors += [model.lm_head] + ([model.final_norm] if model.final_norm is not None else [])
    for t in tensors:
        if isinstance(t, BlockWeight):  # GGUF blocks: codes + scales + offsets
            key, size = t.codes.data_ptr(), t.nbytes
        else:
            key, size = t.data_ptr(), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += size
    return total


def bytes_per_step(engine: NudgingEngine, config: NudgeConfig, batch: int, context: float) -> dict:
    """Bytes one plain decode step reads: the weights of the models in play and every row's KV cache
    at the mean context length of the decode. The bandwidth bound of a case is the same for every
    engine that does its work (nudgefast, an anchor), and speculation, which reads the base model
    once per round, can exceed it. For speculative cases the bytes of one round are given too."""
    def step_bytes(loaded):
        return weight_bytes(loaded.model) + KVPool.bytes_per_token(loaded.spec, loaded.model.dtype) * context * batch

    sides = {"base_only": ["base"], "nudger_only": ["nudger"], "nudging": ["base", "nudger"]}[config.mode]
    out = {"bytes": int(sum(step_bytes(getattr(engine, s)) for s in sides)), "mean_context": context,
           "weights_bytes": {s: weight_bytes(getattr(engine, s).model) for s in sides}}
    if config.speculate:  # K draft forwards of the nudger, one verify forward of the base
        out["bytes_per_round"] = int(step_bytes(engine.base) + config.speculate * step_bytes(engine.nudger))
    return out


# =================================================================================================
# One case: warm up, check the anchors, time interleaved repeats, one instrumented run each
# =================================================================================================
@dataclasses.dataclass(frozen=True)
class Case:
    mode: str
    granularity: str
    speculate: int
    batch: int
    prompt_len: int
    new_tokens: int

    @property
    def label(self) -> str:
        kind = self.mode if self.mode != "nudging" else f"nudging-{self.granularity}"
        return f"{kind}{f'-K{self.speculate}' if self.speculate else ''}-b{self.batch}"


def case_runners(models: Models, cfg: NudgeConfig, base_prompts, nudger_prompts, anchors: bool) -> list:
    """nudgefast's runner, then (at batch 1, when asked) the anchors that do the same work."""
    from .decode import build_sides, resolve_stop_ids, word_start_table

    runners = [NudgefastRunner(models, cfg, base_prompts, nudger_prompts)]
    if anchors and len(base_prompts) == 1 and not runners[0].crossvocab:  # no transformers anchor across vocabularies
        sides = build_sides(models.engine, base_prompts, nudger_prompts, cfg)
        stop_ids = resolve_stop_ids(models.engine, cfg, sides)
        word_start = word_start_table(models.engine, sides, cfg)
        runners += [AnchorRunner(n, models, cfg, base_prompts, nudger_prompts, stop_ids, word_start)
                    for n in anchors_for(cfg)]
    return runners


def run_case(models: Models, case: Case, args, bandwidth: float | None, log) -> list[dict]:
    engine = models.engine
    cfg = NudgeConfig(mode=case.mode, gate=args.gate, threshold=args.threshold, granularity=case.granularity,
                      speculate=case.speculate, max_new_tokens=case.new_tokens,
                      stop_token_ids=None if args.stop_at_eos else [])
    base_prompts, nudger_prompts = make_prompts(models, case.batch, case.prompt_len, args.seed)
    try:
        runners = case_runners(models, cfg, base_prompts, nudger_prompts, anchors=args.anchors)
    except ValueError as e:
        log(f"  skipped: {e}")
        return []
    records = {r.name: [] for r in runners}
    warm = {}
    for r in runners:
        for _ in range(max(1, args.warmup)):
            warm[r.name] = r.run()
    checks = {r.name: compare_outputs(warm["nudgefast"], warm[r.name]) for r in runners[1:]}
    for name, chk in checks.items():
        verdict = "equal" if chk["equal"] else f"DIFFERENT (first divergence at token {chk['first_divergence']})"
        log(f"  anchor check {name}: {verdict}")
    for _ in range(args.repeats):
        for r in runners:  # interleaved: a noisy neighbour slows every runner alike
            records[r.name].append(r.run())
    # CUDA: one more run per runner in sync-debug mode, to count host synchronizations (the CPU
    # counts come from the code: the engine's flag reads, the anchors' reads)
    cuda = engine.device.type == "cuda"
    syncs = {r.name: r.run(count_syncs=True).host_reads if cuda else None for r in runners}
    out = []
    for r in runners:
        out.append(summarize(r.name, case, cfg, records[r.name], syncs[r.name], checks.get(r.name),
                             engine, bandwidth, args))
    ours = out[0]
    for entry in out[1:]:
        paired = [a.tokens / a.seconds / (b.tokens / b.seconds)
                  for a, b in zip(records["nudgefast"], records[entry["engine"]])]
        entry["comparison"] = {
            "ours": "nudgefast", "equal_work": entry["anchor_check"]["equal"],
            "speedup_ratio_of_medians": ours["tokens_per_s_aggregate"] / entry["tokens_per_s_aggregate"],
            "speedup_median_of_paired": statistics.median(paired),
            "speedup_cpu_time": (ours["tokens_per_cpu_s"] / entry["tokens_per_cpu_s"]
                                 if ours["tokens_per_cpu_s"] else None)}
    return out


def summarize(name: str, case: Case, cfg: NudgeConfig, runs: list[RunRecord], cuda_syncs: float | None, check,
              engine, bandwidth, args) -> dict:
    """One scenario entry: medians over the timed runs; latency percentiles over the pooled samples
    of every timed run."""
    secs = [r.seconds for r in runs]
    rates = [r.tokens / r.seconds for r in runs]
    med_rate = statistics.median(rates)
    last = runs[-1]
    flags = [f for row in last.from_nudger for f in row]
    latencies = [x for r in runs for x in (r.latencies or [])]
    ttfts = [r.ttft for r in runs if r.ttft is not None]
    host_syncs = cuda_syncs if cuda_syncs is not None else last.host_reads
    entry = {
        "name": f"{name}:{case.label}", "engine": name, "case": case.label, "mode": case.mode,
        "granularity": case.granularity if case.mode == "nudging" else None, "speculate": case.speculate,
        "batch": case.batch, "prompt_len": case.prompt_len, "new_tokens": case.new_tokens, "dtype": args.dtype,
        "gate": cfg.gate, "threshold": cfg.threshold, "stop_at_eos": bool(args.stop_at_eos),
        "warmup": args.warmup, "repeats": len(runs), "seconds": secs, "seconds_median": statistics.median(secs),
        "tokens": [r.tokens for r in runs],
        "tokens_per_s_aggregate": med_rate, "tokens_per_s_per_seq": med_rate / case.batch,
        # CPU devices: tokens per second of process CPU time (all threads; compare at equal --threads),
        # robust to other jobs taking turns on the cores
        "cpu_seconds": [r.cpu_seconds for r in runs] if engine.device.type == "cpu" else None,
        "tokens_per_cpu_s": (statistics.median(r.tokens / r.cpu_seconds for r in runs)
                             if engine.device.type == "cpu" else None),
        "ms_per_token": {k: (v * 1e3 if isinstance(v, float) else v) for k, v in percentiles(latencies).items()},
        "latency_source": last.latency_source,
        "ttft_ms": statistics.median(ttfts) * 1e3 if ttfts else None,
        "host_syncs_per_token": host_syncs,
        "host_syncs_source": ("counted: torch.cuda sync-debug warnings over the whole call (one extra run)"
                              if cuda_syncs is not None else
                              ("not counted: the cross-vocabulary path reads the candidates on the host every step"
                               if name == "nudgefast" and host_syncs is None else
                               "counted: engine reads of the all-finished flag" if name == "nudgefast" else
                               ("counted: host reads in the anchor loop" if host_syncs is not None else
                                "not countable on the CPU (inside transformers generate; >= 1 per token)"))),
        "nudged_fraction": sum(flags) / len(flags) if flags else 0.0,
        "acceptance": acceptance(last) if case.speculate and name == "nudgefast" else None,
        "anchor_check": check,
        "_latencies_ms": [x * 1e3 for x in latencies],  # for the plot; not written to the JSON
    }
    if name == "nudgefast":
        entry["backend"] = engine.backend.kind
        entry["flag_reads"] = (last.stats[0] or {}).get("flag_reads")
    context = case.prompt_len + case.new_tokens / 2
    bps = bytes_per_step(engine, cfg, case.batch, context)
    entry["bytes_per_step"] = bps
    if bandwidth:
        bound = bandwidth * 1e9 / bps["bytes"] * case.batch
        # the decode phase of each run: after its first token (prefill excluded)
        decode_rate = statistics.median((r.tokens - case.batch) / (r.seconds - (r.ttft or 0.0)) for r in runs)
        entry.update({"bandwidth_bound_tokens_per_s": bound, "decode_tokens_per_s": decode_rate,
                      "fraction_of_bound": decode_rate / bound})
    return entry


def acceptance(rec: RunRecord) -> dict:
    st = rec.stats or []
    tot = {k: sum(s.get(k, 0) or 0 for s in st) for k in ("rounds", "drafted", "accepted", "emitted_in_rounds")}
    return {"rounds": tot["rounds"], "drafted": tot["drafted"], "accepted": tot["accepted"],
            "acceptance_rate": tot["accepted"] / tot["drafted"] if tot["drafted"] else None,
            "accepted_per_round": tot["accepted"] / tot["rounds"] if tot["rounds"] else None,
            "tokens_per_round": tot["emitted_in_rounds"] / tot["rounds"] if tot["rounds"] else None}


# =================================================================================================
# Environment, output
# =================================================================================================
def git_info() -> dict:
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *a], capture_output=True, text=True, check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain").strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def device_info(device) -> dict:
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"type": device.type, "torch": torch.__version__, "triton": triton_version,
            "torch_threads": torch.get_num_threads(), "env": {k: os.environ.get(k) for k in ENV_KEYS},
            "host": platform.node()}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        info.update(name=f"{name} ({os.cpu_count()} logical CPUs)")
    return info


def format_table(scenarios: list[dict]) -> str:
    head = ["engine", "case", "tok/s", "tok/s/seq", "p50 ms", "p90 ms", "p99 ms", "TTFT ms", "syncs/tok",
            "nudged", "accept", "bound", "check", "speedup", "(cpu time)"]
    rows = [head]

    def f(v, spec="{:.1f}"):
        return "-" if v is None else spec.format(v)
    for s in scenarios:
        acc = (s.get("acceptance") or {}).get("acceptance_rate")
        chk = s.get("anchor_check")
        cmp_ = s.get("comparison")
        rows.append([s["engine"], s["case"], f(s["tokens_per_s_aggregate"]), f(s["tokens_per_s_per_seq"]),
                     f(s["ms_per_token"]["p50"], "{:.2f}"), f(s["ms_per_token"]["p90"], "{:.2f}"),
                     f(s["ms_per_token"]["p99"], "{:.2f}"), f(s["ttft_ms"]), f(s["host_syncs_per_token"], "{:.3f}"),
                     f(s["nudged_fraction"], "{:.0%}"), f(acc, "{:.0%}"), f(s.get("fraction_of_bound"), "{:.0%}"),
                     "-" if chk is None else ("equal" if chk["equal"] else "DIFF"),
                     "-" if cmp_ is None else f"{cmp_['speedup_ratio_of_medians']:.2f}x",
                     "-" if not (cmp_ or {}).get("speedup_cpu_time") else f"{cmp_['speedup_cpu_time']:.2f}x"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def write_plot(result: dict, path: Path) -> bool:
    """tokens/s against batch size, and a histogram of per-token latency at batch 1. False when
    matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {}
    for s in result["scenarios"]:
        key = s["name"].rsplit("-b", 1)[0]
        series.setdefault(key, []).append((s["batch"], s["tokens_per_s_aggregate"]))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("tokens/s (aggregate)")
    ax1.set_xscale("log", base=2)
    ax1.legend(fontsize=7)
    for s in result["scenarios"]:
        if s["batch"] == 1 and s.get("_latencies_ms"):
            ax2.hist(s["_latencies_ms"], bins=40, histtype="step", label=s["name"])
    ax2.set_xlabel("ms per token (batch 1)")
    ax2.set_ylabel("tokens")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{result['device']['name']} - {result['models']['source']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# =================================================================================================
# CLI
# =================================================================================================
def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="nudgefast bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("models (one of)")
    src.add_argument("--suite", choices=sorted(SUITES), help="a named scenario set (sets the options below)")
    src.add_argument("--preset", help=f"random planted weights at real shapes: {', '.join(sorted(PRESETS))}")
    src.add_argument("--base", help="base model directory")
    src.add_argument("--nudger", help="nudger model directory")
    src.add_argument("--packaged", help="a packaged model used as both base (plain prompt) and nudger (chat prompt)")
    src.add_argument("--demo-pair", action="store_true", help="the offline cross-family pair: gemma-3-270m base, "
                     "SmolLM2-135M-Instruct nudger (nudging runs on text: word granularity, no speculation)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--mode", type=_csv(str), default=None, help="comma list of base_only, nudger_only, nudging")
    p.add_argument("--granularity", type=_csv(str), default=["word"], help="comma list of token, word")
    p.add_argument("--speculate", type=_csv(int), default=[0], help="comma list of K (0 = none); nudging only")
    p.add_argument("--batch", type=_csv(int), default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--gate", default="top_prob", choices=["top_prob", "entropy"])
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (default: always new-tokens tokens)")
    p.add_argument("--anchors", action="store_true", default=None, help="run the transformers anchors at batch 1")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--native", choices=["auto", "on", "off"], default="auto", help="the C++ CPU ops")
    p.add_argument("--weights", choices=["dense", "gguf"], default="dense",
                   help="gguf: CPU linears read the quantized blocks of the models' GGUF files (the anchors "
                        "always run transformers on the dense float32 conversion)")
    p.add_argument("--flag-interval", type=int, default=16)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the copy-bandwidth measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    suite = SUITES.get(args.suite, {})
    for key in ("preset", "packaged", "device", "dtype", "batch", "prompt_len", "new_tokens", "anchors"):
        if getattr(args, key) is None and key in suite:
            setattr(args, key, suite[key])
    args.device = args.device or "cpu"
    args.batch = args.batch or [1]
    args.prompt_len = args.prompt_len or 128
    args.new_tokens = args.new_tokens or 128
    args.anchors = bool(args.anchors)
    sources = [bool(args.preset), bool(args.base or args.nudger), bool(args.packaged), args.demo_pair]
    if sum(sources) != 1:
        p.error("give exactly one model source: --suite, --preset, --base/--nudger, --packaged or --demo-pair")
    if args.preset and args.preset not in PRESETS:
        p.error(f"unknown preset {args.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    if args.suite:
        args.cases = [Case(m, g, k, b, args.prompt_len, args.new_tokens)
                      for b in args.batch for (m, g, k) in suite["cases"]]
    else:
        modes = args.mode or ["base_only", "nudging"]
        bad = [m for m in modes if m not in ("base_only", "nudger_only", "nudging")]
        if bad:
            p.error(f"unknown mode(s) {bad}")
        if any(g not in ("token", "word") for g in args.granularity):
            p.error(f"granularity must be token or word, got {args.granularity}")
        cases = []
        for b in args.batch:
            for m in modes:
                combos = [(g, k) for g in args.granularity for k in args.speculate] if m == "nudging" else [("word", 0)]
                cases += [Case(m, g, k, b, args.prompt_len, args.new_tokens) for g, k in combos]
        args.cases = list(dict.fromkeys(cases))
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.weights == "gguf" and args.preset:
        p.error("--weights gguf needs models converted from GGUF files, not a random-weight preset")
    return args


def build_models(args) -> Models:
    dtype = DTYPES[args.dtype] if args.dtype else None
    # per row: prompt, output, speculation slack and (real tokenizers: the cross-vocabulary path may
    # run) re-tokenization slack
    def slack(c):
        return max(c.speculate + 2, 16) if args.preset else max(c.speculate + 2, 16, c.new_tokens // 2)
    need = max(c.batch * (c.prompt_len + c.new_tokens + slack(c)) for c in args.cases)
    kw = dict(native={"auto": None, "on": True, "off": False}[args.native], flag_interval=args.flag_interval,
              cuda_graphs=not args.no_cuda_graphs)
    kv_tokens = need + 128 * max(c.batch for c in args.cases)  # page rounding, chat-template overhead
    if args.preset:
        return preset_models(args.preset, args.device, dtype or torch.bfloat16, kv_tokens, args.seed, **kw)
    kw["weights"] = args.weights
    if args.packaged:
        from .packaged import packaged_model_dir

        d = packaged_model_dir(args.packaged)
        models = dir_models(d, d, args.device, dtype, kv_tokens, **kw)
        models.description["note"] = (f"{args.packaged} serves as both base (plain-text prompt) and nudger (chat "
                                      "prompt): a shared-vocabulary pair from one offline model")
        return models
    if args.demo_pair:
        from .packaged import demo_pair

        base_dir, nudger_dir = demo_pair()
        models = dir_models(base_dir, nudger_dir, args.device, dtype, kv_tokens, **kw)
        models.description["note"] = "cross-family pair: gemma-3-270m base, SmolLM2-135M-Instruct nudger"
        return models
    return dir_models(args.base, args.nudger, args.device, dtype, kv_tokens, **kw)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `nudgefast bench -- --preset ...` (cli.py hands over everything after "bench")
        argv = argv[1:]
    args = parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, log)
    finally:
        torch.set_num_threads(threads)


def _run(args, argv, log) -> int:
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("nudgefast bench: --device cuda but no CUDA device is available")
    t_start = time.perf_counter()
    git_start = git_info()  # the code that runs is the code at the start
    models = build_models(args)
    args.dtype = args.dtype or str((models.engine.base or models.engine.nudger).model.dtype).replace("torch.", "")
    bandwidth = None if args.no_bandwidth else measure_copy_bandwidth(args.device)
    if bandwidth:
        log(f"copy bandwidth on {args.device}: {bandwidth:.1f} GB/s (read + write)")
    scenarios = []
    for case in args.cases:
        log(f"case {case.label}: prompt {case.prompt_len}, {case.new_tokens} new tokens")
        scenarios += run_case(models, case, args, bandwidth, log)
    result = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ENV_KEYS if k in os.environ)
                   + (" " if any(k in os.environ for k in ENV_KEYS) else "") + "nudgefast bench " + shlex.join(argv),
        "git": git_start, "device": device_info(args.device), "random_weights": models.random_weights,
        "models": models.description, "copy_bandwidth_gbps": bandwidth,
        "bandwidth_note": "device-to-device copy, bytes read + written over time; bounds are bytes read per "
                          "step (weights of the models in play + KV cache at the mean context) over it",
        "wall_seconds": time.perf_counter() - t_start, "scenarios": scenarios,
    }
    git_end = git_info()
    if git_end != git_start:  # someone committed or edited during the run: say so
        result["git_at_end"] = git_end
    print(format_table(scenarios))
    if args.plot:
        written = write_plot(result, Path(args.plot))
        log(f"plot written to {args.plot}" if written else "plot skipped: matplotlib is not installed")
    for s in scenarios:
        for key in [k for k in s if k.startswith("_")]:
            del s[key]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        log(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
