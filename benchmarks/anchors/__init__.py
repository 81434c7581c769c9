"""The anchors nudgefast is measured against: what people run today with Hugging Face transformers.

Written from their public descriptions (DESIGN.md, issue 6), not copied from any project:

- hf_generate: `model.generate`, greedy, one model (the base-only baseline most users run).
- hf_nudging.nudging_loop_chunked: the nudging loop of the public notebook. Both models keep a
  KV cache; the nudger drafts a chunk (up to its next word start), the base model verifies the chunk
  in one forward, and once the base model takes over it decodes token by token with one host read
  (`.item()`-style) per token while the nudger is stepped every token to stay in sync.
- hf_nudging.nudging_loop_token: the same loop at token granularity (both models stepped every token).
- llamacpp.llamacpp_generate: llama.cpp (llama-cpp-python, an optional extra) on the same GGUF file,
  greedy, one model; nudgefast bench adds it to CPU base-only / nudger-only cases when installed.

Every anchor is greedy, batch 1, and returns an AnchorResult: the tokens with their provenance, the
finish reason, how many host reads the loop made (counted in the code, None where the library does
them internally) and a timestamp per emitted token. nudgefast/bench/ checks each anchor's tokens
against nudgefast's for the same configuration before timing it.
"""
from .common import AnchorResult
from .hf_generate import hf_generate
from .hf_nudging import nudging_loop_chunked, nudging_loop_token
from . import llamacpp  # noqa: E402 (imports llama_cpp only when it runs)

ANCHORS = {
    "hf_generate": hf_generate,
    "hf_nudging_chunked": nudging_loop_chunked,
    "hf_nudging_token": nudging_loop_token,
}

__all__ = ["AnchorResult", "ANCHORS", "hf_generate", "llamacpp", "nudging_loop_chunked", "nudging_loop_token"]
