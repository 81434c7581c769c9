"""Speculative accept: Triton (interpreter on CPU) vs the torch reference, and both against the
sequential rule.

The key property re-stated: when the draft is the nudger's own candidates (step n_out + i, stream 1),
one spec_accept round emits exactly what consecutive nudge_step calls emit on the same per-position
logits, up to and including the first position whose emitted token differs from the draft (the
correction), or all K drafts plus, where the rule at position K does not need the nudger (base_only,
or token granularity / word state BASE, confident, b not a stop id), the bonus token. State, outputs
and both cursors must then equal the sequential ones after that many positions.
"""
import pytest
import torch

from nudgefast.kernels.nudge_gate import (FINISH_LENGTH, FINISH_NONE, FINISH_STOP, GATE_ENTROPY, GATE_TOP_PROB,
                                          MODE_BASE_ONLY, MODE_NUDGER_ONLY, MODE_NUDGING, STATE_BASE, STATE_NUDGE,
                                          GateParams, GateState, ModelCursor, candidate_ref, nudge_step_ref)
from nudgefast.kernels.sample import sample_ref
from nudgefast.kernels.spec_accept import SpecStats, spec_accept, spec_accept_ref
from gate_rows import Cfg, apply, legacy_state, row_of
from test_nudge_gate import assert_same, clone  # the state helpers, not restated
from gpu_margins import FAST_MATH_TOL, gate_margins, sample_margins

STOP, PAGE = 5, 3
IMPLS = [pytest.param(spec_accept_ref, id="ref"), pytest.param(spec_accept, id="triton")]


def assert_same_row(a, b, row, what):
    """Every per-row tensor of a (GateState, ModelCursor or SpecStats) equals b's at `row`."""
    rows = a.finished.shape[0] if isinstance(a, GateState) else next(iter(vars(a).values())).shape[0]
    for k, v in vars(a).items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows:
            assert torch.equal(v[row], getattr(b, k)[row]), (what, k)


def make_cursor(B, gen, pages=8):
    pos = torch.randint(0, 2 * PAGE, (B,), generator=gen)
    bt = torch.randperm(4 * B * pages, generator=gen)[: B * pages].reshape(B, pages).to(torch.int32)
    slot = bt.gather(1, (pos // PAGE).unsqueeze(1)).squeeze(1).long() * PAGE + pos % PAGE
    return ModelCursor(input_ids=torch.randint(0, 9, (B,), generator=gen), positions=pos,
                       seq_lens=(pos + 1).to(torch.int32), slot_mapping=slot, block_tables=bt, page_size=PAGE)


def make_batch(B, V, max_new, gen, word_state=None, span=None, n_out=None, finished=None):
    W = V - 2  # the last two ids are never word starts
    state = legacy_state(
        seed=torch.randint(-(2**62), 2**62, (B,), generator=gen),
        word_state=torch.randint(0, 2, (B,), generator=gen, dtype=torch.int32) if word_state is None
        else torch.tensor(word_state, dtype=torch.int32),
        span=torch.randint(0, 3, (B,), generator=gen, dtype=torch.int32) if span is None
        else torch.tensor(span, dtype=torch.int32),
        finished=torch.zeros(B, dtype=torch.int32) if finished is None else torch.tensor(finished, dtype=torch.int32),
        n_out=torch.zeros(B, dtype=torch.int32) if n_out is None else torch.tensor(n_out, dtype=torch.int32),
        n_nudged=torch.zeros(B, dtype=torch.int32),
        out_tokens=torch.full((B, max_new), -1, dtype=torch.int32),
        out_from_nudger=torch.full((B, max_new), -1, dtype=torch.int8),
        stop_ids=torch.tensor([STOP, V - 1], dtype=torch.int64),
        word_start=torch.tensor([i % 2 == 0 for i in range(W)]),
    )
    base, nudger = make_cursor(B, gen), make_cursor(B, gen)
    nudger.input_ids.copy_(base.input_ids)
    return state, base, nudger


def run_round(impl, verify, draft, state, prm, base, nudger):
    stats = SpecStats.zeros(state.seed.shape[0])
    impl(verify, draft, state, apply(state, prm), base, nudger, stats)
    return stats


# ----------------------------------------------------------------------------- explicit rounds


def peaked(V, token, confident):
    row = torch.zeros(V)
    row[token] = 30.0 if confident else 1.0  # p ~ 1 (H ~ 0) or p ~ 0.07 (H ~ 3.5 nats) at V = 37
    return row


# name: (word_state, span, n_out, finished, base rows [(b, confident)] * (K+1), draft) ->
#       (emitted tokens, from_nudger, finished, accepted, prev_kv_missing)
K3_CASES = [
    ("full accept + bonus", (STATE_BASE, 1, 0, 0, [(10, 1), (12, 1), (14, 1), (20, 1)], [10, 12, 14]),
     ([10, 12, 14, 20], [0, 0, 0, 0], FINISH_NONE, 3, 1)),
    ("full accept, NUDGE at K: no bonus", (STATE_NUDGE, 0, 0, 0, [(11, 0), (11, 0), (11, 0), (20, 1)], [12, 13, 14]),
     ([12, 13, 14], [1, 1, 1], FINISH_NONE, 3, 0)),
    ("full accept, unconfident at K: no bonus", (STATE_BASE, 1, 0, 0, [(10, 1), (12, 1), (14, 1), (20, 0)],
                                                 [10, 12, 14]), ([10, 12, 14], [0, 0, 0], FINISH_NONE, 3, 0)),
    ("full accept, stop at K: no bonus", (STATE_BASE, 1, 0, 0, [(10, 1), (12, 1), (14, 1), (STOP, 1)], [10, 12, 14]),
     ([10, 12, 14], [0, 0, 0], FINISH_NONE, 3, 0)),
    ("rejected at the first position", (STATE_BASE, 1, 0, 0, [(10, 1), (12, 1), (14, 1), (20, 1)], [16, 12, 14]),
     ([10], [0], FINISH_NONE, 0, 0)),
    ("switch to BASE mid-draft, then a correction", (STATE_NUDGE, 1, 0, 0, [(11, 0), (12, 1), (9, 1), (20, 1)],
                                                     [13, 12, 14]), ([13, 12, 9], [1, 0, 0], FINISH_NONE, 2, 0)),
    ("draft holds a stop id", (STATE_NUDGE, 2, 0, 0, [(11, 0), (11, 0), (11, 0), (20, 1)], [12, STOP, 14]),
     ([12], [1], FINISH_STOP, 1, 0)),
    ("stop at the first position", (STATE_BASE, 1, 0, 0, [(STOP, 1), (12, 1), (14, 1), (20, 1)], [STOP, 12, 14]),
     ([], [], FINISH_STOP, 0, 0)),
    ("max_new reached mid-draft", (STATE_BASE, 1, 8, 0, [(10, 1), (12, 1), (14, 1), (20, 1)], [10, 12, 14]),
     ([10, 12], [0, 0], FINISH_LENGTH, 2, 0)),
    ("already finished", (STATE_BASE, 1, 4, FINISH_LENGTH, [(10, 1), (12, 1), (14, 1), (20, 1)], [10, 12, 14]),
     None),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate", [GATE_TOP_PROB, GATE_ENTROPY])
def test_explicit_rounds_word_level(impl, gate):
    V, K, max_new = 37, 3, 10
    specs = [c[1] for c in K3_CASES]
    gen = torch.Generator().manual_seed(1)
    state, base, nudger = make_batch(len(specs), V, max_new, gen, word_state=[s[0] for s in specs],
                                     span=[s[1] for s in specs], n_out=[s[2] for s in specs],
                                     finished=[s[3] for s in specs])
    verify = torch.stack([torch.stack([peaked(V, b, c) for b, c in s[4]]) for s in specs])
    draft = torch.tensor([s[5] for s in specs], dtype=torch.int64)
    prm = apply(state, Cfg(MODE_NUDGING, gate, 0.4 if gate == GATE_TOP_PROB else 1.0, True, 0.0, 1.0, max_new))
    before, b0, n0 = clone(state), clone(base), clone(nudger)
    stats = run_round(impl, verify, draft, state, prm, base, nudger)
    for i, (name, spec, expected) in enumerate(K3_CASES):
        if expected is None:  # finished: nothing moves, stats included
            for obj, ref in ((state, before), (base, b0), (nudger, n0)):
                assert_same_row(obj, ref, i, name)
            assert int(stats.rounds[i]) == 0 and int(stats.emitted[i]) == 0, name
            continue
        tokens, src, finished, accepted, missing = expected
        c, start = len(tokens), spec[2]
        assert state.out_tokens[i, start:start + c].tolist() == tokens, name
        assert state.out_from_nudger[i, start:start + c].tolist() == src, name
        assert int(state.n_out[i]) == start + c and int(state.finished[i]) == finished, name
        assert int(state.n_nudged[i]) == sum(src), name
        assert [int(stats.rounds[i]), int(stats.drafted[i]), int(stats.accepted[i]), int(stats.emitted[i]),
                int(stats.round_emitted[i]), int(stats.prev_kv_missing[i])] == [1, K, accepted, c, c, missing], name
        # cursors move as the sequential steps move them: one per emitted token after which the row ran on
        moved = c - 1 if finished == FINISH_LENGTH else c
        for cur, cur0 in ((base, b0), (nudger, n0)):
            if moved == 0:
                assert_same_row(cur, cur0, i, name)
                continue
            pos = int(cur0.positions[i]) + moved
            assert int(cur.input_ids[i]) == tokens[moved - 1] and int(cur.positions[i]) == pos, name
            assert int(cur.seq_lens[i]) == int(cur0.seq_lens[i]) + moved, name
            assert int(cur.slot_mapping[i]) == int(cur.block_tables[i, pos // PAGE]) * PAGE + pos % PAGE, name
        want_prev = tokens[-2] if (finished == FINISH_NONE and c >= 2) else int(n0.input_ids[i])
        assert int(stats.prev_token[i]) == want_prev, name


@pytest.mark.parametrize("impl", IMPLS)
def test_explicit_rounds_token_level_and_base_only(impl):
    V, K, max_new = 37, 2, 10
    rows = [[(10, 1), (12, 1), (20, 1)], [(10, 1), (12, 0), (20, 1)], [(10, 1), (12, 1), (STOP, 1)]]
    drafts = [[10, 12], [10, 13], [10, 12]]
    verify = torch.stack([torch.stack([peaked(V, b, c) for b, c in r]) for r in rows])
    draft = torch.tensor(drafts, dtype=torch.int64)
    want = {
        # token level: position 1 of row 1 is unconfident, so the rule takes n = the draft (accepted);
        # row 2 ends on a confident stop id at K: no bonus
        MODE_NUDGING: [([10, 12, 20], FINISH_NONE), ([10, 13, 20], FINISH_NONE), ([10, 12], FINISH_NONE)],
        # base_only: plain speculative decoding with the nudger as the draft model; the bonus is b_K,
        # and a bonus stop id ends the row
        MODE_BASE_ONLY: [([10, 12, 20], FINISH_NONE), ([10, 12], FINISH_NONE), ([10, 12], FINISH_STOP)],
    }
    for mode, expected in want.items():
        gen = torch.Generator().manual_seed(2)
        state, base, nudger = make_batch(3, V, max_new, gen)
        prm = Cfg(mode, GATE_TOP_PROB, 0.4, False, 0.0, 1.0, max_new)
        stats = run_round(impl, verify, draft, state, prm, base, nudger)
        for i, (tokens, finished) in enumerate(expected):
            assert state.out_tokens[i, :len(tokens)].tolist() == tokens, (mode, i)
            assert int(state.n_out[i]) == len(tokens) and int(state.finished[i]) == finished, (mode, i)
            assert int(stats.prev_kv_missing[i]) == int(len(tokens) == K + 1 and finished == FINISH_NONE)


# ----------------------------------------------------------------------------- the sequential property


def property_batch(B, V, K, dtype, gen, temperature):
    """Per-position base and nudger logits for K+1 positions, with rows built to agree (peaked on the
    same token), to disagree, to draft a stop id, to run into max_new, or already finished."""
    max_new = 12
    n_out = [0] * B
    finished = [0] * B
    base_rows = torch.randn(B, K + 1, V, generator=gen) * 3
    nudger_rows = torch.randn(B, K + 1, V, generator=gen) * 3
    for i in range(B):
        kind = i % 6
        tokens = torch.randint(6, V - 2, (K + 1,), generator=gen)
        if kind in (0, 1, 4):  # agree everywhere (kind 4 also runs into max_new mid-draft)
            for j in range(K + 1):
                base_rows[i, j, tokens[j]] = nudger_rows[i, j, tokens[j]] = 40.0
            if kind == 4:
                n_out[i] = max_new - max(1, K // 2)
        elif kind == 2:  # agree, then the nudger drafts a stop id where the base model is unsure
            for j in range(K + 1):
                base_rows[i, j, tokens[j]] = nudger_rows[i, j, tokens[j]] = 40.0
            at = min(1, K - 1)
            nudger_rows[i, at, STOP] = 80.0
            base_rows[i, at] = torch.randn(V, generator=gen) * 0.1
        elif kind == 3:  # agree on a prefix only (none in the second such row), then a confident base
            cut = 0 if i >= 6 else int(torch.randint(0, K + 1, (1,), generator=gen))  # model disagrees
            for j in range(K + 1):
                base_rows[i, j, tokens[j]] = 40.0
                nudger_rows[i, j, tokens[j] if j < cut else tokens[j] + 1] = 40.0
        elif kind == 5:
            finished[i] = FINISH_STOP if i % 2 else FINISH_LENGTH
    state, base, nudger = make_batch(B, V, max_new, gen, n_out=n_out, finished=finished)
    return base_rows.to(dtype), nudger_rows.to(dtype), state, base, nudger


def sequential_snapshots(base_rows, nudger_rows, state, prm, base, nudger):
    snaps = [(clone(state), clone(base), clone(nudger))]
    for j in range(base_rows.shape[1]):
        nl = None if prm.mode == MODE_BASE_ONLY else nudger_rows[:, j]
        nudge_step_ref(base_rows[:, j], nl, state, apply(state, prm), base, nudger)
        snaps.append((clone(state), clone(base), clone(nudger)))
    return snaps


def expected_positions(snaps, draft, prm, row, K):
    """How many sequential positions one round covers for this row (see the module docstring)."""
    start = snaps[0][0]
    if int(start.finished[row]) != FINISH_NONE:
        return 0
    n0 = int(start.n_out[row])
    for j in range(K):
        after = snaps[j + 1][0]
        if int(after.finished[row]) != FINISH_NONE and int(after.n_out[row]) == n0 + j:
            return j + 1  # stopped on a stop id
        if int(after.out_tokens[row, n0 + j]) != int(draft[row, j]) or int(after.finished[row]) != FINISH_NONE:
            return j + 1  # correction, or the length limit
    if prm.mode == MODE_BASE_ONLY:
        return K + 1
    before_k, after_k = snaps[K][0], snaps[K + 1][0]
    needs_no_n = not prm.word_level or int(before_k.word_state[row]) == STATE_BASE
    took_b = int(after_k.n_out[row]) == n0 + K + 1 and int(after_k.out_from_nudger[row, n0 + K]) == 0
    return K + 1 if needs_no_n and took_b else K


# (V, dtype, mode, gate, word, temperature, top_p, K)
PROPERTY_TABLE = [
    (37, torch.float32, MODE_NUDGING, GATE_TOP_PROB, True, 0.0, 1.0, 1),
    (37, torch.float32, MODE_NUDGING, GATE_TOP_PROB, True, 0.0, 1.0, 3),
    (37, torch.bfloat16, MODE_NUDGING, GATE_ENTROPY, True, 0.7, 1.0, 4),
    (37, torch.float32, MODE_NUDGING, GATE_TOP_PROB, False, 0.7, 0.8, 8),
    (300, torch.bfloat16, MODE_NUDGING, GATE_TOP_PROB, False, 0.0, 1.0, 4),
    (300, torch.float32, MODE_NUDGING, GATE_ENTROPY, True, 0.7, 0.8, 3),
    (300, torch.float32, MODE_BASE_ONLY, GATE_TOP_PROB, False, 0.0, 1.0, 3),
    (300, torch.bfloat16, MODE_BASE_ONLY, GATE_TOP_PROB, False, 0.7, 1.0, 8),
    (1000, torch.float32, MODE_NUDGING, GATE_TOP_PROB, True, 0.7, 1.0, 8),
]


def check_against_sequential(impl, V, dtype, mode, gate, word, temperature, top_p, K, seed, seen):
    gen = torch.Generator().manual_seed(seed)
    B = 12
    base_rows, nudger_rows, state, base, nudger = property_batch(B, V, K, dtype, gen, temperature)
    cfg = Cfg(mode, gate, 0.4 if gate == GATE_TOP_PROB else 1.0, word, temperature, top_p, 12)
    prm = apply(state, cfg)
    # the draft: the nudger's candidates at output steps n_out + i, as the engine's draft loop makes them
    draft = torch.stack([sample_ref(nudger_rows[:, i], state.seed, state.n_out + i, 1, temperature, top_p)
                         for i in range(K)], dim=1)
    snaps = sequential_snapshots(base_rows, nudger_rows, clone(state), prm, clone(base), clone(nudger))
    start_state, start_base, start_nudger = clone(state), clone(base), clone(nudger)
    stats = SpecStats.zeros(B)
    impl(base_rows, draft, state, prm, base, nudger, stats)
    for row in range(B):
        s = expected_positions(snaps, draft, cfg, row, K)
        for got, want in zip((state, base, nudger), snaps[s]):
            assert_same_row(got, want, row, (row, s))
        c = int(state.n_out[row]) - int(start_state.n_out[row])
        running = int(state.finished[row]) == FINISH_NONE
        assert int(stats.round_emitted[row]) == c and int(stats.emitted[row]) == c
        assert int(stats.prev_kv_missing[row]) == int(running and c == K + 1)
        if running:
            n = int(state.n_out[row])
            prev = int(state.out_tokens[row, n - 2]) if c >= 2 else int(start_nudger.input_ids[row])
            assert int(stats.prev_token[row]) == prev
        if s:
            first = int(start_state.n_out[row])
            accepted = sum(int(state.out_tokens[row, first + j]) == int(draft[row, j]) for j in range(min(c, K)))
            assert int(stats.accepted[row]) == accepted
            seen.add("bonus" if c == K + 1 else "all accepted" if c == K and running else
                     "stop" if int(state.finished[row]) == FINISH_STOP else
                     "length" if not running else "first rejected" if c == 1 else "rejected later")


@pytest.mark.parametrize("V,dtype,mode,gate,word,temperature,top_p,K", PROPERTY_TABLE)
def test_reference_equals_sequential_rule(V, dtype, mode, gate, word, temperature, top_p, K):
    seen = set()
    for seed in range(4):
        check_against_sequential(spec_accept_ref, V, dtype, mode, gate, word, temperature, top_p, K, seed, seen)
    # the batch builder must actually produce the interesting rounds
    assert {"bonus", "first rejected", "length"} <= seen or K == 1 or mode == MODE_BASE_ONLY, seen
    if mode == MODE_NUDGING:
        assert "stop" in seen, seen


@pytest.mark.parametrize("V,dtype,mode,gate,word,temperature,top_p,K", [PROPERTY_TABLE[i] for i in (1, 3, 5, 6)])
def test_triton_equals_sequential_rule(V, dtype, mode, gate, word, temperature, top_p, K):
    check_against_sequential(spec_accept, V, dtype, mode, gate, word, temperature, top_p, K, 7, set())


@pytest.mark.parametrize("V,dtype,mode,gate,word,temperature,top_p,K", [
    (37, torch.float32, MODE_NUDGING, GATE_TOP_PROB, True, 0.0, 1.0, 4),
    (37, torch.bfloat16, MODE_NUDGING, GATE_ENTROPY, False, 0.7, 0.8, 3),
    (1000, torch.bfloat16, MODE_NUDGING, GATE_TOP_PROB, True, 0.7, 1.0, 8),
    (1000, torch.float32, MODE_BASE_ONLY, GATE_TOP_PROB, False, 0.0, 1.0, 1),
])
def test_triton_equals_reference_on_random_drafts(V, dtype, mode, gate, word, temperature, top_p, K):
    check_against_reference(spec_accept, V, dtype, mode, gate, word, temperature, top_p, K, 10)


def check_against_reference(impl, V, dtype, mode, gate, word, temperature, top_p, K, B):
    """impl (spec_accept, or it with a forced split) equals spec_accept_ref on B rows of random
    drafts, half of them the base's argmax (long accepts): state, cursors and counters."""
    gen = torch.Generator().manual_seed(V + K)
    base_rows, _nudger_rows, state, base, nudger = property_batch(B, V, K, dtype, gen, temperature)
    draft = torch.randint(0, V, (B, K), generator=gen)
    draft[::2] = base_rows[::2, :K].float().argmax(-1)  # half the rows draft the base argmax: long accepts
    prm = Cfg(mode, gate, 0.4 if gate == GATE_TOP_PROB else 1.0, word, temperature, top_p, 12)
    ref = [clone(state), clone(base), clone(nudger), SpecStats.zeros(B)]
    got = [state, base, nudger, SpecStats.zeros(B)]
    spec_accept_ref(base_rows, draft, ref[0], apply(ref[0], prm), ref[1], ref[2], ref[3])
    impl(base_rows, draft, got[0], apply(got[0], prm), got[1], got[2], got[3])
    for g, r in zip(got, ref):
        assert_same(g, r)


# (gate, threshold, word, temperature, top_p, max_new): every row of the mixed batch differs
MIXED = [
    (GATE_TOP_PROB, 0.4, True, 0.0, 1.0, 12),
    (GATE_ENTROPY, 1.0, True, 0.7, 0.8, 11),
    (GATE_TOP_PROB, 0.6, False, 1.3, 1.0, 10),
    (GATE_ENTROPY, 0.5, False, 0.0, 1.0, 12),
    (GATE_TOP_PROB, 0.2, True, 0.7, 1.0, 11),
    (GATE_ENTROPY, 2.0, False, 0.9, 0.5, 10),
]


@pytest.mark.parametrize("impl,V,K", [pytest.param(spec_accept_ref, 37, 3, id="ref-37"),
                                      pytest.param(spec_accept_ref, 300, 4, id="ref-300"),
                                      pytest.param(spec_accept, 37, 3, id="triton-37")])
def test_mixed_rows_equal_sequential_rule_and_solo_rows(impl, V, K):
    gen = torch.Generator().manual_seed(V * K)
    B = 12
    base_rows, nudger_rows, state, base, nudger = property_batch(B, V, K, torch.float32, gen, 0.7)
    cfgs = [Cfg(MODE_NUDGING, *MIXED[i % len(MIXED)]) for i in range(B)]
    for i, c in enumerate(cfgs):  # per-row stop ids (STOP everywhere: the batch drafts it), per-row lengths
        state.stop_ids[i] = torch.tensor([[STOP, -1], [STOP, V - 1], [STOP, 7]][i % 3])
        if int(state.n_out[i]) >= c.max_new_tokens:
            state.n_out[i] = c.max_new_tokens - 1
    prm = apply(state, cfgs)
    draft = torch.stack([candidate_ref(nudger_rows[:, i], state, prm, state.n_out + i, 1) for i in range(K)], dim=1)
    snaps = sequential_snapshots(base_rows, nudger_rows, clone(state), prm, clone(base), clone(nudger))
    solo = []
    for i, c in enumerate(cfgs):
        one = [row_of(state, i), row_of(base, i), row_of(nudger, i), SpecStats.zeros(1)]
        impl(base_rows[i:i + 1], draft[i:i + 1], one[0], apply(one[0], c), one[1], one[2], one[3])
        solo.append(one)
    stats = SpecStats.zeros(B)
    impl(base_rows, draft, state, prm, base, nudger, stats)
    kinds = set()
    for row in range(B):
        s = expected_positions(snaps, draft, cfgs[row], row, K)
        for got, want in zip((state, base, nudger), snaps[s]):
            assert_same_row(got, want, row, (row, s))
        for got, want in zip((state, base, nudger, stats), solo[row]):
            assert_same(row_of(got, row), want, f"row {row} solo: ")
        kinds.add(s)
    assert len(kinds) >= 3, kinds  # rows covered different numbers of positions


def test_bad_inputs_are_rejected():
    gen = torch.Generator().manual_seed(0)
    state, base, nudger = make_batch(2, 37, 6, gen)
    verify = torch.randn(2, 4, 37)
    draft = torch.zeros(2, 3, dtype=torch.int64)
    prm = Cfg(MODE_NUDGING, GATE_TOP_PROB, 0.4, True, 0.0, 1.0, 6)
    with pytest.raises(ValueError, match="K\\+1"):
        spec_accept_ref(verify[:, :3], draft, state, apply(state, prm), base, nudger, SpecStats.zeros(2))
    with pytest.raises(ValueError, match="base model"):
        spec_accept(verify, draft, state, GateParams(MODE_NUDGER_ONLY), base, nudger,
                    SpecStats.zeros(2))
    with pytest.raises(TypeError, match="draft"):
        spec_accept(verify, draft.int(), state, apply(state, prm), base, nudger, SpecStats.zeros(2))
    with pytest.raises(TypeError, match="nudger"):
        spec_accept(verify, draft, state, apply(state, prm), base, None, SpecStats.zeros(2))


@pytest.mark.gpu
@pytest.mark.parametrize("chunks", [None, 1])  # None: positions split over programs (B x (K+1) < SMs); 1: not
@pytest.mark.parametrize("V", [50_000, 151_936])
@pytest.mark.parametrize("word,temperature,top_p,K", [(True, 0.0, 1.0, 4), (True, 0.7, 0.9, 3), (False, 0.8, 1.0, 8)])
def test_gpu_real_vocab(V, word, temperature, top_p, K, chunks):
    gen = torch.Generator().manual_seed(V)
    B = 8
    base_rows, nudger_rows, state, base, nudger = property_batch(B, V, K, torch.bfloat16, gen, temperature)
    prm = Cfg(MODE_NUDGING, GATE_TOP_PROB, 0.4, word, temperature, top_p, 12)
    apply(state, prm)
    # fast-math exp/log and FMA contraction on the GPU (gpu_margins.py): rows with a position decided
    # within FAST_MATH_TOL of a boundary are left out of the exact comparison, counted
    ok = torch.ones(B, dtype=torch.bool)
    for i in range(K + 1):
        ok &= sample_margins(base_rows[:, i], state.seed, state.n_out + i, 0, state.inv_temp, state.top_p,
                             state.sample_mode) > FAST_MATH_TOL
        ok &= gate_margins(base_rows[:, i], state.gate, state.threshold) > FAST_MATH_TOL
    assert int((~ok).sum()) <= 1, "too many rows at a rounding boundary: pick other test data"
    cuda = lambda o: type(o)(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in vars(o).items()})  # noqa
    state, base, nudger = cuda(state), cuda(base), cuda(nudger)
    base_rows, nudger_rows = base_rows.cuda(), nudger_rows.cuda()
    draft = torch.stack([sample_ref(nudger_rows[:, i], state.seed, state.n_out + i, 1, temperature, top_p)
                         for i in range(K)], dim=1)
    ref = [clone(state), clone(base), clone(nudger), cuda(SpecStats.zeros(B))]
    got = [state, base, nudger, cuda(SpecStats.zeros(B))]
    spec_accept_ref(base_rows, draft, ref[0], apply(ref[0], prm), ref[1], ref[2], ref[3])
    spec_accept(base_rows, draft, got[0], apply(got[0], prm), got[1], got[2], got[3], chunks=chunks)
    for row in ok.nonzero().flatten().tolist():
        for g, r in zip(got, ref):
            assert_same_row(g, r, row, "gpu")
