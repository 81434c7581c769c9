"""Native CPU ops (csrc/, nudgefast._C) against the plain-torch references they replace.

    .venv/bin/pytest benchmarks/test_bench_native.py --benchmark-group-by=group

Each group times one op at one shape twice, `native` and `ref`, so the speed-up reads off the
table. Shapes: SmolLM2-135M (Hq 9, Hkv 3, D 64) and gemma-3-270m (Hq 4, Hkv 1, D 256) decode
attention at ~300 keys, batch 1 and 4, fp32 and bf16; a 64-token prefill chunk; store_kv of a
decode step and of a prompt; the fused nudge step at SmolLM2's vocabulary (49152), batch 1 and 4,
greedy / temperature 0.7 / temperature 0.7 + top-p 0.9, on language-model-shaped logits (a few
dozen plausible tokens above a long tail); block_linear (GGUF block weights) at SmolLM2's linear
shapes against the dense float32 matmul and the reference. Skipped when the extension is not built.
"""
import math

import pytest
import torch

pytest.importorskip("nudgefast._C", reason="native CPU ops not built (pip install --no-build-isolation -e .)")

from nudgefast.kernels.kv_store import store_kv_ref  # noqa: E402
from nudgefast.kernels.nudge_gate import (MODE_NUDGING, GateParams, ModelCursor, new_gate_state,  # noqa: E402
                                          nudge_step_ref, set_row)
from nudgefast.kernels.sample import sample_mode  # noqa: E402
from nudgefast.kernels.paged_decode_attention import paged_decode_attention_ref  # noqa: E402
from nudgefast.kernels.paged_prefill_attention import paged_prefill_attention_ref  # noqa: E402
from nudgefast.native import nudge_step_native  # noqa: E402

OPS = torch.ops.nudgefast
PAGE_SIZE = 16
SMOLLM2 = ("smollm2", 9, 3, 64)  # (name, Hq, Hkv, D)
GEMMA3 = ("gemma3", 4, 1, 256)
IMPLS = ("native", "ref")


def _same(got, want, dtype=torch.float32):
    """The timed op's result equals the reference's once, before the timing (float32 summation
    order differs between the two: tolerances as in tests/test_native_ops.py)."""
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got.float(), want.float(), **tol)


def _row_lengths(batch, seq):
    """Rows spread over [0.75 * seq, seq]: a batch whose prompts differ in length."""
    return [seq - (seq // 4) * i // max(1, batch - 1) for i in range(batch)] if batch > 1 else [seq]


def _cache(model, seq_lens, dtype, seed=0):
    _, _, n_kv_heads, head_dim = model
    gen = torch.Generator().manual_seed(seed)
    width = math.ceil(max(seq_lens) / PAGE_SIZE) + 2
    num_pages = len(seq_lens) * width
    shape = (num_pages, PAGE_SIZE, n_kv_heads, head_dim)
    k_pages = torch.randn(shape, generator=gen).to(dtype)
    v_pages = torch.randn(shape, generator=gen).to(dtype)
    block_tables = torch.randperm(num_pages, generator=gen).view(len(seq_lens), width).to(torch.int32)
    return k_pages, v_pages, block_tables, torch.tensor(seq_lens, dtype=torch.int32)


DECODE = [(m, b, d) for m in (SMOLLM2, GEMMA3) for b in (1, 4) for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model,batch,dtype", DECODE,
                         ids=[f"{m[0]}-b{b}-s300-{str(d)[6:]}" for m, b, d in DECODE])
def test_decode_attention(benchmark, impl, model, batch, dtype):
    _, n_q_heads, _, head_dim = model
    benchmark.group = f"decode_attention-{model[0]}-b{batch}-{str(dtype)[6:]}"
    k_pages, v_pages, block_tables, lens = _cache(model, _row_lengths(batch, 300), dtype)
    q = torch.randn(batch, n_q_heads, head_dim).to(dtype)
    scale = head_dim ** -0.5
    if impl == "native":
        cu = torch.arange(batch + 1, dtype=torch.int32)
        _same(OPS.paged_attention(q, k_pages, v_pages, block_tables, lens, cu, scale, 0, 0.0),
              paged_decode_attention_ref(q, k_pages, v_pages, block_tables, lens, scale, 0, 0.0), dtype)
        benchmark(OPS.paged_attention, q, k_pages, v_pages, block_tables, lens, cu, scale, 0, 0.0)
    else:
        benchmark(paged_decode_attention_ref, q, k_pages, v_pages, block_tables, lens, scale, 0, 0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model", [SMOLLM2, GEMMA3], ids=["smollm2", "gemma3"])
def test_prefill_attention(benchmark, impl, model):
    """The last 64 tokens of a 300-token prompt (a prefill chunk), batch 1, fp32."""
    _, n_q_heads, _, head_dim = model
    benchmark.group = f"prefill_attention-{model[0]}-q64-s300"
    k_pages, v_pages, block_tables, lens = _cache(model, [300], torch.float32)
    q = torch.randn(64, n_q_heads, head_dim)
    cu = torch.tensor([0, 64], dtype=torch.int32)
    fn = OPS.paged_attention if impl == "native" else paged_prefill_attention_ref
    if impl == "native":
        _same(fn(q, k_pages, v_pages, block_tables, lens, cu, head_dim ** -0.5, 0, 0.0),
              paged_prefill_attention_ref(q, k_pages, v_pages, block_tables, lens, cu, head_dim ** -0.5, 0, 0.0))
    benchmark(fn, q, k_pages, v_pages, block_tables, lens, cu, head_dim ** -0.5, 0, 0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_tokens", [4, 300])
def test_store_kv(benchmark, impl, n_tokens):
    """SmolLM2 rows (3 x 64, fp32): a decode step of batch 4, and a 300-token prompt."""
    benchmark.group = f"store_kv-smollm2-t{n_tokens}"
    k_pages, v_pages, _, _ = _cache(SMOLLM2, [1024], torch.float32)
    k, v = torch.randn(n_tokens, 3, 64), torch.randn(n_tokens, 3, 64)
    slots = torch.randperm(k_pages.shape[0] * PAGE_SIZE)[:n_tokens]
    if impl == "native":
        pages = [(k_pages.clone(), v_pages.clone()) for _ in range(2)]
        OPS.store_kv(k, v, *pages[0], slots)
        store_kv_ref(k, v, *pages[1], slots)
        assert torch.equal(pages[0][0], pages[1][0]) and torch.equal(pages[0][1], pages[1][1])
    benchmark(OPS.store_kv if impl == "native" else store_kv_ref, k, v, k_pages, v_pages, slots)


def _lm_like(batch, vocab, gen):
    logits = torch.randn(batch, vocab, generator=gen) * 2.0 - 6.0
    head = torch.randint(0, vocab, (batch, 48), generator=gen)
    logits.scatter_(1, head, torch.randn(batch, 48, generator=gen) * 2.0 + 6.0)
    return logits


def _gate_inputs(batch, vocab, temperature, top_p, max_new=64):
    gen = torch.Generator().manual_seed(batch * vocab)
    logits = _lm_like(batch, vocab, gen), _lm_like(batch, vocab, gen)
    seeds = torch.randint(0, 2**62, (batch,), generator=gen).tolist()
    state = new_gate_state(batch, out_width=max_new, word_start=torch.rand(vocab, generator=gen) < 0.5)
    for r, seed in enumerate(seeds):
        set_row(state, r, seed=seed, gate="top_prob", threshold=0.4, granularity="word", temperature=temperature,
                top_p=top_p, max_new_tokens=max_new, stop_ids=[], span=1)

    def cursor():
        pos = torch.full((batch,), 100, dtype=torch.int64)
        return ModelCursor(input_ids=torch.zeros(batch, dtype=torch.int64), positions=pos,
                           seq_lens=(pos + 1).to(torch.int32), slot_mapping=pos.clone(),
                           block_tables=torch.arange(batch * 64, dtype=torch.int32).view(batch, 64),
                           page_size=PAGE_SIZE)
    return logits, state, (cursor(), cursor())


SAMPLING = {"greedy": (0.0, 1.0), "temp": (0.7, 1.0), "top_p": (0.7, 0.9)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("batch", [1, 4])
def test_nudge_step(benchmark, impl, sampling, batch):
    """Word granularity, top-prob gate, vocabulary 49152. State and cursors are re-made before every
    timed call (outside the timing), so no row finishes during the measurement."""
    benchmark.group = f"nudge_step-v49152-b{batch}-{sampling}"
    (base_logits, nudger_logits), state, cursors = _gate_inputs(batch, 49_152, *SAMPLING[sampling])
    params = GateParams(MODE_NUDGING, sample_mode(*SAMPLING[sampling]))
    fn = nudge_step_native if impl == "native" else nudge_step_ref

    def fresh():
        copy = lambda o: type(o)(**{k: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
                                    for k, v in vars(o).items()})
        return (base_logits, nudger_logits, copy(state), params, copy(cursors[0]), copy(cursors[1])), {}

    if impl == "native":  # every state and cursor tensor equals the reference's after one step
        runs = [fresh()[0] for _ in range(2)]
        nudge_step_native(*runs[0])
        nudge_step_ref(*runs[1])
        for got, want in zip(runs[0][2:], runs[1][2:]):
            if got is params:
                continue
            for k, v in vars(got).items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, getattr(want, k)), f"nudge_step_native: {k} differs from the reference"
    benchmark.pedantic(fn, setup=fresh, rounds=30 if impl == "ref" else 200, warmup_rounds=2)


# ----------------------------------------------------------------------------------------------
# block_linear: GGUF block weights (weights="gguf") against the dense float32 matmul they replace
# and the reference (dequantize, then F.linear). SmolLM2-135M's shapes: fused qkv, o, gate_up, down
# (Q4_1: 4-bit) and the output head (Q8_0: 8-bit); M = 1 (decode) and 5 (a K=4 verify).
# ----------------------------------------------------------------------------------------------

from nudgefast.blocks import BlockWeight, block_linear_ref  # noqa: E402

LINEARS = {"qkv": (960, 576, 4), "o": (576, 576, 4), "gate_up": (3072, 576, 4), "down": (576, 1536, 4),
           "lm_head": (49152, 576, 8)}


def _block_weight(n, k, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = (torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8) if bits == 4 else
             torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8))
    return BlockWeight(codes, torch.rand(n, k // 32, generator=gen) * 0.01,
                       torch.randn(n, k // 32, generator=gen) * 0.01, bits, 32)


@pytest.mark.parametrize("impl", ["native", "dense", "ref"])
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("name", list(LINEARS))
def test_block_linear(benchmark, impl, m, name):
    n, k, bits = LINEARS[name]
    benchmark.group = f"block_linear {name} M={m}"
    w = _block_weight(n, k, bits)
    x = torch.randn(m, k)
    if impl == "native":
        _same(OPS.block_linear(x, w.codes, w.scale, w.offset, w.bits, w.block), block_linear_ref(x, w))
        benchmark(OPS.block_linear, x, w.codes, w.scale, w.offset, w.bits, w.block)
    elif impl == "dense":  # what weights="dense" runs: float32 weights, 4-8x the bytes
        dense = w.dequantize()
        benchmark(torch.nn.functional.linear, x, dense)
    else:
        benchmark(block_linear_ref, x, w)
