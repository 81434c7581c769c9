"""Anchor: llama.cpp (through llama-cpp-python) decoding the same GGUF file, greedy, batch 1.

On a CPU, llama.cpp is what people run GGUF models with. This anchor gives it what nudgefast gets:
the GGUF file the nudgefast model directory was converted from, the same thread count, the same
prompt token ids (fed as ids: no BOS or template is added) and greedy decoding (the argmax of the
logits after each token, read in place from llama.cpp's output buffer). llama.cpp multiplies quantized
weights by activations quantized to 8 bits, so its tokens may part from nudgefast's exact float32
arithmetic after a while: nudgefast/bench/ reports where.

llama-cpp-python is an optional extra (`pip install -e .[llamacpp]`; it builds llama.cpp from
source); nothing in the test suite needs it. `available()` says whether it is installed.
"""
from __future__ import annotations

import importlib.util
import os
import time

from .common import AnchorResult, check_config, check_prompt

_MODELS: dict = {}  # (path, threads, n_ctx) -> llama_cpp.Llama, loaded once per process


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def load(gguf_path, threads: int, n_ctx: int):
    """A llama_cpp.Llama over `gguf_path` with `threads` threads for prefill and decode (cached)."""
    key = (str(gguf_path), threads, n_ctx)
    if key not in _MODELS:
        if not available():
            raise ImportError("the llama.cpp anchor needs llama-cpp-python (pip install -e .[llamacpp])")
        import llama_cpp

        kw = dict(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                  logits_all=False, verbose=False)
        if os.environ.get("NUDGEFAST_LLAMACPP_EXTRA_BUFTS") == "0":
            # llama.cpp's extra weight buffers (AMX, repacked layouts) off: a build with AMX kernels
            # crashes on CPUs or VMs that report AMX without granting it; scripts/install_llamacpp.sh
            # builds without AMX instead, which keeps the repacked layouts
            import llama_cpp.llama_cpp as low

            default = low.llama_model_default_params

            def without_extra_bufts():
                params = default()
                params.use_extra_bufts = False
                return params
            low.llama_model_default_params = without_extra_bufts
            try:
                _MODELS[key] = llama_cpp.Llama(**kw)
            finally:
                low.llama_model_default_params = default
        else:
            _MODELS[key] = llama_cpp.Llama(**kw)
    return _MODELS[key]


def llamacpp_generate(gguf_path, prompt: list[int], config, stop_ids: set[int], *, threads: int,
                      from_nudger: bool = False) -> AnchorResult:
    """Greedy decoding of `config.max_new_tokens` tokens after `prompt` by llama.cpp, stopping at
    `stop_ids` (dropped from the result, as nudgefast drops them). The first token is timed after
    the prompt's prefill; one llama_decode call per later token."""
    import numpy as np

    check_config(config)
    prompt = check_prompt("prompt", prompt)
    llm = load(gguf_path, threads, n_ctx=len(prompt) + config.max_new_tokens + 64)
    n_vocab = llm.n_vocab()
    if max(prompt) >= n_vocab:
        raise ValueError(f"prompt token id {max(prompt)} is outside the GGUF vocabulary ({n_vocab})")
    result = AnchorResult(host_reads=None)  # llama.cpp copies the logits to the host every token
    result.start = time.perf_counter()
    llm.reset()  # the next eval drops the KV cache from position 0
    llm.eval(prompt)
    while len(result.token_ids) < config.max_new_tokens:
        token = int(np.argmax(last_logits(llm, n_vocab)))
        if token in stop_ids:
            result.finish_reason = "stop"
            break
        result.emit(token, from_nudger)
        if len(result.token_ids) < config.max_new_tokens:
            llm.eval([token])
    return result


def last_logits(llm, n_vocab: int):
    """The logits after the last evaluated token, read in place from llama.cpp's output buffer (the
    Llama object keeps no copy unless every position's logits are kept, logits_all=True)."""
    import llama_cpp
    import numpy as np

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))


def agreement(ours: list[int], theirs: list[int]) -> dict:
    """How far two greedy token streams agree: the common prefix, and the share of equal positions."""
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    n = max(len(ours), len(theirs), 1)
    return {"common_prefix": first, "equal_positions": sum(a == b for a, b in zip(ours, theirs)) / n,
            "tokens": max(len(ours), len(theirs))}
