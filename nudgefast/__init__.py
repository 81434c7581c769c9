"""nudgefast: nudging (a base model written over by a small aligned model where it is unsure),
decoded fast: paged KV caches, fused gate kernels, CUDA graphs, speculation, continuous batching."""
from .api import NudgingEngine
from .config import ConfigError
from .engine.async_engine import AsyncNudgingEngine
from .kv_cache import KVPoolExhausted, RequestTooLarge
from .params import Completion, NudgeConfig, RequestOutput

__all__ = ["NudgingEngine", "AsyncNudgingEngine", "NudgeConfig", "Completion", "RequestOutput", "ConfigError",
           "KVPoolExhausted", "RequestTooLarge", "convert_gguf"]
__version__ = "0.1.0"


def convert_gguf(gguf_path, out_dir, **kwargs):
    """GGUF file -> Hugging Face-layout model directory (see nudgefast/gguf.py)."""
    from .gguf import convert_gguf as _convert

    return _convert(gguf_path, out_dir, **kwargs)
