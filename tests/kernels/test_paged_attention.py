"""Paged decode and prefill attention: Triton (interpreter on CPU) vs reference vs a dense oracle.

Expectations re-stated: position p of row b lives at page block_tables[b, p // page_size], offset
p % page_size. A query at position p attends to keys at positions k <= p, with k > p - window when
window > 0; scores = (q . k) * scale, then softcap * tanh(scores / softcap) when softcap > 0;
softmax in fp32 (the oracle uses fp64); query head h reads kv head h // (Hq // Hkv). Decode: the
query is at seq_len - 1; rows with seq_len 0 give zeros. Prefill: the q_len queries of a row are its
last q_len positions; rows with q_len 0 give nothing.

Tolerances (max abs error on outputs of magnitude ~1): fp32 1e-5; fp16 5e-3; bf16 3e-2 (the kernel
rounds the softmax weights to the input dtype before the P @ V product, like flash attention).
"""
import math

import pytest
import torch

from nudgefast.kernels.paged_decode_attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
)
from nudgefast.kernels.paged_prefill_attention import (
    paged_prefill_attention,
    paged_prefill_attention_ref,
)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = list(TOLERANCE)
GARBAGE = 1e3  # stored in page slots past every row's end: any leak into an output is visible


def make_cache(seq_lens, n_kv_heads, head_dim, page_size, dtype, seed):
    """Pages in shuffled order (non-contiguous, non-monotonic block tables) plus spare pages.

    Unused block-table entries hold -1: an implementation that dereferences them fails. Slots
    past a row's end hold GARBAGE (finite, so the reference's masking by score still works).
    """
    gen = torch.Generator().manual_seed(seed)
    pages_per_row = [math.ceil(n / page_size) for n in seq_lens]
    num_pages = sum(pages_per_row) + 3
    width = max(pages_per_row, default=0) + 1
    shape = (num_pages, page_size, n_kv_heads, head_dim)
    k_pages = torch.full(shape, GARBAGE)
    v_pages = torch.full(shape, GARBAGE)
    block_tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    order = torch.randperm(num_pages, generator=gen).tolist()
    for b, (n, count) in enumerate(zip(seq_lens, pages_per_row)):
        ids = [order.pop() for _ in range(count)]
        block_tables[b, :count] = torch.tensor(ids, dtype=torch.int32)
        for pos in range(n):
            page, offset = ids[pos // page_size], pos % page_size
            k_pages[page, offset] = torch.randn(n_kv_heads, head_dim, generator=gen)
            v_pages[page, offset] = torch.randn(n_kv_heads, head_dim, generator=gen)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    return k_pages.to(dtype), v_pages.to(dtype), block_tables, seq_lens


def oracle(q, k_pages, v_pages, block_tables, seq_len, row, q_positions, scale, window, softcap):
    """Dense attention of one row in fp64: K/V rebuilt position by position, mask built in Python."""
    page_size = k_pages.shape[1]
    n_q_heads, n_kv_heads = q.shape[1], k_pages.shape[2]
    group = n_q_heads // n_kv_heads
    keys = torch.stack([k_pages[block_tables[row, p // page_size], p % page_size]
                        for p in range(seq_len)]).double()  # [seq_len, Hkv, D]
    values = torch.stack([v_pages[block_tables[row, p // page_size], p % page_size]
                          for p in range(seq_len)]).double()
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, qp in enumerate(q_positions):
        allowed = [p for p in range(seq_len) if p <= qp and (window == 0 or p > qp - window)]
        for h in range(n_q_heads):
            scores = keys[allowed, h // group] @ q[i, h].double() * scale
            if softcap > 0:
                scores = softcap * torch.tanh(scores / softcap)
            out[i, h] = torch.softmax(scores, dim=0) @ values[allowed, h // group]
    return out


def assert_close(got, want, dtype):
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TOLERANCE[dtype], f"max abs error {err:.3g} > {TOLERANCE[dtype]} for {dtype}"


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------

# (name, seq_lens, Hq, Hkv, head_dim, page_size, window, softcap, q_gain). q_gain scales q so that
# scores are large enough for softcap and the softmax to be far from uniform.
DECODE_CASES = [
    ("mha_odd_dim_partial_pages", [9, 1, 23], 2, 2, 24, 5, 0, 0.0, 1.0),
    ("gqa4_page12", [33, 16, 7, 12], 8, 2, 40, 12, 0, 0.0, 2.0),
    ("gqa3_window", [30, 8, 21], 9, 3, 64, 16, 7, 0.0, 2.0),
    ("softcap50", [20, 11], 4, 1, 32, 6, 0, 50.0, 8.0),
    ("window_and_softcap", [26, 3], 6, 2, 24, 5, 5, 20.0, 6.0),
    ("padding_rows", [0, 14, 0, 5], 4, 4, 16, 3, 0, 0.0, 1.0),
    ("window_wider_than_context", [10, 4], 3, 1, 24, 4, 64, 0.0, 2.0),
    ("page_size_one_tiny_dim", [6, 3], 2, 1, 8, 1, 0, 0.0, 1.0),
    ("long_rows_for_splits", [150, 70, 0, 129], 4, 2, 24, 7, 0, 0.0, 2.0),
    # Power-of-two pages of >= 16 slots are read one page-aligned tile at a time (the GPU layout):
    # rows ending mid-page, a window starting mid-page, splits, odd and full head dims.
    ("paged16_gqa2_rows_end_mid_page", [150, 33, 0, 64], 4, 2, 32, 16, 0, 0.0, 2.0),
    ("paged32_window_softcap_odd_dim", [70, 5, 96], 6, 3, 24, 32, 19, 30.0, 6.0),
    ("paged64_window_wider_than_tile", [200, 130], 2, 1, 16, 64, 90, 0.0, 2.0),
]


def decode_inputs(case, dtype, seed=0):
    _, seq_lens, n_q_heads, n_kv_heads, head_dim, page_size, window, softcap, gain = case
    k_pages, v_pages, block_tables, lens = make_cache(seq_lens, n_kv_heads, head_dim, page_size,
                                                      dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = (gain * torch.randn(len(seq_lens), n_q_heads, head_dim, generator=gen)).to(dtype)
    return q, k_pages, v_pages, block_tables, lens, head_dim ** -0.5, window, softcap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_reference_matches_oracle(case, dtype):
    q, k_pages, v_pages, block_tables, lens, scale, window, softcap = decode_inputs(case, dtype)
    got = paged_decode_attention_ref(q, k_pages, v_pages, block_tables, lens, scale, window, softcap)
    assert got.shape == q.shape and got.dtype == dtype
    for b, n in enumerate(lens.tolist()):
        if n == 0:
            assert torch.equal(got[b], torch.zeros_like(got[b]))  # padding row: zeros, not NaN
            continue
        want = oracle(q[b:b + 1], k_pages, v_pages, block_tables, n, b, [n - 1], scale, window,
                      softcap)
        assert_close(got[b:b + 1], want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_triton_matches_reference(case, dtype):
    args = decode_inputs(case, dtype)
    want = paged_decode_attention_ref(*args)
    # num_splits 3 splits the longer rows across programs (the flash-decoding merge path).
    for num_splits in (1, 3):
        got = paged_decode_attention(*args, num_splits=num_splits)
        assert got.shape == want.shape and got.dtype == dtype
        assert_close(got, want, dtype)
        padding = args[4] == 0
        assert torch.equal(got[padding], torch.zeros_like(got[padding]))


def test_decode_window_and_softcap_change_the_result():
    # Guards the cases above against being vacuous: the rules under test must matter there.
    q, k_pages, v_pages, block_tables, lens, scale, window, softcap = decode_inputs(
        DECODE_CASES[4], torch.float32)
    full = paged_decode_attention_ref(q, k_pages, v_pages, block_tables, lens, scale, window,
                                      softcap)
    for w, c in ((0, softcap), (window, 0.0)):
        other = paged_decode_attention_ref(q, k_pages, v_pages, block_tables, lens, scale, w, c)
        assert (other - full).abs().max() > 1e-2


def test_decode_equal_lengths_match_mixed_lengths():
    # The reference slices instead of masking when all rows have one length: both paths agree.
    q, k_pages, v_pages, block_tables, lens, scale, window, softcap = decode_inputs(
        ("same", [19, 19, 19], 6, 2, 24, 5, 6, 0.0, 2.0), torch.float32)
    together = paged_decode_attention_ref(q, k_pages, v_pages, block_tables, lens, scale, window)
    for b in range(3):
        alone = paged_decode_attention_ref(q[b:b + 1], k_pages, v_pages, block_tables[b:b + 1],
                                           lens[b:b + 1], scale, window)
        assert_close(alone, together[b:b + 1], torch.float32)
    mixed = lens.clone()
    mixed[1] = 0  # forces the masked path
    masked = paged_decode_attention_ref(q, k_pages, v_pages, block_tables, mixed, scale, window)
    assert_close(masked[[0, 2]], together[[0, 2]], torch.float32)


@pytest.mark.parametrize("pool_layout", ["contiguous", "interleaved_kv"])
def test_references_read_consecutive_pages_like_shuffled_ones(pool_layout):
    # The references read one row with consecutive page ids as a view of the pool (no gather):
    # same results as the gathered, shuffled layout, for a contiguous or a strided pool.
    q, k_pages, v_pages, block_tables, lens, scale, _, _ = decode_inputs(
        ("one_row", [23], 4, 2, 24, 5, 0, 0.0, 2.0), torch.float32)
    n_pages = math.ceil(23 / 5)
    used = block_tables[0, :n_pages].long()
    k_seq = torch.cat([k_pages[:2], k_pages[used], k_pages[:1]])  # pages 2..6 hold the row
    v_seq = torch.cat([v_pages[:2], v_pages[used], v_pages[:1]])
    if pool_layout == "interleaved_kv":
        pool = torch.stack([k_seq, v_seq], dim=1)
        k_seq, v_seq = pool[:, 0], pool[:, 1]
    tables = torch.arange(2, 2 + n_pages, dtype=torch.int32).view(1, n_pages)
    for window in (0, 7):
        want = paged_decode_attention_ref(q, k_pages, v_pages, block_tables, lens, scale, window)
        got = paged_decode_attention_ref(q, k_seq, v_seq, tables, lens, scale, window)
        assert_close(got, want, torch.float32)
    chunk = torch.randn(23, 4, 24)
    for q_len in (23, 4):
        cu = torch.tensor([0, q_len], dtype=torch.int32)
        want = paged_prefill_attention_ref(chunk[:q_len], k_pages, v_pages, block_tables, lens, cu,
                                           scale)
        got = paged_prefill_attention_ref(chunk[:q_len], k_seq, v_seq, tables, lens, cu, scale)
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("impl", [paged_decode_attention, paged_decode_attention_ref],
                         ids=["triton", "ref"])
def test_decode_rejects_bad_input(impl):
    q, k_pages, v_pages, block_tables, lens, scale, _, _ = decode_inputs(DECODE_CASES[1],
                                                                         torch.float32)
    with pytest.raises(TypeError, match="block_tables"):
        impl(q, k_pages, v_pages, block_tables.float(), lens, scale)
    with pytest.raises(TypeError, match="dtype"):
        impl(q.half(), k_pages, v_pages, block_tables, lens, scale)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        impl(q[:, :3], k_pages, v_pages, block_tables, lens, scale)
    with pytest.raises(ValueError, match="window"):
        impl(q, k_pages, v_pages, block_tables, lens, scale, window=-1)
    with pytest.raises(ValueError, match="softcap"):
        impl(q, k_pages, v_pages, block_tables, lens, scale, softcap=-1.0)
    with pytest.raises(ValueError, match="rows"):
        impl(q[:2], k_pages, v_pages, block_tables, lens, scale)


def test_decode_reference_rejects_rows_longer_than_their_block_table():
    q, k_pages, v_pages, block_tables, lens, scale, _, _ = decode_inputs(DECODE_CASES[0],
                                                                         torch.float32)
    too_long = lens.clone()
    too_long[0] = block_tables.shape[1] * k_pages.shape[1] + 1
    with pytest.raises(ValueError, match="block_tables holds only"):
        paged_decode_attention_ref(q, k_pages, v_pages, block_tables, too_long, scale)


# ----------------------------------------------------------------------------------------------
# Prefill / verify
# ----------------------------------------------------------------------------------------------

# (name, seq_lens, q_lens, Hq, Hkv, head_dim, page_size, window, softcap, q_gain)
PREFILL_CASES = [
    ("full_prompts_mha", [9, 17], [9, 17], 2, 2, 24, 5, 0, 0.0, 1.0),
    ("chunks_mid_sequence_gqa4", [30, 21, 12], [5, 21, 1], 8, 2, 40, 12, 0, 0.0, 2.0),
    ("q_len_zero_rows_gqa3", [10, 25, 7, 0], [0, 6, 0, 0], 9, 3, 24, 5, 0, 0.0, 2.0),
    ("verify_chunks_window", [40, 33, 18], [5, 5, 5], 6, 2, 32, 16, 9, 0.0, 2.0),
    ("long_chunk_window_softcap", [37, 8], [29, 3], 4, 1, 40, 6, 11, 30.0, 6.0),
    ("softcap50_page12", [26, 13], [4, 13], 4, 2, 24, 12, 0, 50.0, 8.0),
    ("page_size_one_tiny_dim", [7, 4], [3, 4], 3, 1, 8, 1, 2, 0.0, 1.0),
    # page-aligned tiles (see DECODE_CASES): a prompt crossing pages, verify chunks, window mid-page
    ("paged16_prompt_and_verify_gqa2", [45, 70, 17], [45, 5, 5], 4, 2, 32, 16, 0, 0.0, 2.0),
    ("paged32_window_softcap_odd_dim", [75, 40], [9, 40], 6, 3, 24, 32, 21, 30.0, 6.0),
]


def prefill_inputs(case, dtype, seed=0):
    _, seq_lens, q_lens, n_q_heads, n_kv_heads, head_dim, page_size, window, softcap, gain = case
    k_pages, v_pages, block_tables, lens = make_cache(seq_lens, n_kv_heads, head_dim, page_size,
                                                      dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    cu_q_lens = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = (gain * torch.randn(sum(q_lens), n_q_heads, head_dim, generator=gen)).to(dtype)
    return (q, k_pages, v_pages, block_tables, lens, cu_q_lens, head_dim ** -0.5, window, softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
def test_prefill_reference_matches_oracle(case, dtype):
    q, k_pages, v_pages, block_tables, lens, cu, scale, window, softcap = prefill_inputs(case, dtype)
    got = paged_prefill_attention_ref(q, k_pages, v_pages, block_tables, lens, cu, scale, window,
                                      softcap)
    assert got.shape == q.shape and got.dtype == dtype
    cu, lens = cu.tolist(), lens.tolist()
    for b, n in enumerate(lens):
        q_len = cu[b + 1] - cu[b]
        if q_len == 0:
            continue
        positions = list(range(n - q_len, n))
        want = oracle(q[cu[b]:cu[b + 1]], k_pages, v_pages, block_tables, n, b, positions, scale,
                      window, softcap)
        assert_close(got[cu[b]:cu[b + 1]], want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
def test_prefill_triton_matches_reference(case, dtype):
    args = prefill_inputs(case, dtype)
    want = paged_prefill_attention_ref(*args)
    max_q_len = max(case[2])
    for given in (None, max_q_len):
        got = paged_prefill_attention(*args, max_q_len=given)
        assert got.shape == want.shape and got.dtype == dtype
        assert_close(got, want, dtype)


def test_prefill_of_one_token_is_decode():
    # A one-token chunk per row is exactly a decode step.
    q, k_pages, v_pages, block_tables, lens, scale, window, softcap = decode_inputs(
        DECODE_CASES[4], torch.float32)
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    for prefill, decode in ((paged_prefill_attention_ref, paged_decode_attention_ref),
                            (paged_prefill_attention, paged_decode_attention)):
        got = prefill(q, k_pages, v_pages, block_tables, lens, cu, scale, window, softcap)
        want = decode(q, k_pages, v_pages, block_tables, lens, scale, window, softcap)
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("impl", [paged_prefill_attention, paged_prefill_attention_ref],
                         ids=["triton", "ref"])
def test_prefill_all_rows_empty(impl):
    q, k_pages, v_pages, block_tables, lens, _, scale, _, _ = prefill_inputs(PREFILL_CASES[0],
                                                                             torch.float32)
    cu = torch.zeros(3, dtype=torch.int32)
    out = impl(q[:0], k_pages, v_pages, block_tables, lens, cu, scale)
    assert out.shape == (0,) + q.shape[1:]


@pytest.mark.parametrize("impl", [paged_prefill_attention, paged_prefill_attention_ref],
                         ids=["triton", "ref"])
def test_prefill_rejects_bad_input(impl):
    q, k_pages, v_pages, block_tables, lens, cu, scale, _, _ = prefill_inputs(PREFILL_CASES[1],
                                                                             torch.float32)
    with pytest.raises(TypeError, match="cu_q_lens"):
        impl(q, k_pages, v_pages, block_tables, lens, cu.float(), scale)
    with pytest.raises(ValueError, match="cu_q_lens"):
        impl(q, k_pages, v_pages, block_tables, lens, cu[:-1], scale)
    with pytest.raises(TypeError, match="seq_lens"):
        impl(q, k_pages, v_pages, block_tables, lens.float(), cu, scale)


def test_prefill_reference_rejects_chunks_longer_than_their_row():
    q, k_pages, v_pages, block_tables, lens, cu, scale, _, _ = prefill_inputs(PREFILL_CASES[1],
                                                                             torch.float32)
    short = lens.clone()
    short[0] = 4  # the row's chunk has 5 queries
    with pytest.raises(ValueError, match="q_len 5 > seq_len 4"):
        paged_prefill_attention_ref(q, k_pages, v_pages, block_tables, short, cu, scale)


# ----------------------------------------------------------------------------------------------
# GPU: real model shapes, bf16
# ----------------------------------------------------------------------------------------------

GPU_MODELS = [("olmo2_7b", 32, 32, 128), ("llama3_8b", 32, 8, 128)]


def _gpu_cache(n_kv_heads, seq_lens, page_size=16, seed=0):
    """Random bf16 pages on the GPU with shuffled block tables (no per-position loop)."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_row = [math.ceil(n / page_size) for n in seq_lens]
    width = max(pages_per_row) + 2
    num_pages = len(seq_lens) * width + 5
    shape = (num_pages, page_size, n_kv_heads, 128)
    k_pages = torch.randn(shape, generator=gen).to(torch.bfloat16).cuda()
    v_pages = torch.randn(shape, generator=gen).to(torch.bfloat16).cuda()
    ids = torch.randperm(num_pages, generator=gen)[:len(seq_lens) * width]
    block_tables = ids.view(len(seq_lens), width).to(torch.int32).cuda()
    return k_pages, v_pages, block_tables, torch.tensor(seq_lens, dtype=torch.int32).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("window", [0, 256])
@pytest.mark.parametrize("model", GPU_MODELS, ids=[m[0] for m in GPU_MODELS])
def test_decode_gpu_real_shapes(model, window):
    _, n_q_heads, n_kv_heads, head_dim = model
    seq_lens = [1000, 1237, 1500, 1024, 1111, 1402, 1003, 1499]  # batch 8
    k_pages, v_pages, block_tables, lens = _gpu_cache(n_kv_heads, seq_lens)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(8, n_q_heads, head_dim, generator=gen).to(torch.bfloat16).cuda()
    args = (q, k_pages, v_pages, block_tables, lens, head_dim ** -0.5, window)
    want = paged_decode_attention_ref(*args)
    for num_splits in (None, 1, 7):  # None: the automatic split-K choice
        assert_close(paged_decode_attention(*args, num_splits=num_splits), want, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("model", GPU_MODELS, ids=[m[0] for m in GPU_MODELS])
def test_verify_chunk_gpu_real_shapes(model):
    _, n_q_heads, n_kv_heads, head_dim = model
    seq_lens = [1005, 1237, 1500, 1024, 1111, 1402, 1003, 1499]
    k_pages, v_pages, block_tables, lens = _gpu_cache(n_kv_heads, seq_lens)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(8 * 5, n_q_heads, head_dim, generator=gen).to(torch.bfloat16).cuda()
    cu = torch.arange(0, 41, 5, dtype=torch.int32).cuda()
    args = (q, k_pages, v_pages, block_tables, lens, cu, head_dim ** -0.5)
    want = paged_prefill_attention_ref(*args)
    assert_close(paged_prefill_attention(*args, max_q_len=5), want, torch.bfloat16)
    assert_close(paged_prefill_attention(*args, softcap=50.0), paged_prefill_attention_ref(
        *args, softcap=50.0), torch.bfloat16)


@pytest.mark.gpu
def test_decode_gpu_replays_in_a_cuda_graph():
    # No host sync inside: the op captures, and a replay sees the new lengths written in place.
    k_pages, v_pages, block_tables, lens = _gpu_cache(8, [1000, 1200, 1100, 1300])
    q = torch.randn(4, 32, 128, device="cuda").to(torch.bfloat16)
    paged_decode_attention(q, k_pages, v_pages, block_tables, lens, 128 ** -0.5)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_pages, v_pages, block_tables, lens, 128 ** -0.5)
    lens.add_(7)
    graph.replay()
    want = paged_decode_attention_ref(q, k_pages, v_pages, block_tables, lens, 128 ** -0.5)
    assert_close(out, want, torch.bfloat16)
