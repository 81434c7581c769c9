"""The public surface (DESIGN.md section 3): NudgingEngine (models loaded, prompts built, generate /
generate_ids as loops over the request-level engine of engine/), with NudgeConfig, Completion and
RequestOutput from params.py."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .config import ConfigError
from .engine.engine import RequestEngine
from .kv_cache import KVPool
from .model import Transformer
from .ops import Backend
from .params import GATES, GRANULARITIES, MAX_SPECULATE, MODES, Completion, NudgeConfig, RequestOutput  # noqa: F401
from .tokenizer import Tokenizer

log = logging.getLogger("nudgefast")


class LoadedModel:
    """One model in the engine: weights, tokenizer (optional for generate_ids) and its page pool."""

    def __init__(self, name: str, model_dir: str | Path, device: torch.device, dtype: torch.dtype | None,
                 backend: Backend, kv_cache_tokens: int | None, page_size: int, weights: str = "dense",
                 tensor_parallel_size: int = 1):
        model_dir = Path(model_dir)
        if tensor_parallel_size > 1:  # rank 0's shard, mirrored on worker processes (parallel/tensor.py)
            from .parallel.tensor import ShardedModel

            if weights != "dense":
                raise ConfigError(f"tensor_parallel_size > 1 needs weights='dense', got {weights!r}")
            model = ShardedModel(model_dir, device, dtype, backend, tensor_parallel_size)
        else:
            model = Transformer.from_dir(model_dir, device, dtype, backend, weights)
        tokenizer = Tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
        self._setup(name, model_dir, model, tokenizer, kv_cache_tokens, page_size)

    @classmethod
    def from_model(cls, name: str, model: Transformer, tokenizer, kv_cache_tokens: int | None = None,
                   page_size: int = 16) -> "LoadedModel":
        """A model built in memory (random weights at real shapes, a benchmark's planted model):
        pass the result as NudgingEngine(base=..., nudger=...)."""
        lm = cls.__new__(cls)
        lm._setup(name, Path(f"<in-memory {name}>"), model, tokenizer, kv_cache_tokens, page_size)
        return lm

    def _setup(self, name, model_dir, model, tokenizer, kv_cache_tokens, page_size) -> None:
        self.name, self.dir, self.model, self.spec, self.tokenizer = name, model_dir, model, model.spec, tokenizer
        if self.tokenizer is not None and self.tokenizer.vocab_size > self.spec.vocab_size:
            raise ConfigError(
                f"{name} model {self.dir}: tokenizer.json has {self.tokenizer.vocab_size} tokens but the model "
                f"has only {self.spec.vocab_size} embedding rows: the tokenizer does not belong to this model")
        tokens = kv_cache_tokens or default_kv_tokens(model.device, self.spec, model.dtype)
        # a sharded model keeps only its ranks' KV heads (kv_spec); the spec is the whole model's
        kv_spec = getattr(model, "kv_spec", self.spec)
        self.kv = KVPool(kv_spec, max(1, -(-tokens // page_size)), page_size, model.dtype, model.device)
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


def lazy_schedule(lazy: bool | None, device: torch.device) -> bool:
    """Whether shared-vocabulary nudging (speculate=0) runs the lazy schedule (runner/lazy.py): the
    argument when given, else $NUDGEFAST_LAZY ("0" or "1"), else on for the CPU only (it reads the
    candidates on the host at every forward, which the CUDA loop must not)."""
    if lazy is not None:
        if not isinstance(lazy, bool):
            raise ValueError(f"lazy={lazy!r} must be True, False or None")
        return lazy
    env = os.environ.get("NUDGEFAST_LAZY")
    if env is not None and env not in ("0", "1"):
        raise ValueError(f"NUDGEFAST_LAZY={env!r} must be '0' or '1'")
    if env is not None:
        return env == "1"
    return device.type == "cpu"


class NudgingEngine(RequestEngine):
    """Both models in one process, paged KV caches on the device, requests decoded in one running
    batch (continuous batching: add_request / step / abort, engine/engine.py).

    base, nudger: Hugging Face-layout model directories, or LoadedModel.from_model(...) for models
    built in memory (either may be None when the modes used do not need it). Extra knobs beyond
    DESIGN.md section 3: kv_cache_tokens (pool size per model), page_size, max_running (rows decoded
    together), prefill_budget (prompt tokens prefilled per step), native (force the C++ CPU ops
    on/off), flag_interval (decode steps per round, between two host reads), cuda_graphs, sync_debug
    (CUDA: any host sync inside a round raises; used by the GPU tests), weights ("dense":
    model.safetensors; "gguf": on the CPU, every quantized linear weight is read from the blocks of
    the GGUF file the model was converted from, ~5x fewer bytes per token for a Q4 file, same weight
    values: see blocks.py; "gguf-q8": the same blocks multiplied with activations quantized to int8
    per block in decode, inexact, opt-in); lazy (shared-vocabulary nudging with speculate=0 runs each
    model only where the rule reads its logits, a lagging model catching up in one multi-token
    forward: runner/lazy.py, same tokens; None = on for the CPU, off for CUDA, or $NUDGEFAST_LAZY=0/1).
    """

    def __init__(self, base=None, nudger=None, device="cpu", dtype: torch.dtype | str | None = None, *,
                 kv_cache_tokens: int | None = None, page_size: int = 16, max_running: int = 64,
                 prefill_budget: int | None = None, native: bool | None = None, flag_interval: int = 16,
                 cuda_graphs: bool = True, sync_debug: bool = False, weights: str = "dense",
                 tensor_parallel_size: int = 1, lazy: bool | None = None):
        if base is None and nudger is None:
            raise ValueError("NudgingEngine needs at least one model directory (base or nudger)")
        if isinstance(dtype, str):
            names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
            if dtype not in names:
                raise ValueError(f"dtype={dtype!r}; expected one of {sorted(names)}")
            dtype = names[dtype]
        if type(page_size) is not int or page_size < 1:
            raise ValueError(f"page_size={page_size} must be >= 1")
        if type(flag_interval) is not int or flag_interval < 1:
            raise ValueError(f"flag_interval={flag_interval} must be >= 1")
        if weights not in ("dense", "gguf", "gguf-q8"):
            raise ValueError(f"weights={weights!r}; expected 'dense', 'gguf' or 'gguf-q8'")
        if type(tensor_parallel_size) is not int or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size!r} must be an int >= 1")
        self.device = torch.device(device)
        self.backend = Backend.for_device(self.device, native)
        log.info("nudgefast: %s backend on %s", self.backend.kind, self.device)
        self.page_size = page_size
        self.flag_interval = flag_interval
        # the sharded forward talks to its workers through a host pipe, which a graph cannot replay
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and tensor_parallel_size == 1
        self.tensor_parallel_size = tensor_parallel_size
        self.sync_debug = sync_debug  # tests: raise on any host sync inside a decode round (CUDA)
        self.lazy = lazy_schedule(lazy, self.device)
        self.weights = weights
        if weights in ("gguf", "gguf-q8") and self.backend.kind == "torch":
            log.warning("nudgefast: weights='gguf' without the native ops dequantizes every weight at every step "
                        "(correct but slow): build the extension (pip install --no-build-isolation -e .) or use "
                        "weights='dense'")

        def load(name, d):
            if d is None or isinstance(d, LoadedModel):
                return d
            # only the base is sharded: the nudger is small and runs whole on rank 0
            tp = tensor_parallel_size if name == "base" else 1
            return LoadedModel(name, d, self.device, dtype, self.backend, kv_cache_tokens, page_size, weights, tp)

        if tensor_parallel_size > 1 and (base is None or isinstance(base, LoadedModel)):
            raise ValueError("tensor_parallel_size > 1 shards the base model: pass the base as a model directory")

        self.base = load("base", base)
        self.nudger = load("nudger", nudger)
        toks = (self.base and self.base.tokenizer, self.nudger and self.nudger.tokenizer)
        # different tokenizers (another model family): nudging shares the continuation as text
        self.cross_vocabulary = None not in toks and not toks[0].same_vocabulary(toks[1])
        if prefill_budget is None:
            prefill_budget = 8192 if self.device.type == "cuda" else 2048
        self._init_requests(max_running, prefill_budget)

    def close(self) -> None:
        """Release what outlives the engine object: the tensor-parallel workers (idempotent)."""
        for lm in (self.base, self.nudger):
            if lm is not None and hasattr(lm.model, "close"):
                lm.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- token-level API -------------------------------------------------------------------
    def generate_ids(self, base_prompts: list[list[int]] | None = None, nudger_prompts: list[list[int]] | None = None,
                     config: NudgeConfig | None = None) -> list[Completion]:
        """Prompts exactly as given (no BOS, no template). base_only needs base_prompts,
        nudger_only needs nudger_prompts, nudging needs both (row i of each belongs together).
        Each row is one request in the running batch; row i samples with the seed of row i."""
        config = NudgeConfig() if config is None else config
        if not isinstance(config, NudgeConfig):
            raise TypeError(f"config must be a NudgeConfig, got {type(config).__name__}")
        need = {"nudging": ("base", "nudger"), "base_only": ("base",), "nudger_only": ("nudger",)}[config.mode]
        given = {"base": base_prompts, "nudger": nudger_prompts}
        for name in need:
            p = given[name]
            if not isinstance(p, (list, tuple)) or not p:
                raise ValueError(f"{name}_prompts must be a non-empty list of token-id lists")
        rows = len(given[need[0]])
        if len(need) == 2 and len(given["nudger"]) != rows:
            raise ValueError(f"base_prompts has {rows} rows but nudger_prompts has {len(given['nudger'])}: "
                             "row i of each must belong together")
        return self._run_rows([dict(base_ids=given["base"][i] if "base" in need else None,
                                    nudger_ids=given["nudger"][i] if "nudger" in need else None)
                               for i in range(rows)], config)

    def _run_rows(self, rows: list[dict], config: NudgeConfig) -> list[Completion]:
        """Validate every row first (a bad row changes nothing), then run them all as requests."""
        reqs = [self._build_request(None, kw["base_ids"], kw["nudger_ids"], config, "", "", None, i)
                for i, kw in enumerate(rows)]
        for req in reqs:
            self.requests[req.id] = req
            self.scheduler.add(req)
        return self._run_to_completion([r.id for r in reqs])

    # ---- text API --------------------------------------------------------------------------
    def generate(self, prompts: list[str] | str, config: NudgeConfig | None = None, system_prompt: str = "",
                 answer_prefix: str = "") -> list[Completion]:
        from .prompts import build_prompts

        config = NudgeConfig() if config is None else config
        if not isinstance(config, NudgeConfig):
            raise TypeError(f"config must be a NudgeConfig, got {type(config).__name__}")
        if isinstance(prompts, str):
            prompts = [prompts]
        base_prompts, nudger_prompts = build_prompts(self, prompts, config, system_prompt, answer_prefix)
        return self._run_rows([dict(base_ids=base_prompts[i] if base_prompts else None,
                                    nudger_ids=nudger_prompts[i] if nudger_prompts else None)
                               for i in range(len(prompts))], config)
