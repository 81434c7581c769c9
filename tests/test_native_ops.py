"""The native CPU ops (csrc/, built as nudgefast._C) against their plain-torch references.

Expectations re-stated:
- store_kv writes k[t], v[t] at flat slot s = slot_mapping[t] (page s // page_size, offset
  s % page_size), skips negative slots, touches nothing else; byte-exact.
- paged_attention: row b's queries q[cu[b]:cu[b+1]] are the last q_len_b tokens of a sequence of
  seq_lens[b] keys; query i sits at position seq_lens[b] - q_len_b + i and sees keys at positions
  <= its own, and > position - window when window > 0; scores = scale * q.k, softcap * tanh(s /
  softcap) when softcap > 0; query head h reads kv head h // (Hq // Hkv); softmax in fp32; rows
  with seq_len 0 give zeros. Decode is q_len 1 per row and must equal paged_decode_attention_ref;
  multi-token chunks must equal paged_prefill_attention_ref.
- nudge_step (nudgefast.native.nudge_step_native) equals nudge_step_ref: same tokens, same
  provenance, same state, same hashes of the counter-based RNG.

Tolerances (max abs error, outputs of magnitude ~1): fp32 1e-5. bf16 1e-2 and fp16 2e-3: both
sides compute in fp32 and round the output once to the input dtype, so they differ by at most one
rounding step of the output (2**-7 for bf16 near 1, 2**-10 for fp16) when fp32 sums land on
opposite sides of a rounding boundary.

The extension is built by `pip install --no-build-isolation -e .` (CI does); without it this file
is skipped.
"""
import math

import pytest
import torch

pytest.importorskip("nudgefast._C", reason="native CPU ops not built (pip install --no-build-isolation -e .)")

from nudgefast.kernels.kv_store import store_kv_ref  # noqa: E402
from nudgefast.kernels.paged_decode_attention import paged_decode_attention_ref  # noqa: E402
from nudgefast.kernels.paged_prefill_attention import paged_prefill_attention_ref  # noqa: E402
from nudgefast.ops import Backend, native_ops_available  # noqa: E402

OPS = torch.ops.nudgefast
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = list(TOLERANCE)
GARBAGE = 1e3  # in page slots past every row's end: any leak into an output is visible


def assert_close(got, want, dtype):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert err <= TOLERANCE[dtype], f"max abs error {err:.3g} > {TOLERANCE[dtype]} for {dtype}"


def test_ops_are_registered_and_picked_by_the_backend():
    assert native_ops_available()
    assert hasattr(OPS, "store_kv") and hasattr(OPS, "paged_attention") and hasattr(OPS, "nudge_step")
    assert Backend.for_device(torch.device("cpu"), native=True).kind == "native"


# ----------------------------------------------------------------------------------------------
# store_kv
# ----------------------------------------------------------------------------------------------

# (name, T, Hkv, D, num_pages, page_size, slots): slots None = a random permutation of the pool.
STORE_CASES = [
    ("odd_dim_page5", 7, 2, 24, 4, 5, [3, 0, 19, 7, 12, 4, 8]),
    ("page12_negative_slots", 6, 3, 33, 3, 12, [-1, 35, 0, -5, 13, 24]),
    ("all_skipped", 3, 1, 8, 2, 4, [-1, -1, -1]),
    ("one_head_page1", 5, 1, 7, 6, 1, [5, 1, 0, 3, 2]),
    ("prefill_chunk_parallel", 300, 3, 64, 30, 12, None),
]


def store_inputs(case, dtype, layout, seed=0):
    _, n_tokens, n_kv_heads, head_dim, num_pages, page_size, slots = case
    gen = torch.Generator().manual_seed(seed)
    if slots is None:
        slots = torch.randperm(num_pages * page_size, generator=gen)[:n_tokens].tolist()
    if layout == "fused_qkv":  # k, v as strided views of one projection, as the model makes them
        qkv = torch.randn(n_tokens, 3 * n_kv_heads * head_dim, generator=gen).to(dtype)
        _, k, v = qkv.split(n_kv_heads * head_dim, dim=-1)
        k, v = k.reshape(n_tokens, n_kv_heads, head_dim), v.reshape(n_tokens, n_kv_heads, head_dim)
    else:
        k = torch.randn(n_tokens, n_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n_tokens, n_kv_heads, head_dim, generator=gen).to(dtype)
    shape = (num_pages, page_size, n_kv_heads, head_dim)
    if layout == "strided_pool":  # pages inside a wider buffer: no flat view exists
        k_pages = torch.full((num_pages, page_size, n_kv_heads, head_dim + 3), GARBAGE).to(dtype)[..., :head_dim]
        v_pages = torch.full((num_pages, page_size, n_kv_heads, head_dim + 3), GARBAGE).to(dtype)[..., 3:]
    elif layout == "dim_major_pool":  # head_dim not the innermost axis: an element-wise copy
        k_pages = torch.full((num_pages, page_size, head_dim, n_kv_heads), GARBAGE).to(dtype).transpose(2, 3)
        v_pages = torch.full((num_pages, page_size, head_dim, n_kv_heads), GARBAGE).to(dtype).transpose(2, 3)
    else:
        k_pages, v_pages = torch.full(shape, GARBAGE).to(dtype), torch.full(shape, GARBAGE).to(dtype)
    return k, v, k_pages, v_pages, torch.tensor(slots, dtype=torch.int64)


@pytest.mark.parametrize("layout", ["contiguous", "fused_qkv", "strided_pool", "dim_major_pool"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", STORE_CASES, ids=[c[0] for c in STORE_CASES])
def test_store_kv_matches_reference(case, dtype, layout):
    k, v, k_pages, v_pages, slots = store_inputs(case, dtype, layout)
    k_want, v_want = k_pages.clone(), v_pages.clone()
    store_kv_ref(k, v, k_want, v_want, slots)
    OPS.store_kv(k, v, k_pages, v_pages, slots)
    assert torch.equal(k_pages, k_want) and torch.equal(v_pages, v_want)
    # Re-stated: every kept row landed at its slot, and skipped rows wrote nothing.
    page_size = k_pages.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(k_pages[s // page_size, s % page_size], k[t])
            assert torch.equal(v_pages[s // page_size, s % page_size], v[t])
    written = int((slots >= 0).sum())
    assert int((k_pages != GARBAGE).any(-1).any(-1).sum()) <= written


def test_store_kv_empty_batch_is_a_no_op():
    k, v, k_pages, v_pages, _ = store_inputs(STORE_CASES[0], torch.float32, "contiguous")
    before = k_pages.clone()
    OPS.store_kv(k[:0], v[:0], k_pages, v_pages, torch.zeros(0, dtype=torch.int64))
    assert torch.equal(k_pages, before)


def test_store_kv_rejects_bad_input():
    k, v, k_pages, v_pages, slots = store_inputs(STORE_CASES[0], torch.float32, "contiguous")
    with pytest.raises(TypeError, match="slot_mapping"):
        OPS.store_kv(k, v, k_pages, v_pages, slots.int())
    with pytest.raises(TypeError, match="dtype"):
        OPS.store_kv(k.double(), v.double(), k_pages, v_pages, slots)
    with pytest.raises(ValueError, match="n_kv_heads, head_dim"):
        OPS.store_kv(k[:, :, :5], v[:, :, :5], k_pages, v_pages, slots)
    with pytest.raises(IndexError, match="past the pool"):
        OPS.store_kv(k, v, k_pages, v_pages, torch.full_like(slots, 4 * 5))


# ----------------------------------------------------------------------------------------------
# paged_attention
# ----------------------------------------------------------------------------------------------

def make_cache(seq_lens, n_kv_heads, head_dim, page_size, dtype, seed):
    """Pages in shuffled order plus spare pages; unused block-table entries hold -1 (an
    implementation that reads them fails) and slots past a row's end hold GARBAGE."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_row = [math.ceil(n / page_size) for n in seq_lens]
    num_pages = sum(pages_per_row) + 3
    shape = (num_pages, page_size, n_kv_heads, head_dim)
    k_pages, v_pages = torch.full(shape, GARBAGE), torch.full(shape, GARBAGE)
    block_tables = torch.full((len(seq_lens), max(pages_per_row, default=0) + 1), -1, dtype=torch.int32)
    order = torch.randperm(num_pages, generator=gen).tolist()
    for b, (n, count) in enumerate(zip(seq_lens, pages_per_row)):
        ids = [order.pop() for _ in range(count)]
        block_tables[b, :count] = torch.tensor(ids, dtype=torch.int32)
        for pos in range(n):
            page, offset = ids[pos // page_size], pos % page_size
            k_pages[page, offset] = torch.randn(n_kv_heads, head_dim, generator=gen)
            v_pages[page, offset] = torch.randn(n_kv_heads, head_dim, generator=gen)
    return k_pages.to(dtype), v_pages.to(dtype), block_tables, torch.tensor(seq_lens, dtype=torch.int32)


def attention_inputs(seq_lens, q_lens, n_q_heads, n_kv_heads, head_dim, page_size, gain, dtype, seed=0):
    k_pages, v_pages, block_tables, lens = make_cache(seq_lens, n_kv_heads, head_dim, page_size, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = (gain * torch.randn(sum(q_lens), n_q_heads, head_dim, generator=gen)).to(dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return q, k_pages, v_pages, block_tables, lens, cu, head_dim ** -0.5


# (name, seq_lens, Hq, Hkv, head_dim, page_size, window, softcap, q_gain). q_gain scales q so the
# scores are large enough for softcap and the softmax to be far from uniform.
DECODE_CASES = [
    ("mha_odd_dim_partial_pages", [9, 1, 23], 2, 2, 24, 5, 0, 0.0, 1.0),
    ("gqa4_page12", [33, 16, 7, 12], 8, 2, 40, 12, 0, 0.0, 2.0),
    ("gqa3_window_smollm", [300, 8, 21], 9, 3, 64, 16, 7, 0.0, 2.0),
    ("gqa4_d256_gemma", [301, 40], 4, 1, 256, 16, 0, 0.0, 1.0),
    ("softcap50_odd_dim", [20, 11], 4, 1, 33, 6, 0, 50.0, 8.0),
    ("window_and_softcap", [26, 3], 6, 2, 24, 5, 5, 20.0, 6.0),
    ("padding_rows", [0, 14, 0, 5], 4, 4, 16, 3, 0, 0.0, 1.0),
    ("window_wider_than_context", [10, 4], 3, 1, 24, 4, 64, 0.0, 2.0),
    ("page_size_one_tiny_dim", [6, 3], 2, 1, 3, 1, 0, 0.0, 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_matches_reference(case, dtype):
    _, seq_lens, hq, hkv, d, page_size, window, softcap, gain = case
    q, k_pages, v_pages, block_tables, lens, cu, scale = attention_inputs(
        seq_lens, [1] * len(seq_lens), hq, hkv, d, page_size, gain, dtype)
    got = OPS.paged_attention(q, k_pages, v_pages, block_tables, lens, cu, scale, window, softcap)
    want = paged_decode_attention_ref(q, k_pages, v_pages, block_tables, lens, scale, window, softcap)
    assert_close(got, want, dtype)
    for b, n in enumerate(seq_lens):
        if n == 0:
            assert torch.equal(got[b], torch.zeros_like(got[b]))  # zeros, not NaN


# (name, seq_lens, q_lens, Hq, Hkv, head_dim, page_size, window, softcap, q_gain)
PREFILL_CASES = [
    ("full_prompts_mha", [9, 17], [9, 17], 2, 2, 24, 5, 0, 0.0, 1.0),
    ("chunks_mid_sequence_gqa4", [30, 21, 12], [5, 21, 1], 8, 2, 40, 12, 0, 0.0, 2.0),
    ("q_len_zero_rows_gqa3", [10, 25, 7, 0], [0, 6, 0, 0], 9, 3, 24, 5, 0, 0.0, 2.0),
    ("verify_chunks_window", [40, 33, 18], [5, 5, 5], 6, 2, 32, 16, 9, 0.0, 2.0),
    ("long_chunk_window_softcap", [70, 8], [53, 3], 4, 1, 40, 6, 11, 30.0, 6.0),
    ("softcap50_page12_odd_dim", [26, 13], [4, 13], 4, 2, 33, 12, 0, 50.0, 8.0),
    ("page_size_one_tiny_dim", [7, 4], [3, 4], 3, 1, 5, 1, 2, 0.0, 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
def test_prefill_matches_reference(case, dtype):
    _, seq_lens, q_lens, hq, hkv, d, page_size, window, softcap, gain = case
    q, k_pages, v_pages, block_tables, lens, cu, scale = attention_inputs(
        seq_lens, q_lens, hq, hkv, d, page_size, gain, dtype)
    got = OPS.paged_attention(q, k_pages, v_pages, block_tables, lens, cu, scale, window, softcap)
    want = paged_prefill_attention_ref(q, k_pages, v_pages, block_tables, lens, cu, scale, window, softcap)
    assert_close(got, want, dtype)


def test_prefill_query_sees_only_its_past():
    """Re-stated causality: changing the key at position p changes only queries at >= p."""
    q, k_pages, v_pages, block_tables, lens, cu, scale = attention_inputs(
        [12], [12], 2, 1, 16, 5, 1.0, torch.float32)
    before = OPS.paged_attention(q, k_pages, v_pages, block_tables, lens, cu, scale, 0, 0.0)
    p = 7
    k_pages[block_tables[0, p // 5], p % 5] += 3.0
    after = OPS.paged_attention(q, k_pages, v_pages, block_tables, lens, cu, scale, 0, 0.0)
    changed = (after != before).flatten(1).any(1)
    assert changed.tolist() == [i >= p for i in range(12)]


@pytest.mark.parametrize("threads", [1, 4])
def test_decode_split_over_threads_matches_reference(threads):
    """One long row and one kv head: with more threads than work items the keys are split and
    merged; the result must not depend on the thread count."""
    q, k_pages, v_pages, block_tables, lens, cu, scale = attention_inputs(
        [700], [1], 8, 1, 64, 12, 2.0, torch.float32)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = OPS.paged_attention(q, k_pages, v_pages, block_tables, lens, cu, scale, 0, 0.0)
    finally:
        torch.set_num_threads(old)
    want = paged_decode_attention_ref(q, k_pages, v_pages, block_tables, lens, scale, 0, 0.0)
    assert_close(got, want, torch.float32)


def test_attention_accepts_strided_q_and_int64_metadata():
    q, k_pages, v_pages, block_tables, lens, cu, scale = attention_inputs(
        [30, 21, 12], [5, 21, 1], 8, 2, 40, 12, 2.0, torch.float32)
    fused = torch.cat([q, torch.randn_like(q)], dim=1)[:, :8]  # a view with a wide token stride
    assert not fused.is_contiguous()
    got = OPS.paged_attention(fused, k_pages, v_pages, block_tables.long(), lens.long(), cu.long(), scale, 0, 0.0)
    want = paged_prefill_attention_ref(q, k_pages, v_pages, block_tables, lens, cu, scale, 0, 0.0)
    assert_close(got, want, torch.float32)


def test_attention_rejects_bad_input():
    q, k_pages, v_pages, block_tables, lens, cu, scale = attention_inputs(
        [30, 21, 12], [5, 21, 1], 8, 2, 40, 12, 2.0, torch.float32)
    call = OPS.paged_attention
    with pytest.raises(TypeError, match="dtype"):
        call(q.double(), k_pages, v_pages, block_tables, lens, cu, scale, 0, 0.0)
    with pytest.raises(ValueError, match="head_dim"):
        call(q[..., :8], k_pages, v_pages, block_tables, lens, cu, scale, 0, 0.0)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        call(q[:, :3], k_pages, v_pages, block_tables, lens, cu, scale, 0, 0.0)
    with pytest.raises(TypeError, match="block_tables"):
        call(q, k_pages, v_pages, block_tables.float(), lens, cu, scale, 0, 0.0)
    with pytest.raises(ValueError, match="cu_q_lens"):
        call(q, k_pages, v_pages, block_tables, lens, cu[:-1], scale, 0, 0.0)
    with pytest.raises(ValueError, match="q_len 21 > seq_len 20"):
        call(q, k_pages, v_pages, block_tables, torch.tensor([30, 20, 12], dtype=torch.int32), cu, scale, 0, 0.0)
    with pytest.raises(ValueError, match="block_tables holds only"):
        call(q, k_pages, v_pages, block_tables, torch.tensor([30, 21, 100], dtype=torch.int32), cu, scale, 0, 0.0)
    with pytest.raises(ValueError, match="window"):
        call(q, k_pages, v_pages, block_tables, lens, cu, scale, -1, 0.0)
    with pytest.raises(ValueError, match="softcap"):
        call(q, k_pages, v_pages, block_tables, lens, cu, scale, 0, -1.0)
    bad_table = block_tables.clone()
    bad_table[1, 0] = k_pages.shape[0]
    with pytest.raises(IndexError, match="not a page of the pool"):
        call(q, k_pages, v_pages, bad_table, lens, cu, scale, 0, 0.0)


# ----------------------------------------------------------------------------------------------
# RNG and sampler
# ----------------------------------------------------------------------------------------------

from nudgefast.kernels.nudge_gate import (  # noqa: E402
    FINISH_LENGTH, FINISH_NONE, FINISH_STOP, GATE_ENTROPY, GATE_TOP_PROB, MODE_BASE_ONLY, MODE_NUDGER_ONLY,
    MODE_NUDGING, STATE_BASE, STATE_NUDGE, GateParams, ModelCursor, nudge_step_ref)
from nudgefast.kernels.rng import gumbel_ref, hash_ref  # noqa: E402
from nudgefast.kernels.sample import inverse_temperature, sample_mode, sample_ref, sample_rows_ref  # noqa: E402
from nudgefast.native import nudge_step_native, sample_native, sample_rows_native  # noqa: E402
from gate_rows import MIXED_ROWS, Cfg, apply, legacy_state, row_of  # noqa: E402


@pytest.mark.parametrize("stream", [0, 1])
def test_rng_hashes_are_bit_identical_and_noise_matches(stream):
    seed = torch.tensor([0, 1, -1, 2**62 + 12345, -(2**63), 2**63 - 1, 987654321], dtype=torch.int64)
    step = torch.tensor([0, 1, 7, 2**31 - 1, 5, 123456, 3], dtype=torch.int32)
    n = 1001  # not a multiple of the vector width
    hashes, noise = OPS.rng_noise(seed, step, stream, n)
    index = torch.arange(n)
    assert torch.equal(hashes, hash_ref(seed.view(-1, 1), step.view(-1, 1), stream, index))
    # The noise comes from the sampler's own vector log; torch's log1p/log differ by a few ulps.
    want = gumbel_ref(seed.view(-1, 1), step.view(-1, 1), stream, index)
    torch.testing.assert_close(noise, want, rtol=1e-6, atol=1e-6)
    other, _ = OPS.rng_noise(seed, step, 1 - stream, n)
    assert (other != hashes).float().mean() > 0.99  # the streams are independent draws


def kinds_of_rows(B, V, gen, special=3):
    """Every kind of row a sampler meets: random scales, peaked (sometimes on `special`), flat,
    two equal maxima (first index must win), and -inf padding entries."""
    x = torch.randn(B, V, generator=gen) * torch.empty(B, 1).uniform_(0.3, 6.0, generator=gen)
    for i in range(B):
        kind = i % 6
        if kind == 1:
            x[i, int(torch.randint(0, V, (1,), generator=gen))] = 40.0
        elif kind == 2:
            x[i] = 0.0
        elif kind == 3 and V > 4:
            x[i, 1] = x[i, V - 2] = float(x[i].max()) + 2.0
        elif kind == 4 and V > special:
            x[i, special] = 40.0
        elif kind == 5 and V > 4:
            x[i, -2:] = float("-inf")
    return x


SAMPLERS = [(0.0, 1.0), (0.7, 1.0), (1.3, 1.0), (0.7, 0.8), (1.0, 0.3)]  # greedy, Gumbel, nucleus


# Every dtype at small and odd vocabularies; a real vocabulary (SmolLM2's 49152) in bfloat16.
SAMPLE_SHAPES = [(V, dtype) for V in (1, 37, 1000, 4099) for dtype in DTYPES] + [(49152, torch.bfloat16)]


@pytest.mark.parametrize("V,dtype", SAMPLE_SHAPES, ids=[f"{v}-{d}" for v, d in SAMPLE_SHAPES])
@pytest.mark.parametrize("temperature,top_p", SAMPLERS)
def test_sample_matches_reference(V, dtype, temperature, top_p):
    gen = torch.Generator().manual_seed(V)
    B = 12
    logits = kinds_of_rows(B, V, gen).to(dtype)
    seed = torch.randint(-(2**62), 2**62, (B,), generator=gen)
    step = torch.randint(0, 1000, (B,), generator=gen, dtype=torch.int32)
    for stream in (0, 1):
        got = sample_native(logits, seed, step, stream, temperature, top_p)
        want = sample_ref(logits, seed, step, stream, temperature, top_p)
        assert got.dtype == torch.int64 and torch.equal(got, want)


def test_sample_draws_follow_the_distribution():
    """Re-stated: Gumbel-max with temperature t draws token i with probability softmax(x / t)_i."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]])
    n = 4000
    steps = torch.arange(n, dtype=torch.int32)
    tokens = torch.cat([sample_native(logits, torch.tensor([17]), steps[i:i + 1], 0, 0.8, 1.0) for i in range(n)])
    freq = torch.bincount(tokens, minlength=5).double() / n
    want = torch.softmax(logits[0].double() / 0.8, dim=0)
    assert (freq - want).abs().max() < 0.03  # about 4 standard deviations at n = 4000


def test_sample_rejects_bad_input():
    logits = torch.randn(2, 10)
    seed, step = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="top_p"):
        OPS.sample(logits, seed, step, 0, 0.7, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        OPS.sample(logits, seed, step, 0, -1.0, 1.0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        OPS.sample(logits.double(), seed, step, 0, 0.7, 1.0)
    with pytest.raises(ValueError, match="seed"):
        OPS.sample(logits, seed[:1], step, 0, 0.7, 1.0)


# ----------------------------------------------------------------------------------------------
# nudge_step
# ----------------------------------------------------------------------------------------------

def clone(obj):
    return type(obj)(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(obj).items()})


def assert_same(got, want, what):
    for k, v in vars(want).items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(getattr(got, k), v), f"{what}.{k}: {getattr(got, k).tolist()} != {v.tolist()}"


def make_state(B, V, max_new, gen, stop, finished_every=4):
    return legacy_state(
        seed=torch.randint(-(2**62), 2**62, (B,), generator=gen),
        word_state=torch.randint(0, 2, (B,), generator=gen, dtype=torch.int32),
        span=torch.randint(0, 3, (B,), generator=gen, dtype=torch.int32),
        finished=torch.tensor([FINISH_STOP if i % finished_every == finished_every - 1 else FINISH_NONE
                               for i in range(B)], dtype=torch.int32),
        n_out=torch.randint(0, max_new, (B,), generator=gen, dtype=torch.int32),
        n_nudged=torch.randint(0, 3, (B,), generator=gen, dtype=torch.int32),
        out_tokens=torch.full((B, max_new), -1, dtype=torch.int32),
        out_from_nudger=torch.full((B, max_new), -1, dtype=torch.int8),
        stop_ids=torch.tensor(list(stop), dtype=torch.int64),
        word_start=torch.rand(max(1, V - 3), generator=gen) < 0.5,  # the last ids: past the tokenizer
    )


def make_cursor(B, pages, page_size, gen):
    """Half the rows on the last slot of a page, so the step moves them onto the next page."""
    pos = torch.tensor([page_size * (1 + i % 2) - 1 if i % 2 == 0 else i % (2 * page_size) for i in range(B)])
    bt = torch.randperm(4 * B * pages, generator=gen)[:B * pages].reshape(B, pages).to(torch.int32)
    slot = bt.gather(1, (pos // page_size).unsqueeze(1)).squeeze(1).long() * page_size + pos % page_size
    return ModelCursor(input_ids=torch.randint(0, 9, (B,), generator=gen), positions=pos,
                       seq_lens=(pos + 1).to(torch.int32), slot_mapping=slot, block_tables=bt,
                       page_size=page_size)


def gate_case(V, dtype, mode, seed, B=10, max_new=6):
    gen = torch.Generator().manual_seed(seed * 7919 + V)
    stop = (3, V - 4)
    state = make_state(B, V, max_new, gen, stop)
    base_logits = kinds_of_rows(B, V, gen, special=stop[0]).to(dtype)
    nudger_logits = kinds_of_rows(B, V, gen, special=stop[1]).to(dtype)
    nudger_logits[::3] = base_logits[::3]  # rows where the two models agree (b == n when greedy)
    cursors = [make_cursor(B, 4, 3, gen), make_cursor(B, 5, 5, gen)]
    return (None if mode == MODE_NUDGER_ONLY else base_logits,
            None if mode == MODE_BASE_ONLY else nudger_logits, state, cursors)


# (V, dtype, mode, gate, word_level, temperature, top_p)
GATE_TABLE = [
    (37, torch.float32, MODE_NUDGING, GATE_TOP_PROB, True, 0.0, 1.0),
    (37, torch.bfloat16, MODE_NUDGING, GATE_ENTROPY, True, 0.7, 0.8),
    (37, torch.float16, MODE_NUDGING, GATE_ENTROPY, False, 0.7, 1.0),
    (37, torch.float32, MODE_BASE_ONLY, GATE_TOP_PROB, False, 0.7, 0.8),
    (37, torch.bfloat16, MODE_NUDGER_ONLY, GATE_TOP_PROB, True, 0.0, 1.0),
    (1000, torch.bfloat16, MODE_NUDGING, GATE_TOP_PROB, True, 0.7, 1.0),
    (1000, torch.float32, MODE_NUDGING, GATE_TOP_PROB, False, 0.0, 1.0),
    (1000, torch.float32, MODE_NUDGER_ONLY, GATE_ENTROPY, False, 0.7, 1.0),
    (1000, torch.bfloat16, MODE_BASE_ONLY, GATE_TOP_PROB, False, 0.0, 1.0),
    (4099, torch.float32, MODE_NUDGING, GATE_ENTROPY, True, 0.0, 1.0),
    (4099, torch.bfloat16, MODE_NUDGING, GATE_TOP_PROB, True, 0.7, 0.8),
    (49152, torch.bfloat16, MODE_NUDGING, GATE_TOP_PROB, True, 0.0, 1.0),
    (49152, torch.float32, MODE_NUDGING, GATE_ENTROPY, True, 0.8, 0.9),
    (49152, torch.float16, MODE_NUDGING, GATE_TOP_PROB, False, 1.0, 1.0),
]


@pytest.mark.parametrize("V,dtype,mode,gate,word,temperature,top_p", GATE_TABLE)
def test_nudge_step_matches_reference(V, dtype, mode, gate, word, temperature, top_p):
    for seed in range(3):
        base_logits, nudger_logits, state, cursors = gate_case(V, dtype, mode, seed)
        prm = apply(state, Cfg(mode, gate, 0.4 if gate == GATE_TOP_PROB else 1.5, word, temperature, top_p, 6))
        want_state, want_cursors = clone(state), [clone(c) for c in cursors]
        before, cursors_before = clone(state), [clone(c) for c in cursors]
        nudge_step_ref(base_logits, nudger_logits, want_state, apply(want_state, prm), *want_cursors)
        nudge_step_native(base_logits, nudger_logits, state, apply(state, prm), *cursors)
        assert_same(state, want_state, "state")
        for c, w in zip(cursors, want_cursors):
            assert_same(c, w, "cursor")
        # Re-stated: finished rows are untouched; running rows emitted a token or finished.
        done = before.finished != FINISH_NONE
        for k, v in vars(before).items():
            if isinstance(v, torch.Tensor) and v.shape[:1] == done.shape:
                assert torch.equal(getattr(state, k)[done], v[done]), k
        for c, cb in zip(cursors, cursors_before):
            assert torch.equal(c.positions[done], cb.positions[done])
        running = ~done
        assert ((state.n_out[running] == before.n_out[running] + 1) | (state.finished[running] == FINISH_STOP)).all()


def test_nudge_step_without_cursors_and_with_one():
    base_logits, nudger_logits, state, cursors = gate_case(1000, torch.float32, MODE_NUDGING, 4)
    prm = Cfg(MODE_NUDGING, GATE_TOP_PROB, 0.4, True, 0.7, 1.0, 6)
    for chosen in ([None, None], [cursors[0], None], [None, cursors[1]]):
        s, w = clone(state), clone(state)
        got_c = [None if c is None else clone(c) for c in chosen]
        want_c = [None if c is None else clone(c) for c in chosen]
        nudge_step_ref(base_logits, nudger_logits, w, apply(w, prm), *want_c)
        nudge_step_native(base_logits, nudger_logits, s, apply(s, prm), *got_c)
        assert_same(s, w, "state")
        for g, c in zip(got_c, want_c):
            if c is not None:
                assert_same(g, c, "cursor")


# (word_state, span, confident, b, n) -> (emitted or None for a stop, from_nudger, word_state, span)
STOP_ID, WS_YES, WS_NO = 5, 12, 13  # even ids are word starts here
WORD_RULES = [
    ("BASE stays BASE", (STATE_BASE, 4, True, 10, WS_YES), (10, 0, STATE_BASE, 4)),
    ("BASE -> NUDGE, unconfident", (STATE_BASE, 4, False, 10, WS_YES), (WS_YES, 1, STATE_NUDGE, 1)),
    ("BASE -> NUDGE, b is a stop", (STATE_BASE, 4, True, STOP_ID, WS_YES), (WS_YES, 1, STATE_NUDGE, 1)),
    ("NUDGE -> BASE, confident", (STATE_NUDGE, 2, True, 10, WS_YES), (10, 0, STATE_BASE, 2)),
    ("NUDGE -> BASE, b == n", (STATE_NUDGE, 2, False, WS_YES, WS_YES), (WS_YES, 0, STATE_BASE, 2)),
    ("span 0 keeps NUDGE", (STATE_NUDGE, 0, True, 10, WS_YES), (WS_YES, 1, STATE_NUDGE, 1)),
    ("n not a word start", (STATE_NUDGE, 2, True, 10, WS_NO), (WS_NO, 1, STATE_NUDGE, 3)),
    ("n past the word table", (STATE_NUDGE, 2, True, 10, 35), (35, 1, STATE_NUDGE, 3)),
    ("n is a stop", (STATE_NUDGE, 2, False, 10, STOP_ID), (None, 1, STATE_NUDGE, 3)),
]


@pytest.mark.parametrize("gate", [GATE_TOP_PROB, GATE_ENTROPY])
def test_word_rule_transitions(gate):
    """Greedy rows built to hit each transition of DESIGN section 1, checked against the rule itself."""
    B, V = len(WORD_RULES) + 1, 37
    gen = torch.Generator().manual_seed(0)
    state = make_state(B, V, 6, gen, stop=(STOP_ID, 30), finished_every=B)  # the last row is finished
    state.word_start = torch.tensor([i % 2 == 0 for i in range(34)])
    state.n_out.zero_()
    base_logits, nudger_logits = torch.zeros(B, V), torch.zeros(B, V)
    for i, (_, (ws, span, confident, b, n), _) in enumerate(WORD_RULES):
        state.word_state[i], state.span[i] = ws, span
        base_logits[i, b] = 30.0 if confident else 1.0  # p ~ 1 and H ~ 0, or p = 0.07 and H = 3.5 nats
        nudger_logits[i, n] = 30.0
    cursor = make_cursor(B, 4, 3, gen)
    prm = Cfg(MODE_NUDGING, gate, 0.4 if gate == GATE_TOP_PROB else 1.0, True, 0.0, 1.0, 6)
    before, cursor_before = clone(state), clone(cursor)
    nudge_step_native(base_logits, nudger_logits, state, apply(state, prm), cursor, None)
    for i, (name, _, (token, from_n, ws, span)) in enumerate(WORD_RULES):
        assert (int(state.word_state[i]), int(state.span[i])) == (ws, span), name
        if token is None:
            assert int(state.finished[i]) == FINISH_STOP and int(state.n_out[i]) == 0, name
            assert int(cursor.positions[i]) == int(cursor_before.positions[i]), name
        else:
            assert (int(state.out_tokens[i, 0]), int(state.out_from_nudger[i, 0])) == (token, from_n), name
            assert int(state.n_nudged[i]) == int(before.n_nudged[i]) + from_n, name
            pos = int(cursor_before.positions[i]) + 1
            assert int(cursor.input_ids[i]) == token and int(cursor.positions[i]) == pos, name
            assert int(cursor.slot_mapping[i]) == int(cursor.block_tables[i, pos // 3]) * 3 + pos % 3, name
    assert torch.equal(state.out_tokens[-1], before.out_tokens[-1]) and int(cursor.positions[-1]) == int(
        cursor_before.positions[-1])


@pytest.mark.parametrize("word,temperature,top_p", [(True, 0.7, 1.0), (False, 0.0, 1.0), (True, 0.9, 0.85)])
def test_thirty_steps_match_reference(word, temperature, top_p):
    """Steps chained on the same state (n_out, the RNG step and the cursors all advance), until
    rows stop or reach max_new_tokens."""
    B, V, steps = 6, 50, 30
    gen = torch.Generator().manual_seed(5)
    state = make_state(B, V, steps, gen, stop=(3, 44), finished_every=6)
    state.word_state.fill_(STATE_NUDGE)
    state.span.zero_()
    state.n_out.zero_()
    cursors = [make_cursor(B, 12, 3, gen), make_cursor(B, 12, 4, gen)]
    prm = Cfg(MODE_NUDGING, GATE_TOP_PROB, 0.35, word, temperature, top_p, steps)
    want_state, want_cursors = clone(state), [clone(c) for c in cursors]
    for _ in range(steps):
        base_logits = torch.randn(B, V, generator=gen) * torch.empty(B, 1).uniform_(0.5, 5.0, generator=gen)
        nudger_logits = torch.randn(B, V, generator=gen) * 3
        nudger_logits[:, [3, 44]] -= 4.0  # stop ids are rare but reachable
        nudge_step_native(base_logits, nudger_logits, state, apply(state, prm), *cursors)
        nudge_step_ref(base_logits, nudger_logits, want_state, apply(want_state, prm), *want_cursors)
    assert_same(state, want_state, "state")
    for c, w in zip(cursors, want_cursors):
        assert_same(c, w, "cursor")
    assert 0 < int(state.n_nudged.sum()) < int(state.n_out.sum())  # both models wrote
    assert (state.finished[:-1] != FINISH_NONE).all()  # every running row ended
    assert (state.finished == FINISH_LENGTH).any() or (state.finished == FINISH_STOP).sum() > 1


def test_nudge_step_rejects_bad_input():
    base_logits, nudger_logits, state, cursors = gate_case(37, torch.float32, MODE_NUDGING, 0)
    prm = apply(state, Cfg(MODE_NUDGING, GATE_TOP_PROB, 0.4, True, 0.0, 1.0, 6))
    with pytest.raises(ValueError, match="nudger_logits"):
        nudge_step_native(base_logits, None, state, apply(state, prm), *cursors)
    with pytest.raises(ValueError, match="max_sample"):
        nudge_step_native(base_logits, nudger_logits, state, GateParams(MODE_NUDGING, 5), *cursors)
    with pytest.raises(ValueError, match="rows"):
        nudge_step_native(base_logits[:3], nudger_logits, state, apply(state, prm), *cursors)
    # The raw op checks what memory safety needs, whoever calls it.
    args = [base_logits, nudger_logits, state.seed, state.word_state, state.span, state.finished,
            state.n_out.long(), state.n_nudged, state.out_tokens, state.out_from_nudger, state.stop_ids,
            state.word_start, state.gate, state.threshold, state.word_level, state.inv_temp, state.top_p,
            state.sample_mode, state.max_new, None, None, None, None, None, 1, None, None, None, None, None, 1,
            MODE_NUDGING, 2]
    with pytest.raises(TypeError, match="n_out"):
        OPS.nudge_step(*args)
    args[6] = state.n_out
    args[10] = state.stop_ids[0]  # stop ids are per row
    with pytest.raises(ValueError, match="stop_ids"):
        OPS.nudge_step(*args)
    args[10] = state.stop_ids
    args[13] = state.threshold.double()
    with pytest.raises(TypeError, match="threshold"):
        OPS.nudge_step(*args)
    args[13] = state.threshold
    args[17] = torch.full_like(state.sample_mode, 3)  # a sampler that does not exist
    with pytest.raises(ValueError, match="sample_mode"):
        OPS.nudge_step(*args)
    args[17] = state.sample_mode
    args[19] = cursors[0].input_ids  # a cursor must come whole
    with pytest.raises(ValueError, match="cursor needs all"):
        OPS.nudge_step(*args)




@pytest.mark.parametrize("V,dtype,mode", [(37, torch.float32, MODE_NUDGING), (1000, torch.bfloat16, MODE_NUDGING),
                                          (37, torch.float16, MODE_BASE_ONLY), (1000, torch.float32, MODE_NUDGER_ONLY)])
def test_mixed_rows_match_reference_and_solo_rows(V, dtype, mode):
    """One batch whose rows all differ equals the reference, and each row equals itself run alone."""
    B = len(MIXED_ROWS)
    base_logits, nudger_logits, state, cursors = gate_case(V, dtype, mode, 1, B=B, max_new=9)
    cfgs = [Cfg(mode, *r) for r in MIXED_ROWS]
    state.stop_ids = torch.full((B, 3), -1, dtype=torch.int64)
    gen = torch.Generator().manual_seed(V)
    for i, c in enumerate(cfgs):
        stops = torch.randperm(V, generator=gen)[: i % 4].tolist()
        state.stop_ids[i, :len(stops)] = torch.tensor(stops, dtype=torch.int64)
        state.n_out[i] = c.max_new_tokens - 1 if i % 3 == 0 else min(int(state.n_out[i]), c.max_new_tokens - 1)
    prm = apply(state, cfgs)
    for steps in range(3):  # chained: rows end at their own max_new
        want_state, want_cursors = clone(state), [clone(c) for c in cursors]
        solo = []
        for i, c in enumerate(cfgs):
            one, one_c = row_of(state, i), [row_of(cur, i) for cur in cursors]
            nudge_step_native(None if base_logits is None else base_logits[i:i + 1],
                              None if nudger_logits is None else nudger_logits[i:i + 1], one, apply(one, c), *one_c)
            solo.append((one, one_c))
        nudge_step_ref(base_logits, nudger_logits, want_state, apply(want_state, prm), *want_cursors)
        nudge_step_native(base_logits, nudger_logits, state, apply(state, prm), *cursors)
        assert_same(state, want_state, "state")
        for c, w in zip(cursors, want_cursors):
            assert_same(c, w, "cursor")
        for i, (one, one_c) in enumerate(solo):
            assert_same(row_of(state, i), one, f"row {i}")
            for c, w in zip(cursors, one_c):
                assert_same(row_of(c, i), w, f"row {i} cursor")
    assert (state.finished == FINISH_LENGTH).any() and (state.finished == FINISH_NONE).any()


@pytest.mark.parametrize("V,dtype", [(37, torch.float32), (3001, torch.bfloat16)])
def test_sample_rows_match_reference(V, dtype):
    settings = [(0.0, 1.0), (0.7, 1.0), (0.7, 0.8), (1.3, 0.95), (0.3, 0.5), (2.0, 1.0), (0.9, 0.3)]
    B = len(settings)
    gen = torch.Generator().manual_seed(V)
    logits = (torch.randn(B, V, generator=gen) * 4).to(dtype)
    seed = torch.randint(-(2**62), 2**62, (B,), generator=gen)
    step = torch.randint(0, 50, (B,), generator=gen, dtype=torch.int32)
    inv = torch.tensor([inverse_temperature(t) for t, _ in settings], dtype=torch.float32)
    top_p = torch.tensor([p for _, p in settings], dtype=torch.float32)
    mode = torch.tensor([sample_mode(t, p) for t, p in settings], dtype=torch.int32)
    for stream in (0, 1):
        got = sample_rows_native(logits, seed, step, stream, inv, top_p, mode)
        assert torch.equal(got, sample_rows_ref(logits, seed, step, stream, inv, top_p, mode))
        for r, (t, p) in enumerate(settings):  # each row as the single-parameter sampler draws it
            assert int(got[r]) == int(sample_native(logits[r:r + 1], seed[r:r + 1], step[r:r + 1], stream, t, p))
    # max_sample clamps every row's sampler: GREEDY gives the argmax everywhere
    greedy = sample_rows_native(logits, seed, step, 0, inv, top_p, mode, 0)
    assert torch.equal(greedy, logits.float().argmax(-1))
    with pytest.raises(ValueError, match="mode"):
        sample_rows_native(logits, seed, step, 0, inv, top_p, mode[:2])


# ----------------------------------------------------------------------------------------------
# rms_norm: x / sqrt(mean(x^2) + eps) * w over the last dimension, float32; equals F.rms_norm up to
# float32 summation order: |error| <= 2e-6 * max|y| (a few ulps).
# ----------------------------------------------------------------------------------------------

# (shape, weight?, contiguous?): decode rows, per-head q/k norms (a strided view), odd widths below
# and across one 8-float vector, a prefill chunk
RMS_CASES = [((1, 576), True, True), ((3, 9, 64), True, False), ((5, 7), True, True), ((4, 13), False, True),
             ((130, 640), True, True), ((2, 3, 256), False, False)]


@pytest.mark.parametrize("shape, with_weight, contiguous", RMS_CASES)
def test_rms_norm_equals_torch(shape, with_weight, contiguous):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen) * 3
    x = x[..., ::2] if not contiguous else x[..., :shape[-1]].contiguous()
    w = torch.randn(shape[-1], generator=gen) if with_weight else None
    got = OPS.rms_norm(x, w, 1e-6)
    want = torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-6)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 2e-6 * want.abs().max()
    assert torch.equal(Backend("native").rms_norm(x, w, 1e-6), got)


def test_rms_norm_rejects_bad_inputs():
    with pytest.raises(TypeError, match="float32"):
        OPS.rms_norm(torch.randn(2, 8, dtype=torch.bfloat16), None, 1e-6)
    with pytest.raises(TypeError, match="weight must be float32"):
        OPS.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    # other dtypes go to torch's rms_norm through the backend
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert torch.equal(Backend("native").rms_norm(x, None, 1e-6), torch.nn.functional.rms_norm(x, (8,), None, 1e-6))
