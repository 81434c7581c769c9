"""Linear weights read from a GGUF file's quantized blocks (nudgefast/blocks.py, csrc/block_linear.cpp).

Expectations re-stated:
- Every supported GGML type decodes to codes, scales and offsets whose `scale * code + offset`
  equals the `gguf` package's dequantized values bit for bit (random blocks here; every tensor of
  both real models against the converted model.safetensors in the slow test).
- Widening (4 -> 8 bits, block 32 -> 16), row concatenation and row lookup change no value.
- The native block_linear equals dequantize-then-F.linear up to float32 summation order:
  |error| <= 1e-5 * max(|x| @ |W|^T) (a few ulps of the sum of magnitudes), for every kernel the CPU
  runs (portable always; avx2, avx512 where present, each forced by NUDGEFAST_BLOCK_KERNEL), over a
  table of shapes (odd N, N off the 4-row tile, every M chunking path, two threads) and the layouts.
- block_linear_q8 (weights="gguf-q8") equals block_linear_q8_ref within the same bound (its integer
  block dots are exact) on every kernel (portable, avx512vnni); the reference is within
  q8_error_bound (x off by at most half a quantization step) of the exact product.
- An engine with weights="gguf" writes what the dense engine writes and what the reference
  algorithm writes (greedy and seeded sampling); bad requests name what is wrong.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

import nudgefast as nf  # noqa: E402
from nudgefast.blocks import (  # noqa: E402
    SUPPORTED_TYPES, BlockWeight, block_linear_q8_ref, block_linear_ref, concat_rows, from_ggml, kernel_info,
    q8_error_bound, quantize_activations_ref, read_block_weights)
from nudgefast.config import ConfigError  # noqa: E402
from nudgefast.ops import Backend, native_ops_available  # noqa: E402
from oracles import word_start_flags  # noqa: E402

native = pytest.mark.skipif(not native_ops_available(), reason="native CPU ops not built")

# Byte offsets of the float16 scale/min fields in one block of each type.
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
              "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(type_name: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random GGML blocks of a [rows, cols] tensor with finite float16 scales (random bytes
    everywhere else: every code, sub-block scale and high bit pattern occurs)."""
    block, type_size = gguf.constants.GGML_QUANT_SIZES[Q[type_name]]
    raw = rng.integers(0, 256, size=(rows * cols // block, type_size), dtype=np.uint8)
    for at in F16_FIELDS[type_name]:
        raw[:, at:at + 2] = (rng.standard_normal(len(raw)) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
@pytest.mark.parametrize("rows, cols", [(3, 256), (5, 512)])
def test_decoding_equals_gguf_dequantize_bit_for_bit(type_name, rows, cols):
    raw = random_blocks(type_name, rows, cols, np.random.default_rng(rows + len(type_name)))
    want = torch.from_numpy(gguf.quants.dequantize(raw, Q[type_name]).reshape(rows, cols).astype(np.float32))
    w = from_ggml(type_name, raw, (rows, cols))
    assert w.shape == (rows, cols)
    assert (w.bits, w.block) == ((4, 32) if type_name in ("Q4_0", "Q4_1", "Q4_K") else
                                 (8, 16) if type_name == "Q6_K" else (8, 32))
    assert torch.equal(w.dequantize(), want)
    assert w.nbytes < want.numel() * 4 * (12 / 32 + 0.01)  # at most 12 bits per weight


def random_weight(n: int, k: int, bits: int, block: int, seed: int = 0, zero_offset: bool = False,
                  half: bool = False) -> BlockWeight:
    """half: scales and offsets that are float16 values (as Q4_0/Q4_1/Q8_0's are), which the native
    op then reads as float16."""
    g = torch.Generator().manual_seed(seed)
    codes = (torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8) if bits == 4 else
             torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8))
    scale = torch.rand(n, k // block, generator=g) * 0.02
    offset = torch.randn(n, k // block, generator=g) * 0.05
    if half:
        scale, offset = scale.half().float(), offset.half().float()
    w = BlockWeight(codes, scale, offset * (not zero_offset), bits, block)
    assert w.kernel_offset.shape == ((n, 0) if zero_offset else offset.shape)  # zero offsets are not read
    assert w.kernel_scale.dtype == w.kernel_offset.dtype == (torch.float16 if half else torch.float32)
    return w


def float32_args(w: BlockWeight) -> tuple:
    """The op's weight arguments with the scales and offsets kept as float32 (the same values)."""
    return w.codes, w.scale, w.kernel_offset.float(), w.bits, w.block


LAYOUTS = [(4, 32), (8, 32), (8, 16)]


def test_widening_concatenation_and_rows_keep_values():
    parts = [random_weight(5, 64, bits, block, seed=i) for i, (bits, block) in enumerate(LAYOUTS)]
    fused = concat_rows(parts)
    assert (fused.bits, fused.block) == (8, 16)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert torch.equal(concat_rows(parts[:1] * 2).dequantize(), torch.cat([parts[0].dequantize()] * 2))
    assert concat_rows(parts[:1] * 2).bits == 4  # same layouts are not widened
    dense = torch.randn(3, 64)
    mixed = concat_rows([parts[0], dense])
    assert isinstance(mixed, torch.Tensor) and torch.equal(mixed, torch.cat([parts[0].dequantize(), dense]))
    ids = torch.tensor([4, 0, 4, 2])
    for p in parts:
        assert torch.equal(p.rows(ids), p.dequantize()[ids])
    with pytest.raises(ValueError, match="cannot widen"):
        parts[2].widened(4, 32)
    with pytest.raises(ValueError, match="CPU in float32"):
        parts[0].to(torch.bfloat16)


# (N, K, M): odd N; M = 1 (decode), 2/3/5 (the 2- and 1-row tails), 8, 13, 16 (direct, passes of 8);
# N not a multiple of the 4-row register tile (43, 10, 3); M = 17, 70: dequantize + BLAS (prefill)
LINEAR_CASES = [(1, 32, 1), (37, 96, 2), (129, 256, 3), (64, 576, 5), (7, 160, 8), (33, 64, 13), (5, 1024, 16),
                (43, 160, 1), (10, 224, 4), (3, 96, 12), (21, 96, 17), (40, 64, 70)]
# block-16 weights with an odd number of blocks (the 8-bit-activation kernel pairs blocks)
LINEAR_CASES_16 = [(9, 48, 1), (6, 80, 3)]


def linear_cases():
    """(bits, block, N, K, M, zero_offset, half): every layout and shape, with offsets (Q4_1, Q4_K, ...)
    and without (Q8_0, Q6_K: the op reads none) on alternate cases, and on every third case scales and
    offsets the op reads as float16 (Q4_0, Q4_1, Q8_0, ...)."""
    cases = [(bits, block, n, k, m) for bits, block in LAYOUTS for n, k, m in LINEAR_CASES] + [
        (8, 16, n, k, m) for n, k, m in LINEAR_CASES_16]
    return [case + (i % 2 == 1, i % 3 == 0) for i, case in enumerate(cases)]


def assert_linear_close(got, x, w):
    want = block_linear_ref(x, w)
    bound = (x.abs() @ w.dequantize().abs().T).max().item()
    err = (got - want).abs().max().item()
    assert got.shape == want.shape and err <= 1e-5 * bound, f"max abs error {err:.3g} > 1e-5 * {bound:.3g}"


def assert_q8_close(got, x, w):
    """The 8-bit-activation op equals its reference up to float32 summation order (the same bound
    as the exact op: the integer block dots are exact in both)."""
    want = block_linear_q8_ref(x, w)
    bound = (x.abs() @ w.dequantize().abs().T).max().item()
    err = (got - want).abs().max().item()
    assert got.shape == want.shape and err <= 1e-5 * bound, f"q8: max abs error {err:.3g} > 1e-5 * {bound:.3g}"


@native
@pytest.mark.parametrize("bits, block, n, k, m, zero_offset, half", linear_cases())
def test_native_block_linear_equals_reference(bits, block, n, k, m, zero_offset, half):
    w = random_weight(n, k, bits, block, seed=n * k + m, zero_offset=zero_offset, half=half)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    args = (w.codes, w.kernel_scale, w.kernel_offset, bits, block)
    got = torch.ops.nudgefast.block_linear(x, *args)
    assert_linear_close(got, x, w)
    got_q8 = torch.ops.nudgefast.block_linear_q8(x, *args)
    assert_q8_close(got_q8, x, w)
    if half:  # float16 storage is the same float32 arithmetic on the same values: identical results
        assert torch.equal(got, torch.ops.nudgefast.block_linear(x, *float32_args(w)))
        assert torch.equal(got_q8, torch.ops.nudgefast.block_linear_q8(x, *float32_args(w)))


@native
def test_native_block_linear_prefill_over_several_slabs():
    """More rows than one 64 MB slab of dequantized weights holds (a big output head at prefill)."""
    w = random_weight(16500, 1024, 4, 32, seed=5)  # 16500 x 1024 floats = 67.6 MB > 64 MB
    x = torch.randn(20, 1024)
    assert_linear_close(torch.ops.nudgefast.block_linear(x, w.codes, w.scale, w.offset, 4, 32), x, w)


@native
def test_backend_block_linear_takes_views_leading_dims_and_bias():
    w = random_weight(19, 64, 4, 32)
    x = torch.randn(2, 3, 128)[..., ::2]  # not contiguous
    bias = torch.randn(19)
    for kind in ("native", "torch"):
        got = Backend(kind).block_linear(x, w, bias)
        want = torch.nn.functional.linear(x, w.dequantize(), bias)
        assert got.shape == (2, 3, 19) and torch.allclose(got, want, atol=1e-5, rtol=0)
    w.act8 = True  # weights="gguf-q8": both backends take the 8-bit-activation op
    want = block_linear_q8_ref(x.reshape(6, 64), w).view(2, 3, 19) + bias
    for kind in ("native", "torch"):
        assert torch.allclose(Backend(kind).block_linear(x, w, bias), want, atol=1e-5, rtol=0), kind


# Every kernel this machine runs, forced in a child process (the choice is made once per process);
# the portable one runs on every machine. Two threads split the rows of the last cases.
KERNEL_SCRIPT = """
import torch, nudgefast._C
from test_blocks import linear_cases, random_weight, assert_linear_close, assert_q8_close, float32_args
chosen = torch.ops.nudgefast.block_kernels()
assert chosen[0] == "exact:{kernel}", chosen
for bits, block, n, k, m, zero_offset, half in linear_cases():
    w = random_weight(n, k, bits, block, seed=n, zero_offset=zero_offset, half=half)
    x = torch.randn(m, k)
    args = (w.codes, w.kernel_scale, w.kernel_offset, bits, block)
    got, got_q8 = torch.ops.nudgefast.block_linear(x, *args), torch.ops.nudgefast.block_linear_q8(x, *args)
    assert_linear_close(got, x, w)
    assert_q8_close(got_q8, x, w)
    if half:
        assert torch.equal(got, torch.ops.nudgefast.block_linear(x, *float32_args(w)))
        assert torch.equal(got_q8, torch.ops.nudgefast.block_linear_q8(x, *float32_args(w)))
torch.set_num_threads(2)
for m in (1, 2, 3, 5, 20):
    w = random_weight(1030, 128, 4, 32, seed=m, zero_offset=m in (3, 20), half=m in (2, 20))
    x = torch.randn(m, 128)
    args = (w.codes, w.kernel_scale, w.kernel_offset, 4, 32)
    assert_linear_close(torch.ops.nudgefast.block_linear(x, *args), x, w)
    assert_q8_close(torch.ops.nudgefast.block_linear_q8(x, *args), x, w)
print(chosen[1], "ok")
"""


def run_with_kernel(kernel: str, script: str, **env):
    env = {**os.environ, "NUDGEFAST_BLOCK_KERNEL": kernel, "PYTHONPATH": os.path.dirname(__file__), **env}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


@native
@pytest.mark.parametrize("kernel", ["portable", "avx2", "avx512"])
def test_every_kernel_equals_reference(kernel):
    available = kernel_info()["available"]
    if kernel not in available:
        pytest.skip(f"this CPU runs {available}")
    out = run_with_kernel(kernel, KERNEL_SCRIPT.format(kernel=kernel))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    # the 8-bit-activation kernel that ran: VNNI beside the AVX-512 one where the CPU has it
    want_q8 = "avx512vnni" if kernel == "avx512" and "avx512vnni" in available else "portable"
    assert out.stdout.split()[0] == f"q8:{want_q8}", out.stdout


@native
def test_kernel_choice_is_explained():
    info = kernel_info()
    assert info["exact"] == [k for k in info["available"] if k != "avx512vnni"][-1]  # the best exact kernel
    out = run_with_kernel("avx3", "import torch, nudgefast._C\ntorch.ops.nudgefast.block_linear("
                          "torch.randn(1, 32), torch.zeros(1, 16, dtype=torch.uint8), torch.ones(1, 1), "
                          "torch.zeros(1, 1), 4, 32)")
    assert out.returncode != 0 and "NUDGEFAST_BLOCK_KERNEL=avx3 is not a block_linear kernel" in out.stderr
    out = run_with_kernel("", "import torch, nudgefast._C\nprint(torch.ops.nudgefast.block_kernels()[0])",
                          NUDGEFAST_PORTABLE_KERNELS="1")
    assert out.stdout.strip() == "exact:portable", out.stderr[-2000:]


def test_activation_quantization_rounds_half_to_even_per_block():
    x = torch.zeros(1, 64)
    x[0, :5] = torch.tensor([1.0, -0.5, 0.25, 0.126, -1.0])  # block 0: amax 1; block 1 all zero
    xq, dx = quantize_activations_ref(x, 32)
    assert xq[0, :5].tolist() == [127, -64, 32, 16, -127]  # -63.5 -> -64, 31.75 -> 32, 16.002 -> 16
    assert torch.equal(xq[0, 32:], torch.zeros(32, dtype=torch.int8))
    assert dx.tolist() == [[pytest.approx(1 / 127), 0.0]]


@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("bits, block", LAYOUTS)
def test_q8_reference_is_within_its_stated_bound_of_the_exact_product(bits, block, centred):
    w = random_weight(23, 256, bits, block, seed=bits + block)
    if centred:  # Q4_0-like: offset -7.5 scale, so |W| is far below |scale * code| (and the bound with it)
        w = BlockWeight(w.codes, w.scale, -7.5 * w.scale if bits == 4 else w.offset * 0, bits, block)
    x = torch.randn(5, 256) * torch.linspace(0.1, 3.0, 256)  # blocks of different ranges
    q8, exact = block_linear_q8_ref(x, w), block_linear_ref(x, w)
    err = (q8 - exact).abs()
    assert (err <= q8_error_bound(x, w) * (1 + 1e-4) + 1e-5).all()
    assert err.max() > 0  # it does quantize
    assert (err.max() / exact.abs().max()).item() < 0.02  # and a 8-bit quantization stays close
    big = torch.randn(17, 256)  # prefill rows: exact
    assert torch.equal(block_linear_q8_ref(big, w), block_linear_ref(big, w))


@native
def test_native_block_linear_rejects_bad_inputs():
    w = random_weight(4, 64, 8, 32)
    op = torch.ops.nudgefast.block_linear
    with pytest.raises(ValueError, match="columns"):
        op(torch.randn(1, 32), w.codes, w.scale, w.offset, 8, 32)
    with pytest.raises(TypeError, match="float32"):
        op(torch.randn(1, 64, dtype=torch.float64), w.codes, w.scale, w.offset, 8, 32)
    with pytest.raises(TypeError, match="codes"):
        op(torch.randn(1, 64), w.codes.view(torch.uint8), w.scale, w.offset, 8, 32)
    with pytest.raises(TypeError, match="offset"):
        op(torch.randn(1, 64), w.codes, w.scale, w.offset[:, :1], 8, 32)
    with pytest.raises(TypeError, match="one type"):  # float16 scales with float32 offsets
        op(torch.randn(1, 64), w.codes, w.scale.half(), w.offset, 8, 32)
    with pytest.raises(ValueError, match="unsupported layout"):
        op(torch.randn(1, 64), w.codes, w.scale, w.offset, 4, 16)
    assert op(torch.randn(1, 64), w.codes, w.scale, w.offset, 8, 32).shape == (1, 4)  # still usable


# ----------------------------------------------------------------------------- engines on GGUF models

# Every linear weight quantized, in a mix that makes the fused q/k/v widen 4 -> 8 bits.
STORAGE = {"q_proj": Q.Q4_0, "k_proj": Q.Q5_0, "v_proj": Q.Q8_0, "o_proj": Q.Q4_1, "gate_proj": Q.Q4_1,
           "up_proj": Q.Q4_1, "down_proj": Q.Q5_1, "embed": Q.Q8_0, "lm_head": Q.Q4_0}


def storage_type(hf_name, shape):
    if len(shape) == 1:
        return Q.F32
    return next(q for part, q in STORAGE.items() if part in hf_name)


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    """Two tiny llama models (different weights, one tokenizer) written as quantized GGUF files and
    converted: (base_dir, nudger_dir)."""
    import test_gguf

    root = tmp_path_factory.mktemp("gguf-pair")
    patch = pytest.MonkeyPatch()
    patch.setattr(test_gguf, "storage_type", storage_type)
    dirs = []
    try:
        for seed in (0, 1):
            spec = ("llama", 2, 64, 4, 2, 16, 96, len(test_gguf.TINY_TOKENS), False)
            test_gguf.write_tiny_gguf(root / f"m{seed}.gguf", spec, seed=seed, tokenizer=True)
            dirs.append(nf.convert_gguf(root / f"m{seed}.gguf", root / f"m{seed}", progress=False))
    finally:
        patch.undo()
    return dirs


PROMPTS = [[1, 70, 71, 72], [1, 80, 90, 100, 110, 120, 130]]


@native
def test_gguf_weights_engine_writes_what_the_dense_engine_writes(gguf_pair):
    base, nudger = gguf_pair
    blocks = read_block_weights(base)
    assert {type(w) for w in blocks.values()} == {BlockWeight} and len(blocks) == 2 * 7 + 2
    engines = {weights: nf.NudgingEngine(base, nudger, weights=weights, page_size=4, kv_cache_tokens=256)
               for weights in ("dense", "gguf")}
    engines["gguf-torch"] = nf.NudgingEngine(base, nudger, weights="gguf", native=False, page_size=4,
                                             kv_cache_tokens=256)
    layer = engines["gguf"].base.model.layers[0]
    assert isinstance(layer["qkv"], BlockWeight) and layer["qkv"].bits == 8  # widened: q is 4-bit
    assert isinstance(layer["gate_up"], BlockWeight) and layer["gate_up"].bits == 4
    for config in (nf.NudgeConfig(mode="base_only", max_new_tokens=12, stop_token_ids=[]),
                   nf.NudgeConfig(mode="nudging", granularity="token", threshold=0.1, max_new_tokens=12,
                                  stop_token_ids=[], temperature=0.8, seed=3),
                   nf.NudgeConfig(mode="nudging", speculate=3, threshold=0.1, max_new_tokens=12, stop_token_ids=[])):
        outs = {name: e.generate_ids(PROMPTS, PROMPTS, config) for name, e in engines.items()}
        for name in ("gguf", "gguf-torch"):
            assert [o.token_ids for o in outs[name]] == [o.token_ids for o in outs["dense"]], (name, config)
            assert [o.from_nudger for o in outs[name]] == [o.from_nudger for o in outs["dense"]], (name, config)


@native
def test_gguf_q8_weights_native_engine_writes_what_its_reference_writes(gguf_pair):
    """weights="gguf-q8": every block weight, fused ones and the head included, multiplies with
    8-bit activations, and the native op and the torch reference write the same tokens."""
    base, nudger = gguf_pair
    engines = {native: nf.NudgingEngine(base, nudger, weights="gguf-q8", native=native, page_size=4,
                                        kv_cache_tokens=256) for native in (True, False)}
    model = engines[True].base.model
    assert model.layers[0]["qkv"].act8 and model.layers[0]["gate_up"].act8 and model.lm_head.act8
    exact = nf.NudgingEngine(base, nudger, weights="gguf", page_size=4, kv_cache_tokens=256)
    assert not exact.base.model.layers[0]["qkv"].act8
    for config in (nf.NudgeConfig(mode="base_only", max_new_tokens=12, stop_token_ids=[]),
                   nf.NudgeConfig(mode="nudging", granularity="token", threshold=0.1, max_new_tokens=12,
                                  stop_token_ids=[])):
        outs = {name: e.generate_ids(PROMPTS, PROMPTS, config) for name, e in engines.items()}
        assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]], config
        assert [o.from_nudger for o in outs[True]] == [o.from_nudger for o in outs[False]], config


@native
def test_gguf_weights_nudging_equals_the_reference(gguf_pair):
    from nudgefast.reference import reference_generate

    base, nudger = gguf_pair
    engine = nf.NudgingEngine(base, nudger, weights="gguf", page_size=4, kv_cache_tokens=256)
    hf = [__import__("transformers").AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32) for d in gguf_pair]

    def logits_fn(model):
        def fn(ids):
            with torch.no_grad():
                return model(torch.tensor([ids])).logits[0, -1].float()
        return fn

    table = word_start_flags(engine.nudger.dir, engine.nudger.spec.vocab_size)  # by the definition
    fractions = []
    for threshold in (0.04, 0.07):  # around the base's top-1 probabilities here
        config = nf.NudgeConfig(mode="nudging", granularity="word", threshold=threshold, max_new_tokens=16,
                                stop_token_ids=[])
        outs = engine.generate_ids(PROMPTS, PROMPTS, config)
        for prompt, out in zip(PROMPTS, outs):
            ref = reference_generate(logits_fn(hf[0]), logits_fn(hf[1]), prompt, prompt, config, set(),
                                     lambda i: bool(table[i]), 0)
            assert (out.token_ids, out.from_nudger) == (ref.token_ids, ref.from_nudger)
            fractions.append(out.nudged_fraction)
    assert any(0 < f < 1 for f in fractions), fractions  # answers where both models wrote


def test_gguf_weights_bad_requests_are_explained(gguf_pair, tmp_path):
    base, _ = gguf_pair
    with pytest.raises(ValueError, match="weights='bogus'"):
        nf.NudgingEngine(base, weights="bogus")
    with pytest.raises(ConfigError, match="float32"):
        nf.NudgingEngine(base, weights="gguf", dtype="bfloat16")
    # a directory that was not converted from GGUF
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in base.iterdir():
        if f.name != nf.gguf.CONVERSION_MARKER:
            (plain / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match="converted from a GGUF"):
        nf.NudgingEngine(plain, weights="gguf")
    # its source file moved away
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in base.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    marker = json.loads((moved / nf.gguf.CONVERSION_MARKER).read_text())
    marker["source"] = str(tmp_path / "nowhere.gguf")
    (moved / nf.gguf.CONVERSION_MARKER).write_text(json.dumps(marker))
    with pytest.raises(ConfigError, match="gone or has changed"):
        nf.NudgingEngine(moved, weights="gguf")
    assert nf.NudgingEngine(plain, weights="dense").base is not None  # dense still loads


def test_command_picks_gguf_weights_where_every_model_allows_it(gguf_pair, tmp_path, monkeypatch):
    from nudgefast import cli

    base, nudger = gguf_pair
    plain = tmp_path / "plain"  # not converted from GGUF: no marker
    plain.mkdir()
    assert cli.gguf_weights_possible("cpu", None, gguf_pair) == native_ops_available()
    assert cli.gguf_weights_possible("cpu", "float32", gguf_pair) == native_ops_available()
    assert not cli.gguf_weights_possible("cuda", None, gguf_pair)
    assert not cli.gguf_weights_possible("cpu", "bfloat16", gguf_pair)
    assert not cli.gguf_weights_possible("cpu", None, [base, plain])
    made = []
    monkeypatch.setattr(nf, "NudgingEngine", lambda **kw: made.append(kw))
    for flag, want in (("auto", "gguf" if native_ops_available() else "dense"), ("dense", "dense"), ("gguf", "gguf")):
        parser = argparse.ArgumentParser()
        cli._add_generate_args(parser)
        args = parser.parse_args(["--base", str(base), "--nudger", str(nudger), "--weights", flag])
        cli._make_engine(args, base, nudger)
        assert made[-1]["weights"] == want, flag


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_real_model_blocks_equal_the_converted_weights(name):
    """Every quantized tensor of both packaged models (Q4_1, Q8_0; Q5_0, Q4_K, Q6_K, Q8_0), after
    the converter's renaming and llama row un-permutation, dequantizes to model.safetensors exactly."""
    from safetensors import safe_open

    from nudgefast import packaged

    model_dir = packaged.packaged_model_dir(name)
    blocks = read_block_weights(model_dir)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        linear = [k for k in f.keys() if k.endswith("proj.weight") or "embed" in k or "lm_head" in k]
        assert sorted(blocks) == sorted(linear)
        for hf_name, w in blocks.items():
            assert torch.equal(w.dequantize(), f.get_tensor(hf_name)), hf_name
    dense_bytes = sum(w.shape.numel() * 4 for w in blocks.values())
    assert sum(w.nbytes for w in blocks.values()) < 0.35 * dense_bytes
