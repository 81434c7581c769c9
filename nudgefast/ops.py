"""Which implementation runs each hot op: Triton on CUDA, the native CPU ops when built, else the
plain-torch references. Chosen once per engine (a Backend), not per call through globals.
"""
from __future__ import annotations

import logging
import os
import torch
import torch.nn.functional as F

from .kv_cache import AttentionMetadata

log = logging.getLogger("nudgefast")


def native_ops_available() -> bool:
    try:
        from . import _C  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.ops, "nudgefast") and hasattr(torch.ops.nudgefast, "paged_attention")


class Backend:
    """kind: "triton" (CUDA), "native" (C++ CPU ops from csrc/) or "torch" (the references).
    The functions are resolved once here, so the per-layer calls cost no lookups."""

    def __init__(self, kind: str):
        if kind not in ("triton", "native", "torch"):
            raise ValueError(f"unknown backend {kind!r}")
        self.kind = kind
        # RoPE inside the KV store (store_kv_rope, one call per layer, rope tables built once): the
        # GPU path, and the native CPU ops for float32 models (rope_in_store); the torch references
        # keep the model's torch rotation. The fused norm and activation launches are GPU-only.
        self.fused_rope = kind == "triton"
        self.rope_in_store = kind in ("triton", "native")
        if kind == "native":
            ops = torch.ops.nudgefast
            self.store_kv_rope = ops.store_kv_rope  # float32 (Transformer uses it for float32 only)
            self._decode_cu: dict[int, torch.Tensor] = {}
            self._store = ops.store_kv
            self._native_attention = ops.paged_attention
            self._block_linear = ops.block_linear
            self._block_linear_q8 = ops.block_linear_q8
            self._rms_norm = ops.rms_norm
        elif kind == "triton":
            from .kernels.kv_store import store_kv, store_kv_rope
            self.store_kv_rope = store_kv_rope
            from .kernels.paged_decode_attention import paged_decode_attention
            from .kernels.paged_prefill_attention import paged_prefill_attention
            self._store, self._decode, self._prefill = store_kv, paged_decode_attention, paged_prefill_attention
        else:
            from .kernels.kv_store import store_kv_ref
            from .kernels.paged_decode_attention import paged_decode_attention_ref
            from .kernels.paged_prefill_attention import paged_prefill_attention_ref
            self._store, self._decode, self._prefill = store_kv_ref, paged_decode_attention_ref, paged_prefill_attention_ref

    def __repr__(self) -> str:
        return f"Backend({self.kind!r})"

    @staticmethod
    def for_device(device: torch.device, native: bool | None = None) -> "Backend":
        if device.type == "cuda":
            return Backend("triton")
        if native is None and os.environ.get("NUDGEFAST_NATIVE") in ("0", "1"):
            native = os.environ["NUDGEFAST_NATIVE"] == "1"  # tests force the CPU path both ways
        if native is None:
            native = native_ops_available()
        elif native and not native_ops_available():
            raise RuntimeError("native CPU ops were requested but nudgefast._C is not built "
                               "(reinstall with `pip install --no-build-isolation -e .`)")
        return Backend("native" if native else "torch")

    def block_linear(self, x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] @ W.T for a BlockWeight W (blocks.py): the native op, or its reference (the
        8-bit-activation ones where W.act8, weights="gguf-q8")."""
        if self.kind == "triton":
            raise ValueError("GGUF block weights run on the CPU only")
        if self.kind == "torch":
            from .blocks import block_linear_q8_ref, block_linear_ref
            return (block_linear_q8_ref if w.act8 else block_linear_ref)(x, w, bias)
        op = self._block_linear_q8 if w.act8 else self._block_linear
        y = op(x.reshape(-1, x.shape[-1]), w.codes, w.kernel_scale, w.kernel_offset, w.bits, w.block)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y if bias is None else y + bias

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
        """F.rms_norm over the last dimension; the native op for float32 on the CPU (one call instead
        of torch's six small ops, whose overhead dominates at decode)."""
        if self.kind == "native" and x.dtype == torch.float32 and (w is None or w.dtype == torch.float32):
            return self._rms_norm(x, w, eps)
        return F.rms_norm(x, (x.shape[-1],), w, eps)

    def store_kv(self, k, v, k_pages, v_pages, slot_mapping) -> None:
        self._store(k, v, k_pages, v_pages, slot_mapping)

    def attention(self, q, k_pages, v_pages, meta: AttentionMetadata, scale: float, window: int,
                  softcap: float) -> torch.Tensor:
        if self.kind == "native":
            cu = meta.cu_q_lens
            if cu is None:  # decode: one query per row; the same read-only offsets for every layer
                cu = self._decode_cu.get(q.shape[0])
                if cu is None:
                    cu = self._decode_cu[q.shape[0]] = torch.arange(q.shape[0] + 1, dtype=torch.int32)
            return self._native_attention(q, k_pages, v_pages, meta.block_tables, meta.seq_lens, cu,
                                          scale, window, softcap)
        if meta.is_decode:
            return self._decode(q, k_pages, v_pages, meta.block_tables, meta.seq_lens, scale, window, softcap)
        if self.kind == "triton":
            return self._prefill(q, k_pages, v_pages, meta.block_tables, meta.seq_lens, meta.cu_q_lens,
                                 scale, window, softcap, max_q_len=meta.max_q_len)
        return self._prefill(q, k_pages, v_pages, meta.block_tables, meta.seq_lens, meta.cu_q_lens,
                             scale, window, softcap)
