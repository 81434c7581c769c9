"""The gate exactly on its threshold, for every implementation of the step and of the accept round:
the torch references, the Triton kernels (interpreter on the CPU) and the C++ step.

Base rows whose statistics are exact in float32 and float64 alike: one logit far above the others
(p = 1, H = 0 exactly: exp(-1000) is 0) and two equal logits far above the others (p = 1/2 exactly,
H = ln 2). A threshold equal to such a value must count as confident (`p >= threshold`,
`H <= threshold`); the next float past it must not. The expected tokens are written by hand.

States and params are built in ONE helper (`make_step`), so a change of the kernels' interface
(per-row parameters) is a change in one place.
"""
import math

import pytest
import torch

from nudgefast.kernels.nudge_gate import (FINISH_NONE, MODE_NUDGING, STATE_BASE,
                                          STATE_NUDGE, GateParams, ModelCursor, new_gate_state, nudge_step,
                                          nudge_step_ref, set_row)
from nudgefast.kernels.sample import SAMPLE_GREEDY
from nudgefast.kernels.spec_accept import SpecStats, spec_accept, spec_accept_ref
from nudgefast.ops import native_ops_available

V, LOW = 29, -1000.0
X1, X2, X3, A, STOP = 6, 9, 12, 17, 3


def native_step(*args):
    from nudgefast.native import nudge_step_native
    return nudge_step_native(*args)


STEPS = [pytest.param(nudge_step_ref, id="ref"), pytest.param(nudge_step, id="triton"),
         pytest.param(native_step, id="native",
                      marks=pytest.mark.skipif(not native_ops_available(), reason="nudgefast._C is not built"))]
ACCEPTS = [pytest.param(spec_accept_ref, id="ref"), pytest.param(spec_accept, id="triton")]


def make_step(B, *, gate, threshold, word_level, max_new=4, word_state=STATE_NUDGE, span=0):
    """(state, params, base cursor, nudger cursor): greedy, stop ids {STOP}, even ids word starts,
    every row running from output step 0, every row with the same (per-row) parameters."""
    state = new_gate_state(B, out_width=max_new, stop_width=1,
                           word_start=torch.tensor([i % 2 == 0 for i in range(V)]))
    for r in range(B):
        set_row(state, r, seed=11 + r, gate=gate, threshold=float(threshold),
                granularity="word" if word_level else "token", temperature=0.0, top_p=1.0, max_new_tokens=max_new,
                stop_ids=[STOP], word_state=word_state, span=span)
    state.out_tokens.fill_(-1)
    state.out_from_nudger.fill_(-1)
    params = GateParams(MODE_NUDGING, max_sample=SAMPLE_GREEDY)

    def cursor():
        pos = torch.full((B,), 5, dtype=torch.int64)
        return ModelCursor(input_ids=torch.zeros(B, dtype=torch.int64), positions=pos, seq_lens=(pos + 1).to(torch.int32),
                           slot_mapping=pos.clone(), block_tables=torch.arange(B * 4, dtype=torch.int32).view(B, 4),
                           page_size=4)
    return state, params, cursor(), cursor()


def row(*tops):
    """Logits with the given ids at 0 and every other id at LOW."""
    x = torch.full((V,), LOW)
    x[list(tops)] = 0.0
    return x


TIE, SURE = row(X1, X2), row(X3)  # p = 1/2, H = ln 2 (argmax X1) and p = 1, H = 0 (argmax X3)

def f32_after(x, toward):
    """The float32 next to float32(x) toward `toward`: the kernels compare in float32, threshold included."""
    return torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(toward, dtype=torch.float32)).item()


# (gate, threshold) -> is (TIE, SURE) confident
THRESHOLD_CASES = [
    ("top_prob", 0.5, (True, True)),
    ("top_prob", f32_after(0.5, 1.0), (False, True)),
    ("top_prob", 1.0, (False, True)),
    ("entropy", 0.0, (False, True)),
    ("entropy", math.log(2), (True, True)),
    ("entropy", f32_after(math.log(2), 0.0), (False, True)),
]


def test_statistics_are_exact():
    from nudgefast.kernels.nudge_gate import base_stats_ref
    p, h = base_stats_ref(torch.stack([TIE, SURE]))
    assert p.tolist() == [0.5, 1.0]
    assert h.tolist() == [torch.tensor(math.log(2), dtype=torch.float32).item(), 0.0]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("gate, threshold, confident", THRESHOLD_CASES)
@pytest.mark.parametrize("word_level", [False, True])
def test_step_on_the_threshold(step, gate, threshold, confident, word_level):
    """Token level: confident -> b. Word level from BASE: confident -> b (stay BASE), else n (NUDGE);
    and from NUDGE with span 1 and n a word start: confident -> b, else n (b != n)."""
    rows = [(TIE, STATE_BASE), (SURE, STATE_BASE), (TIE, STATE_NUDGE), (SURE, STATE_NUDGE)]
    state, params, base, nudger = make_step(len(rows), gate=gate, threshold=threshold, word_level=word_level, span=1)
    state.word_state.copy_(torch.tensor([ws for _, ws in rows], dtype=torch.int32))
    base_logits = torch.stack([lg for lg, _ in rows])
    nudger_logits = torch.stack([row(A + 1)] * len(rows))  # n = 18: a word start, never equal to b
    step(base_logits, nudger_logits, state, params, base, nudger)
    conf = [confident[0], confident[1]] * 2
    b = [X1, X3, X1, X3]
    assert state.out_tokens[:, 0].tolist() == [bi if c else A + 1 for bi, c in zip(b, conf)]
    assert state.out_from_nudger[:, 0].tolist() == [0 if c else 1 for c in conf]
    assert state.finished.tolist() == [FINISH_NONE] * 4
    if word_level:
        assert state.word_state.tolist() == [STATE_BASE if c else STATE_NUDGE for c in conf]


@pytest.mark.parametrize("step", STEPS)
def test_step_stop_ids_on_the_threshold(step):
    """Exactly confident (p = 1 = threshold) and b a stop id: token level takes n; a BASE row hands
    over to the nudger; a NUDGE row keeps the nudger. A stop n ends the row unwritten."""
    for word_level, word_state, n, want in ((False, STATE_NUDGE, A, (A, 1, FINISH_NONE)),
                                            (True, STATE_BASE, A, (A, 1, FINISH_NONE)),
                                            (True, STATE_NUDGE, A + 1, (A + 1, 1, FINISH_NONE)),
                                            (True, STATE_NUDGE, STOP, (-1, -1, 1))):
        state, params, base, nudger = make_step(1, gate="top_prob", threshold=1.0, word_level=word_level,
                                                word_state=word_state, span=1)
        step(row(STOP)[None], row(n)[None], state, params, base, nudger)
        got = (int(state.out_tokens[0, 0]), int(state.out_from_nudger[0, 0]), int(state.finished[0]))
        assert got == want, (word_level, word_state, n)
        if word_level:
            assert int(state.word_state[0]) == STATE_NUDGE


def run_accept(accept, verify, draft, *, gate, threshold, word_state):
    B = verify.shape[0]
    state, params, base, nudger = make_step(B, gate=gate, threshold=threshold, word_level=True, max_new=6,
                                            word_state=word_state, span=1)
    nudger.input_ids.copy_(base.input_ids)
    accept(verify, draft, state, params, base, nudger, SpecStats.zeros(B))
    return state


@pytest.mark.parametrize("accept", ACCEPTS)
@pytest.mark.parametrize("gate, threshold, confident", THRESHOLD_CASES)
def test_accept_on_the_threshold(accept, gate, threshold, confident):
    """K = 1 from BASE. Row 0: the verify row is the tie with the draft X1 (= b): confident -> the
    base keeps it (provenance base), and then the bonus position (sure X3) is emitted; not
    confident -> the nudger's X1 (provenance nudger) and no bonus (NUDGE). Row 1: the draft is A,
    position 0 is sure of X3 and position 1 is the tie: X3 is a correction (b != draft), always
    confident. Row 2: draft X3 on the sure row, bonus on the tie: the bonus only when the tie is
    confident."""
    verify = torch.stack([torch.stack([TIE, SURE]), torch.stack([SURE, TIE]), torch.stack([SURE, TIE])])
    draft = torch.tensor([[X1], [A], [X3]], dtype=torch.int64)
    state = run_accept(accept, verify, draft, gate=gate, threshold=threshold, word_state=STATE_BASE)
    tie_ok = confident[0]
    want = [([X1, X3], [0, 0]) if tie_ok else ([X1], [1]),
            ([X3], [0]),
            ([X3, X1], [0, 0]) if tie_ok else ([X3], [0])]
    for i, (tokens, src) in enumerate(want):
        n = int(state.n_out[i])
        assert (state.out_tokens[i, :n].tolist(), state.out_from_nudger[i, :n].tolist()) == (tokens, src), i


@pytest.mark.parametrize("accept", ACCEPTS)
def test_accept_stop_ids_on_the_threshold(accept):
    """Exactly confident rows (p = 1 = threshold) whose b is a stop id: from BASE the draft (the
    nudger's) is taken and the state turns NUDGE (no bonus); a bonus on a stop id is not emitted
    (row 1); from NUDGE the hand-back to a word start (row 2) is refused."""
    verify = torch.stack([torch.stack([row(STOP), row(X3)]), torch.stack([row(A), row(STOP)]),
                          torch.stack([row(STOP), row(X3)])])
    draft = torch.tensor([[A], [A], [A + 1]], dtype=torch.int64)
    for word_state, want in ((STATE_BASE, [([A], [1]), ([A], [0]), ([A + 1], [1])]),
                             (STATE_NUDGE, [([A], [1]), ([A], [1]), ([A + 1], [1])])):
        state = run_accept(accept, verify, draft, gate="top_prob", threshold=1.0, word_state=word_state)
        for i, (tokens, src) in enumerate(want):
            n = int(state.n_out[i])
            got = (state.out_tokens[i, :n].tolist(), state.out_from_nudger[i, :n].tolist())
            assert got == (tokens, src), (word_state, i)
        # no row ended: in particular the stop id at row 1's bonus position was not emitted
        assert state.finished.tolist() == [FINISH_NONE] * 3, word_state
