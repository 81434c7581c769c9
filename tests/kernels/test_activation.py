"""act_mul (the gated MLP's activation in one launch): Triton (interpreter on CPU) and reference vs a
float64 oracle written from the definitions.

Expectations re-stated: out = act(gate) * up, gate/up the halves of the fused gate_up rows, act =
SiLU x / (1 + e^-x) or tanh-GELU 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))); act(gate) rounded to
the dtype before the product. Tolerance relative to max(|out|, 1e-2): fp32 2e-4 (tanh-GELU's 1 + tanh
cancels for negative inputs, in torch's float32 as much as in the kernel's); bf16/fp16 two roundings
of the dtype (exp/tanh of the kernel are not torch's).
"""
import math

import pytest
import torch

from nudgefast.kernels.activation import act_mul, act_mul_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [("one_row", 1, 64), ("odd_width", 5, 96 + 7), ("wide_two_blocks", 3, 2048 + 5)]


def _oracle(gate_up, activation, dtype):
    g, u = gate_up.double().chunk(2, dim=-1)
    if activation == "silu":
        a = g / (1 + torch.exp(-g))
    else:
        a = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    return (a.to(dtype).double() * u).to(dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", [act_mul, act_mul_ref], ids=["triton", "ref"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_act_mul_matches_oracle(case, impl, dtype, activation):
    _, rows, inter = case
    gen = torch.Generator().manual_seed(inter)
    gate_up = (3 * torch.randn(rows, 2 * inter, generator=gen)).to(dtype)
    got = impl(gate_up, activation)
    want = _oracle(gate_up, activation, dtype)
    assert got.shape == (rows, inter) and got.dtype == dtype
    err = ((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-2)).max().item()
    limit = 2e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert err <= limit, f"relative error {err:.3g} > {limit:.3g}"


def test_act_mul_rejects_bad_input():
    with pytest.raises(ValueError, match="activation"):
        act_mul(torch.zeros(2, 8), "relu")
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        act_mul(torch.zeros(2, 7), "silu")
    with pytest.raises(TypeError, match="floating"):
        act_mul(torch.zeros(2, 8, dtype=torch.int32), "silu")
