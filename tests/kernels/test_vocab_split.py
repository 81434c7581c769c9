"""Rows split over many programs (kernels/vocab_split.py): the launchers with a forced chunk count
equal the references exactly, as the single-program path does.

Expectations re-stated:
- the chunk records combine to the unsplit answers: greedy = first argmax, the draw = the first index
  of the best s + g (the same counter-based noise, keyed by the GLOBAL index), gate statistics equal
  to float32 rounding (torch reference, then every Triton launcher);
- chunk boundaries anywhere: inside tie groups (the first index still wins), one-entry chunks,
  chunks past a shorter vocabulary (empty), -inf entries and all -inf chunks, all-equal rows;
- per-row samplers (greedy / Gumbel / nucleus) mixed in one batch, bf16 / fp16 / fp32 logits;
- sample_rows, nudge_step and spec_accept with C > 1 give the references' tokens, states and cursors
  (nucleus: token for token except at float-rounding boundaries of the cut-off sum, which these
  random rows do not hit; the single program has the same caveat);
- the heuristic: one program per row once the rows fill the SMs, chunks of whole scan blocks.
Vocabularies are small (37..600) with chunks of 1..200 entries: the interpreter runs every program.
"""
import functools

import pytest
import torch

from nudgefast.kernels.nudge_gate import (GATE_ENTROPY, GATE_TOP_PROB, MODE_BASE_ONLY, MODE_NUDGER_ONLY,
                                          MODE_NUDGING, base_stats_ref, nudge_step, nudge_step_ref)
from nudgefast.kernels.sample import (SAMPLE_GREEDY, SAMPLE_GUMBEL, SAMPLE_NUCLEUS, inverse_temperature, sample_mode,
                                      sample_rows, sample_rows_ref)
from nudgefast.kernels.spec_accept import spec_accept
from nudgefast.kernels.vocab_split import (DEFAULT_SM_COUNT, SPLIT_MAX_CHUNKS, SPLIT_MIN_CHUNK, chunk_partials_ref,
                                           combine_partials_ref, plan_chunks)
from gate_rows import MIXED_ROWS, Cfg, apply
from test_nudge_gate import assert_same, clone, mixed_case, random_case
from test_spec_accept import check_against_reference, check_against_sequential

# per-row samplers: (temperature, top_p)
SAMPLERS = [(0.0, 1.0), (0.7, 1.0), (0.7, 0.8), (1.3, 0.95), (0.3, 0.5), (2.0, 1.0), (0.0, 0.4), (0.9, 0.3),
            (0.7, 1.0), (0.0, 1.0), (1.0, 0.9)]


def tricky_rows(V, dtype, gen, boundary):
    """One row per SAMPLERS entry: random scales, plus rows whose maxima straddle `boundary` (a chunk
    boundary: the tie group is split), all-equal rows, -inf entries, an all -inf chunk, a peaked row."""
    B = len(SAMPLERS)
    x = torch.randn(B, V, generator=gen) * torch.empty(B, 1).uniform_(0.5, 4.0, generator=gen)
    top = float(x.max()) + 3.0
    x[0, boundary - 1] = x[0, boundary] = top  # greedy: a tie across the boundary, the first index wins
    x[1, :] = 0.0  # flat Gumbel row
    x[2, boundary:] = float("-inf")  # nucleus row whose later chunks are all -inf
    x[3, ::3] = float("-inf")
    x[6, :] = -2.0  # flat greedy row: index 0
    x[7, V // 2] = top + 30  # peaked nucleus row: the nucleus is one token
    x[9, boundary] = x[9, V - 1] = top  # greedy tie in two different chunks
    x[10, max(0, boundary - 2):boundary + 2] = top  # a nucleus tie group cut by the boundary
    return x.to(dtype)


def row_params(gen):
    B = len(SAMPLERS)
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen)
    step = torch.randint(0, 10_000, (B,), generator=gen, dtype=torch.int32)
    inv = torch.tensor([inverse_temperature(t) for t, _ in SAMPLERS], dtype=torch.float32)
    top_p = torch.tensor([p for _, p in SAMPLERS], dtype=torch.float32)
    mode = torch.tensor([sample_mode(t, p) for t, p in SAMPLERS], dtype=torch.int32)
    return seeds, step, inv, top_p, mode


# ----------------------------------------------------------------------------- the plan


def test_plan_chunks():
    dev = torch.device("cpu")  # plans as for DEFAULT_SM_COUNT SMs
    assert DEFAULT_SM_COUNT == 132
    C, (length,) = plan_chunks(1, [262_144], dev)
    assert (C, length) == (64, 4096)
    for rows in (1, 2, 8, 31, 64, 131):
        for V in (32_000, 50_257, 151_936, 262_144):
            C, lengths = plan_chunks(rows, [V, V // 2 + 1], dev)
            assert 1 <= C <= SPLIT_MAX_CHUNKS
            if C > 1:
                assert all(n % 2048 == 0 for n in lengths) and lengths[0] >= SPLIT_MIN_CHUNK
                assert C * lengths[0] >= V and (C - 1) * lengths[0] < V  # no empty chunk of the wider one
                assert C * lengths[1] >= V // 2 + 1
                assert rows * C <= 4 * DEFAULT_SM_COUNT
    assert plan_chunks(132, [262_144], dev)[0] == 1  # the rows alone fill the machine
    assert plan_chunks(256, [262_144], dev)[0] == 1
    assert plan_chunks(1, [5000], dev)[0] == 1  # too small to split
    assert plan_chunks(3, [37], dev, chunks=5) == (5, [8])
    assert plan_chunks(3, [10], dev, chunks=6) == (5, [2])  # 6 chunks of 2 would leave one empty
    assert plan_chunks(3, [37, 12], dev, chunks=4) == (4, [10, 3])
    for bad in (0, SPLIT_MAX_CHUNKS + 1, 2.0, True):
        with pytest.raises(ValueError, match="chunks"):
            plan_chunks(3, [37], dev, chunks=bad)


# ----------------------------------------------------------------------------- the torch records


@pytest.mark.parametrize("V,chunks", [(37, 1), (37, 4), (37, 37), (600, 7)])
def test_chunk_records_combine_to_the_unsplit_answers(V, chunks):
    gen = torch.Generator().manual_seed(V + chunks)
    C, (n,) = plan_chunks(1, [V], "cpu", chunks=chunks)
    x = tricky_rows(V, torch.float32, gen, min(n, V - 1) if C > 1 else V // 2)
    seeds, step, inv, _top_p, mode = row_params(gen)
    sampled = mode != SAMPLE_GREEDY
    recs = [chunk_partials_ref(x, c * n, min(c * n + n, V), seeds, step, 0, inv, sampled) for c in range(C)]
    p_top, entropy, greedy, draw, mt, zt = combine_partials_ref(torch.stack([r[0] for r in recs], 1),
                                                                torch.stack([r[1] for r in recs], 1))
    assert torch.equal(greedy, x.argmax(dim=-1))
    plain = torch.where(sampled, SAMPLE_GUMBEL, SAMPLE_GREEDY).to(torch.int32)  # the draw without the nucleus
    want = sample_rows_ref(x, seeds, step, 0, inv, torch.ones_like(inv), plain)
    assert torch.equal(torch.where(sampled, draw, greedy), want)
    want_p, want_h = base_stats_ref(x)
    torch.testing.assert_close(p_top, want_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy, want_h, rtol=1e-5, atol=1e-5)
    s = x * inv[:, None]
    torch.testing.assert_close(mt, s.max(dim=-1).values)
    torch.testing.assert_close(zt, torch.exp(s - mt[:, None]).sum(dim=-1), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- sample_rows


@pytest.mark.parametrize("V,dtype,chunks,stream", [
    (37, torch.float32, 2, 0), (37, torch.bfloat16, 5, 1), (9, torch.float16, 9, 0), (101, torch.float32, 3, 1),
    (600, torch.bfloat16, 7, 0)])
def test_sample_rows_split_equals_reference(V, dtype, chunks, stream):
    gen = torch.Generator().manual_seed(V * chunks)
    C, (n,) = plan_chunks(len(SAMPLERS), [V], "cpu", chunks=chunks)
    x = tricky_rows(V, dtype, gen, min(n, V - 1) if C > 1 else V // 2)
    seeds, step, inv, top_p, mode = row_params(gen)
    want = sample_rows_ref(x, seeds, step, stream, inv, top_p, mode)
    got = sample_rows(x, seeds, step, stream, inv, top_p, mode, chunks=chunks)
    assert got.dtype == torch.int64 and torch.equal(got, want), (got, want)
    assert int(want[0]) == min(n, V - 1) - 1 and int(want[6]) == 0  # the tie rows: the first index
    if chunks <= 3:  # the compile-time caps prune the same way as on the single-program path
        for cap in (SAMPLE_GREEDY, SAMPLE_GUMBEL):
            assert torch.equal(sample_rows(x, seeds, step, 0, inv, top_p, mode, max_sample=cap, chunks=chunks),
                               sample_rows_ref(x, seeds, step, 0, inv, top_p, mode, cap))


def test_sample_rows_split_all_neg_inf_and_one_token():
    x = torch.full((3, 9), float("-inf"))
    x[1, 8] = 0.0
    x[2, 4] = x[2, 5] = 1.0
    seeds = torch.tensor([1, 2, 3])
    step = torch.zeros(3, dtype=torch.int32)
    for t, p in ((0.0, 1.0), (0.7, 1.0), (0.7, 0.5)):
        inv = torch.full((3,), inverse_temperature(t))
        top = torch.full((3,), p)
        mode = torch.full((3,), sample_mode(t, p), dtype=torch.int32)
        if p < 1:  # a nucleus needs one finite logit (the reference's cut-off is undefined otherwise)
            x[0, 3] = 0.0
        want = sample_rows_ref(x, seeds, step, 0, inv, top, mode)
        assert want[:2].tolist() == [3 if p < 1 else 0, 8]
        for chunks in ((3,) if p < 1 else (2, 9)):  # 9: one entry per chunk
            assert torch.equal(sample_rows(x, seeds, step, 0, inv, top, mode, chunks=chunks), want)
    one = torch.randn(2, 1)
    inv, top, mode = torch.full((2,), 2.0), torch.full((2,), 0.5), torch.full((2,), SAMPLE_NUCLEUS, dtype=torch.int32)
    assert sample_rows(one, seeds[:2], step[:2], 0, inv, top, mode, chunks=1).tolist() == [0, 0]


# ----------------------------------------------------------------------------- nudge_step


def run_both(bl, nl, state, cursors, prm, chunks):
    ref_state, ref_cursors = clone(state), [clone(c) for c in cursors]
    nudge_step_ref(bl, nl, ref_state, apply(ref_state, prm), *ref_cursors)
    nudge_step(bl, nl, state, apply(state, prm), *cursors, chunks=chunks)
    assert_same(state, ref_state, "state.")
    for c, rc in zip(cursors, ref_cursors):
        assert_same(c, rc, "cursor.")


# (V, dtype, mode, chunks): every row of the mixed table (gate, threshold, granularity, sampler,
# stop ids, max_new differ per row)
# the mixed table's rows 0..5: greedy, nucleus, Gumbel rows, both gates, both granularities
@pytest.mark.parametrize("V,dtype,mode,chunks,rows", [
    (37, torch.float32, MODE_NUDGING, 3, slice(0, 6)), (13, torch.bfloat16, MODE_NUDGING, 13, slice(0, 3)),
    (37, torch.float16, MODE_BASE_ONLY, 4, slice(0, 6)), (37, torch.float32, MODE_NUDGER_ONLY, 5, slice(1, 5)),
    (300, torch.bfloat16, MODE_NUDGING, 2, slice(0, 6))])
def test_nudge_step_split_mixed_rows_equal_reference(V, dtype, mode, chunks, rows):
    bl, nl, state, cursors, cfgs = mixed_case(V, dtype, mode, seed=chunks, rows=MIXED_ROWS[rows])
    run_both(bl, nl, state, cursors, cfgs, chunks)


@pytest.mark.parametrize("V,dtype,gate,word,temperature,top_p,chunks", [
    (37, torch.float32, GATE_TOP_PROB, True, 0.0, 1.0, 7),
    (129, torch.bfloat16, GATE_ENTROPY, True, 0.7, 0.8, 2),
    (129, torch.float16, GATE_TOP_PROB, False, 0.7, 1.0, 4)])
def test_nudge_step_split_random_batches_equal_reference(V, dtype, gate, word, temperature, top_p, chunks):
    # the six kinds of rows of random_logits: random scales, peaked (also on a stop id), flat, two equal
    # maxima (1 and V - 2: different chunks), -inf padding
    bl, nl, state, cursors = random_case(V, dtype, MODE_NUDGING, B=6, seed=chunks)
    run_both(bl, nl, state, cursors, Cfg(MODE_NUDGING, gate, 0.4 if gate == GATE_TOP_PROB else 1.5, word,
                                         temperature, top_p, 6), chunks)


def test_nudge_step_split_models_of_different_vocabularies():
    """A nudger with a shorter vocabulary: its chunks are shorter, with empty ones past its end."""
    bl, _nl, state, cursors, cfgs = mixed_case(41, torch.float32, MODE_NUDGING, seed=3, rows=MIXED_ROWS[:4])
    gen = torch.Generator().manual_seed(8)
    nl = torch.randn(bl.shape[0], 13, generator=gen) * 3
    nl[0, 4] = nl[0, 9] = 20.0  # a tie split across two of its chunks
    for chunks in (3, 11):
        run_both(bl, nl, clone(state), [clone(c) for c in cursors], cfgs, chunks)


def test_nudge_step_split_equals_single_program_over_steps():
    """Six steps of the same batch with C = 1 and C = 4: the same states and cursors throughout."""
    bl, nl, state, cursors, cfgs = mixed_case(61, torch.bfloat16, MODE_NUDGING, seed=6,
                                              rows=[r for r in MIXED_ROWS if r[4] == 1.0][:4])  # no nucleus row
    other, other_cursors = clone(state), [clone(c) for c in cursors]
    prm = apply(state, cfgs)
    apply(other, cfgs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        bl = (torch.randn(bl.shape, generator=gen) * 3).to(bl.dtype)
        nl = (torch.randn(nl.shape, generator=gen) * 3).to(nl.dtype)
        nudge_step(bl, nl, state, prm, *cursors, chunks=1)
        nudge_step(bl, nl, other, prm, *other_cursors, chunks=4)
        assert_same(state, other, "state.")
        for c, oc in zip(cursors, other_cursors):
            assert_same(c, oc, "cursor.")


# ----------------------------------------------------------------------------- spec_accept


@pytest.mark.parametrize("V,dtype,mode,gate,word,temperature,top_p,K,chunks", [
    (37, torch.float32, MODE_NUDGING, GATE_TOP_PROB, True, 0.0, 1.0, 3, 4),
    (37, torch.float16, MODE_BASE_ONLY, GATE_TOP_PROB, False, 0.7, 1.0, 2, 3)])
def test_spec_accept_split_equals_sequential_rule(V, dtype, mode, gate, word, temperature, top_p, K, chunks):
    split = functools.partial(spec_accept, chunks=chunks)
    check_against_sequential(split, V, dtype, mode, gate, word, temperature, top_p, K, 5, set())


@pytest.mark.parametrize("V,dtype,mode,gate,word,temperature,top_p,K,chunks", [
    (37, torch.bfloat16, MODE_NUDGING, GATE_ENTROPY, False, 0.7, 0.8, 2, 3),
    (101, torch.float32, MODE_NUDGING, GATE_TOP_PROB, True, 0.0, 1.0, 3, 5)])
def test_spec_accept_split_equals_reference(V, dtype, mode, gate, word, temperature, top_p, K, chunks):
    split = functools.partial(spec_accept, chunks=chunks)
    check_against_reference(split, V, dtype, mode, gate, word, temperature, top_p, K, 4)
