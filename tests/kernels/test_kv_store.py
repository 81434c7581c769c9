"""store_kv: Triton (interpreter on CPU) and reference against a per-token loop oracle.

Expectations: token t lands in flat slot slot_mapping[t] = page * page_size + offset of both caches;
rows with a negative slot write nothing; every other cache entry keeps its old value. The op is a
copy, so every dtype must match bit for bit.
"""
import pytest
import torch

from nudgefast.kernels.kv_store import store_kv, store_kv_ref
from nudgefast.ops import native_ops_available

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (name, n_tokens, n_kv_heads, head_dim, page_size, num_pages, slot pattern)
# Slot patterns: "shuffled" = distinct random slots; "with_skips" = the same with some negative;
# "all_skipped" = every slot negative (nothing may change).
CASES = [
    ("decode_batch", 4, 2, 24, 5, 6, "shuffled"),
    ("prefill_with_padding", 13, 3, 40, 12, 4, "with_skips"),
    ("one_head_odd_dim", 7, 1, 20, 16, 3, "with_skips"),
    ("many_heads", 3, 9, 64, 16, 2, "shuffled"),
    ("page_size_one", 6, 2, 16, 1, 9, "with_skips"),
    ("all_skipped", 5, 2, 24, 5, 3, "all_skipped"),
]


def _slots(pattern, n_tokens, capacity, gen):
    slots = torch.randperm(capacity, generator=gen)[:n_tokens]
    if pattern == "with_skips":
        skip = torch.zeros(n_tokens, dtype=torch.bool)
        skip[::3] = True  # first row included, so skipping is always exercised
        slots[skip] = -1 - torch.arange(int(skip.sum()))  # not only -1: any negative skips
    elif pattern == "all_skipped":
        slots = torch.full((n_tokens,), -1)
    return slots.long()


def _oracle(k, v, k_pages, v_pages, slots):
    """One token at a time, through page and offset (not the flat view the implementations use)."""
    page_size = k_pages.shape[1]
    k_pages, v_pages = k_pages.clone(), v_pages.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            k_pages[slot // page_size, slot % page_size] = k[t]
            v_pages[slot // page_size, slot % page_size] = v[t]
    return k_pages, v_pages


def _make(n_tokens, n_kv_heads, head_dim, page_size, num_pages, pattern, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # k, v as strided views of a fused qkv-like buffer, as a model's projection would give them
    fused = torch.randn(n_tokens, 2 * n_kv_heads + 1, head_dim, generator=gen).to(dtype)
    k, v = fused[:, :n_kv_heads], fused[:, n_kv_heads:2 * n_kv_heads]
    k_pages = torch.randn(num_pages, page_size, n_kv_heads, head_dim, generator=gen).to(dtype)
    v_pages = torch.randn(num_pages, page_size, n_kv_heads, head_dim, generator=gen).to(dtype)
    return k, v, k_pages, v_pages, _slots(pattern, n_tokens, num_pages * page_size, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", [store_kv, store_kv_ref], ids=["triton", "ref"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_store_kv_matches_oracle(case, impl, dtype):
    _, n_tokens, n_kv_heads, head_dim, page_size, num_pages, pattern = case
    k, v, k_pages, v_pages, slots = _make(n_tokens, n_kv_heads, head_dim, page_size, num_pages,
                                          pattern, dtype)
    want_k, want_v = _oracle(k, v, k_pages, v_pages, slots)
    assert impl(k, v, k_pages, v_pages, slots) is None
    # Equality with the oracle's whole pool: written slots hold the rows, all others are unchanged.
    assert torch.equal(k_pages, want_k)
    assert torch.equal(v_pages, want_v)


@pytest.mark.parametrize("impl", [store_kv, store_kv_ref], ids=["triton", "ref"])
def test_store_kv_into_strided_pool(impl):
    # One pool holding K and V interleaved per page: k_pages/v_pages are non-contiguous views.
    k, v, _, _, slots = _make(9, 2, 24, 5, 4, "with_skips", torch.float32, seed=1)
    pool = torch.randn(4, 2, 5, 2, 24)
    k_pages, v_pages = pool[:, 0], pool[:, 1]
    want_k, want_v = _oracle(k, v, k_pages, v_pages, slots)
    impl(k, v, k_pages, v_pages, slots)
    assert torch.equal(pool[:, 0], want_k)
    assert torch.equal(pool[:, 1], want_v)


@pytest.mark.parametrize("impl", [store_kv, store_kv_ref], ids=["triton", "ref"])
def test_store_kv_no_tokens(impl):
    k_pages = torch.randn(2, 4, 1, 16)
    before = k_pages.clone()
    empty = torch.empty(0, 1, 16)
    impl(empty, empty, k_pages, k_pages, torch.empty(0, dtype=torch.long))
    assert torch.equal(k_pages, before)


def test_store_kv_without_interpreter_uses_reference(monkeypatch):
    import nudgefast.kernels.kv_store as mod

    calls = []
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(mod, "store_kv_ref", lambda *a: calls.append(a))
    k, v, k_pages, v_pages, slots = _make(3, 1, 16, 4, 2, "shuffled", torch.float32)
    mod.store_kv(k, v, k_pages, v_pages, slots)
    assert len(calls) == 1


@pytest.mark.parametrize("impl", [store_kv, store_kv_ref], ids=["triton", "ref"])
def test_store_kv_rejects_bad_input(impl):
    k, v, k_pages, v_pages, slots = _make(4, 2, 16, 4, 3, "shuffled", torch.float32)
    with pytest.raises(TypeError, match="slot_mapping"):
        impl(k, v, k_pages, v_pages, slots.int())
    with pytest.raises(TypeError, match="dtype"):
        impl(k.half(), v.half(), k_pages, v_pages, slots)
    with pytest.raises(ValueError, match="n_kv_heads, head_dim"):
        impl(k[:, :1], v[:, :1], k_pages, v_pages, slots)
    with pytest.raises(ValueError, match="k and v"):
        impl(k, v[:2], k_pages, v_pages, slots)


@pytest.mark.gpu
@pytest.mark.parametrize("n_kv_heads", [8, 32])
def test_store_kv_gpu_real_shapes(n_kv_heads):
    # Llama-3-8B (8 kv heads) and OLMo-2-7B (32) at head_dim 128, bf16: a prefill of 1000+ tokens
    # with padding rows, and a decode step of 8 rows.
    for n_tokens in (1037, 8):
        k, v, k_pages, v_pages, slots = _make(n_tokens, n_kv_heads, 128, 16, 80, "with_skips",
                                              torch.bfloat16)
        k, v, k_pages, v_pages, slots = (t.cuda() for t in (k, v, k_pages, v_pages, slots))
        ref_k, ref_v = k_pages.clone(), v_pages.clone()
        store_kv_ref(k, v, ref_k, ref_v, slots)
        store_kv(k, v, k_pages, v_pages, slots)
        torch.cuda.synchronize()
        assert torch.equal(k_pages, ref_k) and torch.equal(v_pages, ref_v)


# ----------------------------------------------------------------------------------------------
# RoPE fused into the store
# ----------------------------------------------------------------------------------------------
# Expectation re-stated: rotate-half RoPE, x * cos + cat(-x2, x1) * sin with cos/sin = cat(c, c),
# cat(s, s) at the token's position, each product and the sum rounded to the dtype (the model's
# torch ops); q is rotated in place, rotated k and plain v land in the token's slot. Bit-exact.

from nudgefast.kernels.kv_store import rope_cache, store_kv_rope, store_kv_rope_ref  # noqa: E402

# (name, n_tokens, n_q_heads, n_kv_heads, head_dim, page_size, num_pages, slot pattern)
ROPE_CASES = [
    ("decode_gqa4", 4, 8, 2, 32, 16, 3, "shuffled"),
    ("prefill_with_padding_mha", 13, 3, 3, 40, 12, 4, "with_skips"),
    ("odd_half_dim_gqa3", 5, 9, 3, 22, 5, 3, "with_skips"),
    ("all_skipped_q_still_rotates", 3, 4, 1, 16, 4, 2, "all_skipped"),
]


def _model_rotate(x, inv_freq, positions):
    """The model's per-step tables and rotation, verbatim (nudgefast.model.Transformer)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None, :], emb.sin().to(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _native_store_kv_rope(*args):
    return torch.ops.nudgefast.store_kv_rope(*args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", [store_kv_rope, store_kv_rope_ref, _native_store_kv_rope],
                         ids=["triton", "ref", "native"])
@pytest.mark.parametrize("case", ROPE_CASES, ids=[c[0] for c in ROPE_CASES])
def test_store_kv_rope_matches_the_model_ops(case, impl, dtype):
    if impl is _native_store_kv_rope:  # the C++ op (csrc/kv_store_rope.cpp): float32 models on the CPU
        if not native_ops_available():
            pytest.skip("native ops not built")
        if dtype != torch.float32:
            pytest.skip("the native op is float32 only (the model uses it for float32 only)")
    _, n_tokens, n_q, n_kv, head_dim, page_size, num_pages, pattern = case
    gen = torch.Generator().manual_seed(3)
    fused = (4 * torch.randn(n_tokens, n_q + 2 * n_kv, head_dim, generator=gen)).to(dtype)  # a qkv buffer
    q, k, v = fused[:, :n_q], fused[:, n_q:n_q + n_kv], fused[:, n_q + n_kv:]
    k_pages = torch.randn(num_pages, page_size, n_kv, head_dim, generator=gen).to(dtype)
    v_pages = torch.randn(num_pages, page_size, n_kv, head_dim, generator=gen).to(dtype)
    slots = _slots(pattern, n_tokens, num_pages * page_size, gen)
    positions = torch.randint(0, 3000, (n_tokens,), generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos, sin = rope_cache(inv_freq, 3000, dtype, "cpu")
    want_q = _model_rotate(q, inv_freq, positions)
    want_k, want_v = _oracle(_model_rotate(k, inv_freq, positions), v, k_pages, v_pages, slots)
    v_before = v.clone()
    impl(q, k, v, k_pages, v_pages, slots, positions, cos, sin)
    assert torch.equal(q, want_q)
    assert torch.equal(k_pages, want_k) and torch.equal(v_pages, want_v)
    assert torch.equal(v, v_before)


def test_store_kv_rope_rejects_bad_tables():
    q = torch.zeros(2, 4, 16)
    k = v = torch.zeros(2, 2, 16)
    pages = torch.zeros(2, 4, 2, 16)
    slots, positions = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    cos, sin = rope_cache(torch.ones(8), 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="tables"):
        store_kv_rope(q, k, v, pages, pages.clone(), slots, positions, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="even"):
        store_kv_rope(q[..., :15], k[..., :15], v[..., :15], pages[..., :15], pages[..., :15], slots, positions,
                      cos, sin)
    if native_ops_available():
        op = torch.ops.nudgefast.store_kv_rope
        with pytest.raises(ValueError, match="tables"):
            op(q, k, v, pages, pages.clone(), slots, positions, cos[:, :4], sin[:, :4])
        with pytest.raises(IndexError, match="outside the rope tables"):
            op(q, k, v, pages, pages.clone(), slots, torch.tensor([0, 10]), cos, sin)
        with pytest.raises(IndexError, match="past the pool"):
            op(q, k, v, pages, pages.clone(), torch.tensor([0, 8]), positions, cos, sin)
        with pytest.raises(TypeError, match="float32"):
            op(q.double(), k, v, pages, pages.clone(), slots, positions, cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_kv_rope_gpu_is_bit_exact(dtype):
    # Exact on the GPU only because the kernel is compiled with enable_fp_fusion=False: with fused
    # multiply-adds (Triton's default), x * cos + r * sin in fp32 would be rounded once instead of
    # three times and differ from torch's separate ops in the last bit. bf16/fp16 round every step.
    gen = torch.Generator().manual_seed(5)
    n_tokens, n_q, n_kv, head_dim = 37, 32, 8, 128
    fused = (4 * torch.randn(n_tokens, n_q + 2 * n_kv, head_dim, generator=gen)).to(dtype).cuda()
    q, k, v = fused[:, :n_q], fused[:, n_q:n_q + n_kv], fused[:, n_q + n_kv:]
    pages = torch.zeros(8, 16, n_kv, head_dim, dtype=dtype, device="cuda")
    slots = torch.randperm(128, generator=gen)[:n_tokens].cuda()
    positions = torch.randint(0, 4096, (n_tokens,), generator=gen).cuda()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos, sin = rope_cache(inv_freq, 4096, dtype, "cuda")
    q_ref, k_pages_ref, v_pages_ref = q.clone(), pages.clone(), pages.clone()
    store_kv_rope_ref(q_ref, k.clone(), v.clone(), k_pages_ref, v_pages_ref, slots, positions, cos, sin)
    k_pages, v_pages = pages.clone(), pages.clone()
    store_kv_rope(q, k, v, k_pages, v_pages, slots, positions, cos, sin)
    assert torch.equal(q, q_ref) and torch.equal(k_pages, k_pages_ref) and torch.equal(v_pages, v_pages_ref)
