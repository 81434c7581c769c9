"""The gated MLP's activation in one launch: act(gate) * up from the fused gate_up projection.

    gate_up: [T, 2I] (gate = gate_up[:, :I], up = gate_up[:, I:], the model's fused layout)
    out[t, i] = act(gate[t, i]) * up[t, i],   act = SiLU (x * sigmoid(x)) or GELU with the tanh
    approximation (Gemma)

Rounding as the per-op torch path: act(gate) is computed in float32, rounded to the activation dtype,
then multiplied by up and rounded again. The float32 transcendental functions (exp, tanh) of the GPU
kernel are not torch's, so the two agree to a rounding of the dtype (about one ulp), not bit for bit.

`act_mul` runs the Triton kernel on CUDA tensors (or under TRITON_INTERPRET=1) and the plain-torch
`act_mul_ref` otherwise.
"""
import os

import torch
import torch.nn.functional as F

from nudgefast.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from nudgefast.kernels.kv_store import _round_f32

ACTIVATIONS = ("silu", "gelu_tanh")


def _check(gate_up, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"act_mul: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError("act_mul: gate_up must be a 2-D tensor [tokens, 2 * intermediate], got "
                         f"{tuple(gate_up.shape) if isinstance(gate_up, torch.Tensor) else type(gate_up).__name__}")
    if not gate_up.dtype.is_floating_point:
        raise TypeError(f"act_mul: gate_up must be floating point, got {gate_up.dtype}")


def act_mul_ref(gate_up, activation):
    """The model's per-op path: act(gate) * up."""
    _check(gate_up, activation)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    return act * up


if HAS_TRITON:

    @triton.jit
    def _act_mul_kernel(gu_ptr, out_ptr, inter, stride_gu, stride_out, GELU: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
        dt: tl.constexpr = g.dtype
        g = g.to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0).to(tl.float32)
        if GELU:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh from exp of a non-positive argument
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            e = tl.exp(-2.0 * tl.abs(z))
            t = (1.0 - e) / (1.0 + e)
            a = 0.5 * g * (1.0 + tl.where(z >= 0, t, -t))
        else:
            a = g / (1.0 + tl.exp(-g))
        out = _round_f32(_round_f32(a, dt) * u, dt)
        tl.store(out_ptr + row * stride_out + cols, out.to(dt), mask=mask)


def _use_triton(t):
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def act_mul(gate_up, activation):
    """act(gate) * up in one launch (module docstring); returns a new [T, I] tensor."""
    if not _use_triton(gate_up):
        return act_mul_ref(gate_up, activation)
    _check(gate_up, activation)
    if gate_up.stride(1) != 1:
        raise ValueError("act_mul: gate_up must have unit stride along its last dimension")
    n_rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((n_rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if n_rows == 0 or inter == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _act_mul_kernel[(n_rows, triton.cdiv(inter, block))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0),
        GELU=activation == "gelu_tanh", BLOCK=block, num_warps=4,
    )
    return out
