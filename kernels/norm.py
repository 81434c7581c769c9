"""The residual step of a decoder layer in one launch: optional RMSNorm of the block output, the
residual add, optional RMSNorm of the sum (the next block's input).

    a' = rms_norm(a, w_a)      if w_a is given, else a          (a post-norm: OLMo-2, Gemma)
    h' = h + a'
    x  = rms_norm(h', w_out)   if w_out is given, else h'        (the next pre-norm: Llama, Qwen2, Gemma)
    rms_norm(y, w) = y / sqrt(mean(y^2) + eps) * w

Rounding: a' and h' are rounded to the activation dtype (as the per-op path stores them); each norm is
computed in float32 from the rounded input and rounded once. Weights may be float32 (Gemma's folded
1 + w) or the activation dtype. The per-op torch path (nudgefast.model) can round the weight product
in another place, so the two agree to a rounding of the activation dtype, not bit for bit.

`add_rms_norm` runs the Triton kernel on CUDA tensors (or under TRITON_INTERPRET=1) and the plain-torch
`add_rms_norm_ref` otherwise.
"""
import os

import torch

from nudgefast.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    # rounds to nearest even by the bits (Triton's interpreter rounds fp32 -> bf16 otherwise)
    from nudgefast.kernels.kv_store import _round_f32


def _check(h, a, w_a, w_out):
    for name, t in (("h", h), ("a", a)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"add_rms_norm: {name} must be a 2-D tensor [tokens, hidden], got "
                             f"{type(t).__name__ if not isinstance(t, torch.Tensor) else tuple(t.shape)}")
    if h.shape != a.shape or h.dtype != a.dtype or not h.dtype.is_floating_point:
        raise ValueError(f"add_rms_norm: h {tuple(h.shape)} {h.dtype} and a {tuple(a.shape)} {a.dtype} must "
                         "match in shape and floating dtype")
    for name, w in (("w_a", w_a), ("w_out", w_out)):
        if w is not None and (w.shape != (h.shape[1],) or w.dtype not in (h.dtype, torch.float32)):
            raise ValueError(f"add_rms_norm: {name} must be [{h.shape[1]}] in {h.dtype} or float32, got "
                             f"{tuple(w.shape)} {w.dtype}")
    if len({t.device for t in (h, a, w_a, w_out) if t is not None}) != 1:
        raise ValueError("add_rms_norm: all tensors must be on one device")


def _rms_ref(y, w, eps):
    y = y.float()
    return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * w.float())


def add_rms_norm_ref(h, a, w_a, w_out, eps):
    """(h', x) as defined in the module docstring; x is h' itself when w_out is None."""
    _check(h, a, w_a, w_out)
    if w_a is not None:
        a = _rms_ref(a, w_a, eps).to(a.dtype)
    h = h + a
    return h, (h if w_out is None else _rms_ref(h, w_out, eps).to(h.dtype))


if HAS_TRITON:

    @triton.jit
    def _add_rms_norm_kernel(h_ptr, a_ptr, wa_ptr, wo_ptr, h_out_ptr, x_ptr, n, eps,
                             stride_h, stride_a, stride_ho, stride_x,
                             HAS_WA: tl.constexpr, HAS_WO: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        dt = h_out_ptr.dtype.element_ty
        a = tl.load(a_ptr + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WA:
            rstd = 1.0 / tl.sqrt(tl.sum(a * a, axis=0) / n + eps)
            a = _round_f32(a * rstd * tl.load(wa_ptr + cols, mask=mask, other=0.0).to(tl.float32), dt)
        hf = _round_f32(tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32) + a, dt)
        tl.store(h_out_ptr + row * stride_ho + cols, hf.to(dt), mask=mask)
        if HAS_WO:
            rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / n + eps)
            x = hf * rstd * tl.load(wo_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(x_ptr + row * stride_x + cols, _round_f32(x, dt).to(dt), mask=mask)


def _use_triton(t):
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def add_rms_norm(h, a, w_a, w_out, eps):
    """One launch for the residual step (module docstring). h, a: [T, hidden] (unit stride along
    hidden); returns new tensors (h', x), x being h' itself when w_out is None."""
    if not _use_triton(h):
        return add_rms_norm_ref(h, a, w_a, w_out, eps)
    _check(h, a, w_a, w_out)
    if h.stride(1) != 1 or a.stride(1) != 1:
        raise ValueError("add_rms_norm: h and a must have unit stride along hidden")
    n_rows, n = h.shape
    h_out = torch.empty_like(h)
    x = torch.empty_like(h) if w_out is not None else h_out
    if n_rows == 0:
        return h_out, x
    block = triton.next_power_of_2(n)
    _add_rms_norm_kernel[(n_rows,)](
        h, a, w_a if w_a is not None else h, w_out if w_out is not None else h, h_out, x, n, float(eps),
        h.stride(0), a.stride(0), h_out.stride(0), x.stride(0),
        HAS_WA=w_a is not None, HAS_WO=w_out is not None, BLOCK=block,
        num_warps=max(1, min(16, block // 512)),  # 4-16 elements per thread up to hidden 8192
    )
    return h_out, x
