"""Fused nudge step timings (pytest-benchmark): the torch reference vs the Triton kernel.

    .venv/bin/pytest benchmarks/test_bench_gate.py --benchmark-group-by=group

One decode step of nudging (word granularity, top-prob gate) for the whole batch: base statistics,
both candidates, the rule, the ending and the splice of both cursors. Vocabularies: 49152
(SmolLM2) and 262144 (gemma-3), batch 1 and 8, greedy / temperature / temperature + top-p 0.9.
The "mixed" case gives the rows of one batch different samplers (greedy, temperature, top-p in
turn: per-row parameters). CPU: the reference (the CPU engine's step). CUDA (skipped without it):
the reference on the GPU, the Triton step as launched (rows split over programs at these batches:
2 launches, 11 with top-p) and with one program per row (chunks=1, 1 launch), bf16 logits. Logits are language-model shaped (see _lm_like). Every timed call
first resets n_out, finished and the cursor positions (a few tiny ops, the same for both), so no
row finishes during the measurement.
"""
import pytest
import torch

from nudgefast.kernels.nudge_gate import (MODE_NUDGING, GateParams, ModelCursor, new_gate_state, nudge_step,
                                          nudge_step_ref, set_row, set_row_params)
from nudgefast.kernels.sample import sample_mode

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VOCABS = (49_152, 262_144)
BATCHES = (1, 8)
SAMPLING = {"greedy": (0.0, 1.0), "temp": (0.7, 1.0), "top_p": (0.7, 0.9), "mixed": None}
PAGE, PAGES = 16, 64


def _lm_like(batch, vocab, gen):
    """Next-token logits shaped like a language model's: a few dozen plausible tokens well above a
    long tail (entropy about 2-3 nats), rather than i.i.d. noise, whose probability mass spreads over
    the whole vocabulary and would make the nucleus tens of thousands of tokens wide."""
    logits = torch.randn(batch, vocab, generator=gen) * 2.0 - 6.0
    head = torch.randint(0, vocab, (batch, 48), generator=gen)
    logits.scatter_(1, head, torch.randn(batch, 48, generator=gen) * 2.0 + 6.0)
    return logits


def _inputs(batch, vocab, dtype, device):
    gen = torch.Generator().manual_seed(batch * vocab)
    base_logits = _lm_like(batch, vocab, gen).to(dtype).to(device)
    nudger_logits = _lm_like(batch, vocab, gen).to(dtype).to(device)
    max_new = 64
    seeds = torch.randint(0, 2**62, (batch,), generator=gen).tolist()
    state = new_gate_state(batch, out_width=max_new, word_start=torch.rand(vocab, generator=gen) < 0.5, device=device)
    for r, seed in enumerate(seeds):
        set_row(state, r, seed=seed, gate="top_prob", threshold=0.4, granularity="word", temperature=0.0,
                top_p=1.0, max_new_tokens=max_new, stop_ids=[], span=1)

    def cursor():
        pos = torch.full((batch,), 100, dtype=torch.int64, device=device)
        tables = torch.arange(batch * PAGES, dtype=torch.int32, device=device).view(batch, PAGES)
        return ModelCursor(input_ids=torch.zeros(batch, dtype=torch.int64, device=device), positions=pos,
                           seq_lens=(pos + 1).to(torch.int32), slot_mapping=pos.clone(), block_tables=tables,
                           page_size=PAGE)

    return base_logits, nudger_logits, state, cursor(), cursor()


def set_sampling(state, sampling) -> GateParams:
    """Every row with SAMPLING[sampling], or ("mixed") the three samplers in turn; the batch's params."""
    rows = state.seed.shape[0]
    per_row = [SAMPLING[sampling]] * rows if SAMPLING[sampling] else [
        (0.0, 1.0), (0.7, 1.0), (0.7, 0.9)] * (rows // 3) + [(0.7, 0.9)] * (rows % 3)
    for r, (temperature, top_p) in enumerate(per_row):
        set_row_params(state, r, gate="top_prob", threshold=0.4, granularity="word", temperature=temperature,
                       top_p=top_p, max_new_tokens=int(state.max_new[r]))
    return GateParams(MODE_NUDGING, max(sample_mode(t, p) for t, p in per_row))


def _run(benchmark, step, batch, vocab, sampling, dtype, device):
    base_logits, nudger_logits, state, base, nudger = _inputs(batch, vocab, dtype, device)
    params = set_sampling(state, sampling)
    start = base.positions.clone()

    def once():
        state.n_out.zero_()
        state.finished.zero_()
        base.positions.copy_(start)
        nudger.positions.copy_(start)
        step(base_logits, nudger_logits, state, params, base, nudger)
        if device == "cuda":
            torch.cuda.synchronize()

    once()  # compile (Triton) / warm up outside the timing
    if step is not nudge_step_ref:
        check_against_reference(step, base_logits, nudger_logits, state, params, base, nudger, start)
    benchmark(once)


def _copy(obj):
    return type(obj)(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(obj).items()})


def check_against_reference(step, base_logits, nudger_logits, state, params, base, nudger, start):
    """What is timed computes what the reference computes: one step from the timed start state,
    every state and cursor tensor compared (same logits, same device). Exact on CUDA only because
    these rows' decisions are far from rounding boundaries: the kernel's exp/log are fast-math and
    FMA-contracted, the reference's are not (tests/gpu_margins.py measures such margins)."""
    runs = []
    for fn in (step, nudge_step_ref):
        s, b, n = _copy(state), _copy(base), _copy(nudger)
        s.n_out.zero_()
        s.finished.zero_()
        b.positions.copy_(start)
        n.positions.copy_(start)
        fn(base_logits, nudger_logits, s, params, b, n)
        runs.append((s, b, n))
    for got, want in zip(*runs):
        for k, v in vars(got).items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, getattr(want, k)), f"{step.__name__}: {k} differs from the reference"


CASES = [(v, b, s) for v in VOCABS for b in BATCHES for s in SAMPLING]


@pytest.mark.benchmark(group="nudge_step")
@pytest.mark.parametrize("vocab,batch,sampling", CASES)
def test_gate_ref_cpu(benchmark, vocab, batch, sampling):
    _run(benchmark, nudge_step_ref, batch, vocab, sampling, torch.float32, "cpu")


@needs_cuda
@pytest.mark.benchmark(group="nudge_step")
@pytest.mark.parametrize("vocab,batch,sampling", CASES)
def test_gate_ref_cuda(benchmark, vocab, batch, sampling):
    _run(benchmark, nudge_step_ref, batch, vocab, sampling, torch.bfloat16, "cuda")


@needs_cuda
@pytest.mark.benchmark(group="nudge_step")
@pytest.mark.parametrize("vocab,batch,sampling", CASES)
def test_gate_triton_cuda(benchmark, vocab, batch, sampling):
    # the launcher's choice: rows split over programs at these batches (kernels/vocab_split.py)
    _run(benchmark, nudge_step, batch, vocab, sampling, torch.bfloat16, "cuda")


def nudge_step_one_program(*args):
    """nudge_step with one program per row (chunks=1): the layout before the vocabulary split."""
    return nudge_step(*args, chunks=1)


@needs_cuda
@pytest.mark.benchmark(group="nudge_step")
@pytest.mark.parametrize("vocab,batch,sampling", CASES)
def test_gate_triton_one_program_cuda(benchmark, vocab, batch, sampling):
    _run(benchmark, nudge_step_one_program, batch, vocab, sampling, torch.bfloat16, "cuda")
