"""add_rms_norm (the residual step in one launch): Triton (interpreter on CPU) vs the reference vs a
float64 oracle written from the definition.

Expectations re-stated: a' = rms_norm(a, w_a) rounded to the dtype (when w_a is given), h' = h + a'
rounded, x = rms_norm(h', w_out) rounded (h' itself without w_out); rms_norm(y, w) = y /
sqrt(mean(y^2) + eps) * w. Tolerances: fp32 1e-5 relative; bf16/fp16 one rounding of the dtype
(the float32 internals sum in another order than the reference).
"""
import pytest
import torch

from nudgefast.kernels.norm import add_rms_norm, add_rms_norm_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (name, rows, hidden, post-norm weight, pre-norm weight): weight "dt" in the activation dtype,
# "f32" float32 (Gemma's folded 1 + w), None = absent
CASES = [
    ("pre_norm_only", 3, 64, None, "dt"),
    ("post_norm_only_odd_hidden", 5, 96 + 7, "dt", None),
    ("both_norms_f32_weights", 4, 130, "f32", "f32"),
    ("plain_add", 2, 33, None, None),
    ("one_row_wide", 1, 2048, "dt", "dt"),
]


def _oracle(h, a, w_a, w_out, eps, dtype):
    def rms(y, w):
        y = y.double()
        return y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    if w_a is not None:
        a = rms(a, w_a).to(dtype)
    h = (h.double() + a.double()).to(dtype)
    return h, (h if w_out is None else rms(h, w_out).to(dtype))


def _close(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # one rounding step of the dtype
        ulp = torch.finfo(dtype).eps
        err = ((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-3)).max().item()
        assert err <= 2 * ulp, f"relative error {err} > 2 * eps {ulp} ({dtype})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", [add_rms_norm, add_rms_norm_ref], ids=["triton", "ref"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_add_rms_norm_matches_oracle(case, impl, dtype):
    _, rows, hidden, wa_kind, wo_kind = case
    gen = torch.Generator().manual_seed(hidden)
    h = (3 * torch.randn(rows, hidden, generator=gen)).to(dtype)
    a = torch.randn(rows, 2 * hidden, generator=gen).to(dtype)[:, ::2]  # strided rows: a view
    a = a.contiguous() if impl is add_rms_norm else a
    weight = {None: None, "dt": lambda: (1 + 0.3 * torch.randn(hidden, generator=gen)).to(dtype),
              "f32": lambda: 1 + 0.3 * torch.randn(hidden, generator=gen)}
    w_a = weight[wa_kind]() if wa_kind else None
    w_out = weight[wo_kind]() if wo_kind else None
    h0, a0 = h.clone(), a.clone()
    got_h, got_x = impl(h, a, w_a, w_out, 1e-6)
    want_h, want_x = _oracle(h, a, w_a, w_out, 1e-6, dtype)
    assert got_h.dtype == got_x.dtype == dtype and got_h.shape == h.shape
    _close(got_h, want_h, dtype)
    _close(got_x, want_x, dtype)
    assert torch.equal(h, h0) and torch.equal(a, a0)  # inputs untouched
    if w_out is None:
        assert got_x is got_h


def test_add_rms_norm_rejects_bad_input():
    h = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="match"):
        add_rms_norm(h, torch.zeros(2, 9), None, None, 1e-6)
    with pytest.raises(ValueError, match="w_out"):
        add_rms_norm(h, h.clone(), None, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="w_a"):
        add_rms_norm(h, h.clone(), torch.ones(8, dtype=torch.float16), None, 1e-6)
