"""The public surface (DESIGN.md section 3): NudgingEngine, NudgeConfig, Completion."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError
from .kv_cache import KVPool
from .model import Transformer
from .ops import Backend
from .tokenizer import Tokenizer

log = logging.getLogger("nudgefast")

MODES = ("nudging", "base_only", "nudger_only")
GATES = ("top_prob", "entropy")
GRANULARITIES = ("token", "word")
MAX_SPECULATE = 16


@dataclass(frozen=True)
class NudgeConfig:
    mode: str = "nudging"
    gate: str = "top_prob"
    threshold: float = 0.4
    granularity: str = "word"
    speculate: int = 0
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"NudgeConfig: {msg}")
        if self.mode not in MODES:
            bad(f"mode={self.mode!r}; expected one of {MODES}")
        if self.gate not in GATES:
            bad(f"gate={self.gate!r}; expected one of {GATES}")
        if self.granularity not in GRANULARITIES:
            bad(f"granularity={self.granularity!r}; expected one of {GRANULARITIES}")
        if self.gate == "top_prob" and not 0.0 <= self.threshold <= 1.0:
            bad(f"threshold={self.threshold} must be in [0, 1] for gate='top_prob'")
        if self.gate == "entropy" and not self.threshold >= 0.0:
            bad(f"threshold={self.threshold} must be >= 0 (nats) for gate='entropy'")
        if not isinstance(self.speculate, int) or not 0 <= self.speculate <= MAX_SPECULATE:
            bad(f"speculate={self.speculate!r} must be an int in [0, {MAX_SPECULATE}]")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens={self.max_new_tokens!r} must be an int >= 1")
        if not self.temperature >= 0.0:
            bad(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p={self.top_p} must be in (0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed={self.seed!r} must be an int or None")
        if self.stop_token_ids is not None and not all(isinstance(i, int) and i >= 0 for i in self.stop_token_ids):
            bad(f"stop_token_ids={self.stop_token_ids!r} must be a list of non-negative ints")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    from_nudger: list[bool]
    finish_reason: str                      # "stop" or "length"
    stats: dict = field(default_factory=dict)

    @property
    def nudged_fraction(self) -> float:
        return sum(self.from_nudger) / len(self.from_nudger) if self.from_nudger else 0.0


class LoadedModel:
    """One model in the engine: weights, tokenizer (optional for generate_ids) and its page pool."""

    def __init__(self, name: str, model_dir: str | Path, device: torch.device, dtype: torch.dtype | None,
                 backend: Backend, kv_cache_tokens: int | None, page_size: int, weights: str = "dense"):
        self.name = name
        self.dir = Path(model_dir)
        self.model = Transformer.from_dir(self.dir, device, dtype, backend, weights)
        self.spec = self.model.spec
        self.tokenizer = Tokenizer(self.dir) if (self.dir / "tokenizer.json").is_file() else None
        if self.tokenizer is not None and self.tokenizer.vocab_size > self.spec.vocab_size:
            raise ConfigError(
                f"{name} model {self.dir}: tokenizer.json has {self.tokenizer.vocab_size} tokens but the model "
                f"has only {self.spec.vocab_size} embedding rows: the tokenizer does not belong to this model")
        tokens = kv_cache_tokens or default_kv_tokens(device, self.spec, self.model.dtype)
        self.kv = KVPool(self.spec, max(1, -(-tokens // page_size)), page_size, self.model.dtype, device)
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        ids = list(self.spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token:
            t = self.tokenizer.tok.token_to_id(self.tokenizer.eos_token)
            if t is not None and not ids:
                ids.append(t)
        return ids


def default_kv_tokens(device: torch.device, spec, dtype: torch.dtype) -> int:
    if device.type != "cuda":
        return 8192
    per_token = KVPool.bytes_per_token(spec, dtype)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(4096, min(262144, 0.35 * free // per_token)))


class NudgingEngine:
    """Both models in one process, paged KV caches on the device, decoding in one of three modes.

    base, nudger: Hugging Face-layout model directories (either may be None when the modes used do
    not need it). Extra knobs beyond DESIGN.md section 3: kv_cache_tokens (pool size per model),
    page_size, native (force the C++ CPU ops on/off), flag_interval (how many steps between reads
    of the all-finished flag), cuda_graphs, sync_debug (CUDA: any host sync between two flag reads
    raises; used by the GPU tests), weights ("dense": model.safetensors; "gguf": on the CPU, every
    quantized linear weight is read from the blocks of the GGUF file the model was converted from,
    ~5x fewer bytes per token for a Q4 file, same weight values: see blocks.py; "gguf-q8": the same
    blocks multiplied with activations quantized to int8 per block in decode, inexact, opt-in).
    """

    def __init__(self, base: str | Path | None = None, nudger: str | Path | None = None, device="cpu",
                 dtype: torch.dtype | str | None = None, *, kv_cache_tokens: int | None = None,
                 page_size: int = 16, native: bool | None = None, flag_interval: int = 16,
                 cuda_graphs: bool = True, sync_debug: bool = False, weights: str = "dense"):
        if base is None and nudger is None:
            raise ValueError("NudgingEngine needs at least one model directory (base or nudger)")
        if isinstance(dtype, str):
            dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        if page_size < 1:
            raise ValueError(f"page_size={page_size} must be >= 1")
        if flag_interval < 1:
            raise ValueError(f"flag_interval={flag_interval} must be >= 1")
        if weights not in ("dense", "gguf", "gguf-q8"):
            raise ValueError(f"weights={weights!r}; expected 'dense', 'gguf' or 'gguf-q8'")
        self.device = torch.device(device)
        self.backend = Backend.for_device(self.device, native)
        log.info("nudgefast: %s backend on %s", self.backend.kind, self.device)
        self.page_size = page_size
        self.flag_interval = flag_interval
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.sync_debug = sync_debug  # tests: raise on any host sync between two flag reads (CUDA)
        self.weights = weights
        if weights in ("gguf", "gguf-q8") and self.backend.kind == "torch":
            log.warning("nudgefast: weights='gguf' without the native ops dequantizes every weight at every step "
                        "(correct but slow): build the extension (pip install --no-build-isolation -e .) or use "
                        "weights='dense'")
        load = lambda name, d: LoadedModel(name, d, self.device, dtype, self.backend, kv_cache_tokens,  # noqa: E731
                                           page_size, weights)
        self.base = load("base", base) if base else None
        self.nudger = load("nudger", nudger) if nudger else None
        self._graphs = {}  # captured CUDA graphs, see cuda_graphs.py
        self._cross_vocabulary = None

    # ---- token-level API -------------------------------------------------------------------
    def generate_ids(self, base_prompts: list[list[int]] | None = None, nudger_prompts: list[list[int]] | None = None,
                     config: NudgeConfig | None = None) -> list[Completion]:
        """Prompts exactly as given (no BOS, no template). base_only needs base_prompts,
        nudger_only needs nudger_prompts, nudging needs both (row i of each belongs together)."""
        from .decode import run_generation

        config = config or NudgeConfig()
        if config.mode == "nudging" and self.cross_vocabulary:
            from . import crossvocab

            return crossvocab.generate_ids(self, base_prompts, nudger_prompts, config)
        return run_generation(self, base_prompts, nudger_prompts, config)

    @property
    def cross_vocabulary(self) -> bool:
        """True when both models are loaded and their tokenizers differ (another model family):
        nudging then shares the continuation as text (crossvocab.py). Compared once per engine."""
        if self._cross_vocabulary is None:
            toks = (self.base and self.base.tokenizer, self.nudger and self.nudger.tokenizer)
            self._cross_vocabulary = None not in toks and not toks[0].same_vocabulary(toks[1])
        return self._cross_vocabulary

    # ---- text API --------------------------------------------------------------------------
    def generate(self, prompts: list[str] | str, config: NudgeConfig | None = None, system_prompt: str = "",
                 answer_prefix: str = "") -> list[Completion]:
        from .prompts import build_prompts

        config = config or NudgeConfig()
        if isinstance(prompts, str):
            prompts = [prompts]
        if config.mode == "nudging" and self.cross_vocabulary:
            # Different tokenizers (another model family): the answer is shared as text, word by word.
            from . import crossvocab

            return crossvocab.generate(self, prompts, config, system_prompt, answer_prefix)
        base_prompts, nudger_prompts = build_prompts(self, prompts, config, system_prompt, answer_prefix)
        return self.generate_ids(base_prompts, nudger_prompts, config)
