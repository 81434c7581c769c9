"""Counter-based RNG and candidate sampling: Triton (interpreter on CPU) vs torch reference vs plain Python.

Expectations re-stated:
- the hash is a pure function of (seed, step, stream, index); Triton and torch give identical bits,
  and both equal a plain-Python uint32 implementation of the documented formula;
- uniform is in the open interval (0, 1), also for the extreme hashes; Gumbel noise is finite;
- greedy = torch.argmax (first index on ties); sampling = Gumbel-max over the nucleus, where a token
  is kept iff the probability mass strictly above it is < top_p (ties kept or dropped together);
- kernel and reference pick the same token on random logits (exact equality).
"""
import math

import pytest
import torch

from nudgefast.kernels.rng import (SALT_INDEX, SALT_SEED, SALT_STREAM, _uniform_from_hash_ref, gumbel_from_uniform_ref,
                                   gumbel_ref, hash_ref, hash_triton, uniform_ref)
from nudgefast.kernels.sample import (SAMPLE_GREEDY, SAMPLE_GUMBEL, inverse_temperature, nucleus_mask,
                                      nucleus_mask_ref, row_params, sample, sample_mode, sample_ref, sample_rows,
                                      sample_rows_ref)
from gpu_margins import FAST_MATH_TOL, gate_margins, sample_margins

M32 = 0xFFFFFFFF


def py_mix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def py_hash(seed: int, step: int, stream: int, index: int) -> int:
    k = py_mix(((seed >> 32) & M32) ^ SALT_SEED)
    k = py_mix(k ^ (seed & M32))
    k = py_mix(k ^ (step & M32))
    k = py_mix(k ^ ((stream + SALT_STREAM) & M32))
    return py_mix((py_mix(k ^ index) + py_mix(k ^ SALT_INDEX)) & M32)


SEEDS = torch.tensor([0, 1, -1, 12345, -987654321, 2**62 + 17, -(2**63), 2**63 - 1], dtype=torch.int64)
STEPS = torch.tensor([0, 1, 2, 3, 1000, 77, 2**31 - 1, 5], dtype=torch.int32)


@pytest.mark.parametrize("stream", [0, 1])
def test_hash_bits_equal_triton_torch_python(stream):
    n = 300
    h_tri, g_tri = hash_triton(SEEDS, STEPS, stream, n)
    h_ref = hash_ref(SEEDS[:, None], STEPS[:, None], stream, torch.arange(n))
    assert torch.equal(h_tri, h_ref)  # bit-identical, not close
    for r in range(len(SEEDS)):
        for i in (0, 1, 2, 255, 299):
            assert int(h_ref[r, i]) == py_hash(int(SEEDS[r]), int(STEPS[r]), stream, i)
    assert h_ref.min() >= 0 and h_ref.max() <= M32
    # the noise is the same function of the same bits (log may differ in the last ulp)
    torch.testing.assert_close(g_tri, gumbel_ref(SEEDS[:, None], STEPS[:, None], stream, torch.arange(n)),
                               rtol=2e-6, atol=2e-6)


def test_hash_keys_separate_seed_step_stream():
    idx = torch.arange(2000)
    seed, step = torch.tensor([[42]]), torch.tensor([[7]])
    base = hash_ref(seed, step, 0, idx)
    for other in (hash_ref(seed, step, 1, idx), hash_ref(seed + 1, step, 0, idx), hash_ref(seed, step + 1, 0, idx),
                  hash_ref(seed + 2**32, step, 0, idx)):
        assert (other != base).float().mean() > 0.99


def test_uniform_open_interval_and_moments():
    extremes = _uniform_from_hash_ref(torch.tensor([0, 1, 2**31, M32 - 1, M32]))
    assert (extremes > 0).all() and (extremes < 1).all()
    assert torch.isfinite(gumbel_from_uniform_ref(extremes)).all()
    u = uniform_ref(torch.arange(40).reshape(-1, 1), torch.zeros(40, 1, dtype=torch.int32), 0, torch.arange(5000))
    assert (u > 0).all() and (u < 1).all()
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = u.numel() / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60  # 19 degrees of freedom: p < 1e-5 only if broken
    g = gumbel_from_uniform_ref(u.double().float())
    assert abs(float(g.mean()) - 0.5772) < 0.01
    assert abs(float(g.var()) - math.pi**2 / 6) < 0.03


def test_gumbel_series_branch_matches_log1p():
    w = torch.tensor([2.0**-30, 1e-6, 1e-3, 2.0**-6 * 0.999, 2.0**-6, 0.1, 0.5, 0.9, 1 - 2.0**-24])
    want = -torch.log(-torch.log1p(-w.double()))
    torch.testing.assert_close(gumbel_from_uniform_ref(w).double(), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- sampling semantics


def test_sample_mode_validation():
    assert sample_mode(0.0, 1.0) == 0 and sample_mode(0.7, 1.0) == 1 and sample_mode(0.7, 0.9) == 2
    for t, p in [(-0.1, 1.0), (float("nan"), 1.0), (1.0, 0.0), (1.0, 1.5), (1.0, -0.2)]:
        with pytest.raises(ValueError):
            sample_mode(t, p)
    with pytest.raises(ValueError):
        sample_ref(torch.zeros(3), torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int32), 0, 0.0, 1.0)
    with pytest.raises(TypeError):
        sample_ref(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, dtype=torch.int64),
                   torch.zeros(2, dtype=torch.int32), 0, 0.0, 1.0)


def test_greedy_first_index_on_ties_and_neg_inf():
    x = torch.tensor([[0.0, 3.0, 1.0, 3.0], [float("-inf")] * 4, [-1.0, float("-inf"), -1.0, -2.0]])
    seed = torch.zeros(3, dtype=torch.int64)
    step = torch.zeros(3, dtype=torch.int32)
    assert sample_ref(x, seed, step, 0, 0.0, 1.0).tolist() == [1, 0, 0]
    assert sample(x, seed, step, 0, 0.0, 1.0).tolist() == [1, 0, 0]


def _empirical(logits_row, temperature, top_p, n=40000):
    x = logits_row.reshape(1, -1).expand(n, -1)
    tok = sample_ref(x, torch.arange(n, dtype=torch.int64) * 7919, torch.full((n,), 3, dtype=torch.int32), 0,
                     temperature, top_p)
    return torch.bincount(tok, minlength=x.shape[1]).double() / n


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.75), (2.0, 0.9)])
def test_sample_ref_distribution_is_the_renormalised_nucleus(temperature, top_p):
    x = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    p = torch.softmax(x.double() / temperature, dim=0)
    above = torch.stack([p[p > pi].sum() for pi in p])
    kept = above < top_p
    want = torch.where(kept, p, 0.0)
    want = want / want.sum()
    got = _empirical(x, temperature, top_p)
    assert (got[~kept] == 0).all()
    sigma = (want * (1 - want) / 40000).sqrt()
    assert ((got - want).abs() <= 4.5 * sigma + 1e-9).all(), (got, want)


def test_nucleus_ties_are_kept_or_dropped_together():
    x = torch.log(torch.tensor([[0.4, 0.3, 0.3]]))
    # mass strictly above the two 0.3 tokens is 0.4: kept when top_p > 0.4, dropped otherwise
    assert nucleus_mask_ref(x, 0.45).tolist() == [[True, True, True]]
    assert nucleus_mask_ref(x, 0.35).tolist() == [[True, False, False]]
    assert nucleus_mask(x, 1.0, 0.45).tolist() == [[True, True, True]]
    assert nucleus_mask(x, 1.0, 0.35).tolist() == [[True, False, False]]
    assert set(_empirical(x[0], 1.0, 0.45).nonzero().flatten().tolist()) == {0, 1, 2}
    flat = torch.zeros(2, 1000)
    assert nucleus_mask(flat, 0.7, 0.01).all() and nucleus_mask_ref(flat, 0.01).all()


def _logit_rows(B, V, dtype, gen):
    x = torch.randn(B, V, generator=gen) * 3
    x[0] = 0.0  # flat
    x[1, V // 2] = 60.0  # peaked (p ~ 1)
    if V >= 3:
        x[2, :] = -5.0
        x[2, 1] = x[2, 2] = 4.0  # tie at the top
        x[3, V - 1] = float("-inf")  # masked entry (vocabulary padding)
    return x.to(dtype)


# (V, dtype): vocab sizes that are not multiples of the block sizes, and 1
SHAPES = [(1, torch.float32), (37, torch.float32), (1000, torch.bfloat16), (4099, torch.float32),
          (2500, torch.float16)]


@pytest.mark.parametrize("V,dtype", SHAPES)
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.7, 1.0), (0.7, 0.8), (1.3, 0.3)])
def test_sample_triton_equals_reference(V, dtype, temperature, top_p):
    if V >= 2500 and top_p < 1 and temperature > 1:
        pytest.skip("one nucleus case per large vocab is enough for the interpreter")
    gen = torch.Generator().manual_seed(V)
    B = 6
    x = _logit_rows(B, V, dtype, gen)
    seed = torch.randint(-(2**62), 2**62, (B,), generator=gen)
    step = torch.randint(0, 10_000, (B,), generator=gen, dtype=torch.int32)
    for stream in (0, 1):
        got = sample(x, seed, step, stream, temperature, top_p)
        want = sample_ref(x, seed, step, stream, temperature, top_p)
        assert got.dtype == torch.int64 and torch.equal(got, want)


@pytest.mark.parametrize("V,dtype", [(37, torch.float32), (1000, torch.bfloat16), (4099, torch.float32)])
@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.8), (1.0, 0.3), (1.5, 0.95)])
def test_nucleus_mask_triton_equals_reference(V, dtype, temperature, top_p):
    gen = torch.Generator().manual_seed(V + 1)
    x = _logit_rows(5, V, dtype, gen)
    scaled = x.float() * inverse_temperature(temperature)
    want = nucleus_mask_ref(scaled, top_p)
    got = nucleus_mask(x, temperature, top_p)
    assert want.any(dim=1).all()  # the top token is always kept
    # Equal except where the decision sits within float32 rounding of the boundary: there the two
    # summation orders may disagree (the exact mass above such a token is top_p*Z +- 1e-6 relative).
    e = torch.exp(scaled.double() - scaled.double().max(dim=1, keepdim=True).values)
    asc = e.sort(dim=1).values
    upto = asc.cumsum(dim=1)  # upto[k] = sum of the k+1 smallest
    n_le = torch.searchsorted(asc, e, right=True)  # entries <= e_i
    above = upto[:, -1:] - upto.gather(1, n_le - 1)
    margin = (above - top_p * e.sum(dim=1, keepdim=True)).abs() / e.sum(dim=1, keepdim=True)
    differ = got != want
    assert (margin[differ] < 1e-5).all(), margin[differ]
    assert differ.sum() <= 2


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.0, 0.9), (0.5, 0.5)])
def test_sample_ref_equals_dense_gumbel_max(temperature, top_p):
    """sample_ref draws noise only for tokens that can still win; the dense formula must agree, on
    peaked rows (few contenders: the sparse path) and on flat-ish rows (the dense path)."""
    gen = torch.Generator().manual_seed(9)
    V = 3000
    for spread in (1.0, 12.0):
        x = torch.randn(16, V, generator=gen) * spread
        x[:, :5] += 3 * spread
        seed = torch.randint(0, 2**62, (16,), generator=gen)
        step = torch.randint(0, 99, (16,), generator=gen, dtype=torch.int32)
        s = x * inverse_temperature(temperature)
        v = s + gumbel_ref(seed[:, None], step[:, None], 1, torch.arange(V))
        if top_p < 1:
            v = v.masked_fill(~nucleus_mask_ref(s, top_p), float("-inf"))
        assert torch.equal(sample_ref(x, seed, step, 1, temperature, top_p), v.argmax(dim=-1))


# per-row samplers in one batch: (temperature, top_p) of each row
MIXED = [(0.0, 1.0), (0.7, 1.0), (0.7, 0.8), (1.3, 0.95), (0.3, 0.5), (2.0, 1.0), (0.0, 0.4), (0.9, 0.3)]


def _mixed(V, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    B = len(MIXED)
    x = _logit_rows(B, V, dtype, gen)
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen)
    step = torch.randint(0, 10_000, (B,), generator=gen, dtype=torch.int32)
    inv = torch.tensor([inverse_temperature(t) for t, _ in MIXED], dtype=torch.float32)
    top_p = torch.tensor([p for _, p in MIXED], dtype=torch.float32)
    mode = torch.tensor([sample_mode(t, p) for t, p in MIXED], dtype=torch.int32)
    return x, seeds, step, inv, top_p, mode


@pytest.mark.parametrize("V,dtype", [(37, torch.float32), (1000, torch.bfloat16), (3001, torch.float32)])
def test_sample_rows_reference_equals_each_row_alone(V, dtype):
    x, seeds, step, inv, top_p, mode = _mixed(V, dtype, V)
    for stream in (0, 1):
        got = sample_rows_ref(x, seeds, step, stream, inv, top_p, mode)
        for r, (t, p) in enumerate(MIXED):
            assert int(got[r]) == int(sample_ref(x[r:r + 1], seeds[r:r + 1], step[r:r + 1], stream, t, p)), r
    # max_sample caps every row's sampler: greedy everywhere, or Gumbel without the nucleus
    assert torch.equal(sample_rows_ref(x, seeds, step, 0, inv, top_p, mode, SAMPLE_GREEDY), x.float().argmax(-1))
    capped = sample_rows_ref(x, seeds, step, 0, inv, top_p, mode, SAMPLE_GUMBEL)
    uncapped = sample_rows_ref(x, seeds, step, 0, inv, top_p, torch.clamp(mode, max=SAMPLE_GUMBEL))
    assert torch.equal(capped, uncapped)


@pytest.mark.parametrize("V,dtype", [(37, torch.float32), (1000, torch.bfloat16)])
def test_sample_rows_triton_equals_reference(V, dtype):
    x, seeds, step, inv, top_p, mode = _mixed(V, dtype, V + 7)
    for stream in (0, 1):
        want = sample_rows_ref(x, seeds, step, stream, inv, top_p, mode)
        assert torch.equal(sample_rows(x, seeds, step, stream, inv, top_p, mode), want)
    for max_sample in (SAMPLE_GREEDY, SAMPLE_GUMBEL):  # the compile-time cap prunes, per row it clamps
        assert torch.equal(sample_rows(x, seeds, step, 0, inv, top_p, mode, max_sample=max_sample),
                           sample_rows_ref(x, seeds, step, 0, inv, top_p, mode, max_sample))
    with pytest.raises(ValueError, match="top_p"):
        sample_rows(x, seeds, step, 0, inv, top_p[:3], mode)
    with pytest.raises(ValueError, match="inv_temp"):
        sample_rows_ref(x, seeds, step, 0, inv.double(), top_p, mode)


def test_sample_is_a_pure_function_of_its_key():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 50, generator=gen)
    seed = torch.randint(0, 2**40, (64,), generator=gen)
    step = torch.zeros(64, dtype=torch.int32)
    a = sample_ref(x, seed, step, 0, 1.0, 1.0)
    assert torch.equal(a, sample_ref(x, seed, step, 0, 1.0, 1.0))
    assert (a != sample_ref(x, seed, step + 1, 0, 1.0, 1.0)).any()
    assert (a != sample_ref(x, seed, step, 1, 1.0, 1.0)).any()


def test_gpu_margins_find_rounding_boundaries():
    """The margins the GPU tests rely on (gpu_margins.py) flag rows decided within rounding, and only those."""
    gen = torch.Generator().manual_seed(4)
    B, V = 6, 500
    x = torch.randn(B, V, generator=gen) * 3
    seed = torch.randint(0, 2**62, (B,), generator=gen)
    step = torch.zeros(B, dtype=torch.int32)
    for t, p in ((0.7, 1.0), (0.7, 0.9)):
        inv, top, mode = row_params(B, x.device, t, p)
        assert (sample_margins(x, seed, step, 0, inv, top, mode) > FAST_MATH_TOL).all()  # random rows
    inv, top, mode = row_params(B, x.device, 1.0, 1.0)
    v = x + gumbel_ref(seed[:, None], step[:, None], 0, torch.arange(V))
    first, second = v[0].topk(2).indices.tolist()
    x[0, second] += float(v[0, first] - v[0, second]) * (1 - 1e-7)  # a Gumbel race decided in the last digits
    assert float(sample_margins(x, seed, step, 0, inv, top, mode)[0]) < FAST_MATH_TOL
    assert torch.isinf(sample_margins(x, seed, step, 0, *row_params(B, x.device, 0.0, 1.0))).all()  # greedy
    probs = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))  # top_p 0.8: the third token sits on the boundary
    gate = torch.zeros(1, dtype=torch.int32)
    assert float(gate_margins(probs, gate, torch.tensor([0.5]))[0]) < 1e-6
    assert float(gate_margins(probs, gate, torch.tensor([0.4]))[0]) > 0.05
    # a nucleus edge: the draw is flagged when the boundary token would win it (about 1 seed in 5)
    rows = probs.expand(40, -1)
    seeds, steps = torch.arange(40), torch.zeros(40, dtype=torch.int32)
    at_edge = sample_margins(rows, seeds, steps, 0, *row_params(40, probs.device, 1.0, 0.8))
    away = sample_margins(rows, seeds, steps, 0, *row_params(40, probs.device, 1.0, 0.65))
    assert 0 < int((at_edge == 0).sum()) < 40 and (away > FAST_MATH_TOL).all()


@pytest.mark.gpu
@pytest.mark.parametrize("chunks", [None, 1])  # None: the launcher's split (C > 1 at these batches); 1: one program
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("V", [50_000, 151_936, 262_144])
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.8, 1.0), (0.8, 0.9)])
def test_sample_gpu_real_vocab(V, B, chunks, temperature, top_p):
    gen = torch.Generator().manual_seed(V + B)
    x = (torch.randn(B, V, generator=gen) * 4).to(torch.bfloat16).cuda()
    seed = torch.randint(0, 2**62, (B,), generator=gen).cuda()
    step = torch.randint(0, 1000, (B,), generator=gen, dtype=torch.int32).cuda()
    h_tri, _ = hash_triton(seed, step, 1, V)
    assert torch.equal(h_tri, hash_ref(seed[:, None], step[:, None], 1, torch.arange(V, device="cuda")))  # integers
    params = row_params(B, x.device, temperature, top_p)
    got = sample_rows(x, seed, step, 1, *params, max_sample=sample_mode(temperature, top_p), chunks=chunks)
    want = sample_ref(x, seed, step, 1, temperature, top_p)
    # Tokens are exact only away from rounding boundaries: on the GPU the kernel's exp/log are the fast
    # approximate instructions and a * b + c is contracted to an FMA (Triton's default), the reference
    # rounds each op (gpu_margins.py). Rows within FAST_MATH_TOL of a boundary are left out, counted.
    ok = (sample_margins(x, seed, step, 1, *params) > FAST_MATH_TOL).cuda()
    assert int((~ok).sum()) <= max(1, B // 8), "too many rows at a rounding boundary: pick other test data"
    assert torch.equal(got[ok], want[ok])
