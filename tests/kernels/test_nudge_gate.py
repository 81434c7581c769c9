"""The fused nudge step: Triton (interpreter on CPU) vs the torch reference vs a plain-Python model.

The plain-Python model below is written straight from DESIGN section 1, one row at a time, with
Python floats and ints (its own hash, softmax, nucleus and Gumbel-max), so the reference is checked
against the specification and the kernel against the reference. Expectations re-stated:
- a finished row is untouched (state, outputs, cursors);
- confident = p_top >= threshold (top_prob) or entropy <= threshold (entropy), untempered base logits;
- token granularity: b if confident and b not a stop id, else n;
- word granularity: BASE keeps b while confident and b not a stop, else NUDGE with span 1;
  NUDGE switches back (emitting b) only if span >= 1, word_start(n), (confident or b == n), b not a stop;
- an emitted stop id finishes the row (STOP) and is not written; reaching max_new finishes (LENGTH);
- a running row's cursors advance one position, with the slot of the new position.
"""
import math
from collections import Counter

import pytest
import torch

from nudgefast.kernels.nudge_gate import (FINISH_LENGTH, FINISH_NONE, FINISH_STOP, GATE_ENTROPY, GATE_TOP_PROB,
                                          MODE_BASE_ONLY, MODE_NUDGER_ONLY, MODE_NUDGING, STATE_BASE, STATE_NUDGE,
                                          GateParams, GateState, ModelCursor, gate_params_for, gate_state_for,
                                          new_gate_state, nudge_step, nudge_step_ref, set_row, set_row_params)
from nudgefast.kernels.rng import SALT_INDEX, SALT_SEED, SALT_STREAM
from gate_rows import MIXED_ROWS, Cfg, apply, legacy_state, row_of  # noqa: F401  (re-exported to test_spec_accept)
from gpu_margins import FAST_MATH_TOL, gate_margins, sample_margins

M32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- plain-Python model


def py_mix(x):
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def py_gumbel(seed, step, stream, i):
    k = py_mix(((seed >> 32) & M32) ^ SALT_SEED)
    k = py_mix(py_mix(py_mix(k ^ (seed & M32)) ^ (step & M32)) ^ ((stream + SALT_STREAM) & M32))
    h = py_mix((py_mix(k ^ i) + py_mix(k ^ SALT_INDEX)) & M32)
    w = min((h + 0.5) * 2.0**-32, 1 - 2.0**-24)
    return -math.log(-math.log1p(-w))


def py_candidate(row, seed, step, stream, temperature, top_p):
    if temperature == 0:
        return row.index(max(row))  # first index on ties
    s = [x / temperature for x in row]
    m = max(s)
    e = [math.exp(v - m) for v in s]
    z = sum(e)
    keep = [True] * len(row)
    if top_p < 1:
        p = [v / z for v in e]
        above, acc = {}, 0.0
        for value, count in sorted(Counter(p).items(), reverse=True):
            above[value] = acc  # mass of the strictly more probable tokens
            acc += value * count
        keep = [above[pi] < top_p for pi in p]
    best, best_v = None, -math.inf
    for i, v in enumerate(s):
        if keep[i] and v != -math.inf:
            v = v + py_gumbel(seed, step, stream, i)
            if best is None or v > best_v:
                best, best_v = i, v
    return best


def py_confident(row, gate, threshold):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    z = sum(e)
    p = [v / z for v in e]
    if gate == GATE_TOP_PROB:
        return max(p) >= threshold
    return -sum(q * math.log(q) for q in p if q > 0) <= threshold


def py_step(r, base_row, nudger_row, prm, stop, word_start):
    """One position of DESIGN section 1 for one row (a dict), in place."""
    if r["finished"] != FINISH_NONE:
        return
    t = r["n_out"]
    b = py_candidate(base_row, r["seed"], t, 0, prm.temperature, prm.top_p) if base_row is not None else None
    n = py_candidate(nudger_row, r["seed"], t, 1, prm.temperature, prm.top_p) if nudger_row is not None else None
    if prm.mode == MODE_BASE_ONLY:
        e, from_n = b, 0
    elif prm.mode == MODE_NUDGER_ONLY:
        e, from_n = n, 1
    else:
        confident = py_confident(base_row, prm.gate, prm.threshold)
        if not prm.word_level:
            e, from_n = (b, 0) if confident and b not in stop else (n, 1)
        elif r["word_state"] == STATE_BASE:
            if confident and b not in stop:
                e, from_n = b, 0
            else:
                r["word_state"], r["span"] = STATE_NUDGE, 1
                e, from_n = n, 1
        else:
            ws = n < len(word_start) and word_start[n]
            if r["span"] >= 1 and ws and (confident or b == n) and b not in stop:
                r["word_state"] = STATE_BASE
                e, from_n = b, 0
            else:
                r["span"] += 1
                e, from_n = n, 1
    if e in stop:
        r["finished"] = FINISH_STOP
        return
    r["out"][t], r["src"][t] = e, from_n
    r["n_out"] += 1
    r["n_nudged"] += from_n
    if r["n_out"] == prm.max_new_tokens:
        r["finished"] = FINISH_LENGTH
        return
    for c in r["cursors"]:
        c["ids"] = e
        c["pos"] += 1
        c["seq"] += 1
        c["slot"] = c["bt"][c["pos"] // c["page"]] * c["page"] + c["pos"] % c["page"]


def to_rows(state, cursors):
    rows = []
    for i in range(state.seed.shape[0]):
        rows.append(dict(
            seed=int(state.seed[i]), word_state=int(state.word_state[i]), span=int(state.span[i]),
            finished=int(state.finished[i]), n_out=int(state.n_out[i]), n_nudged=int(state.n_nudged[i]),
            out=state.out_tokens[i].tolist(), src=state.out_from_nudger[i].tolist(),
            cursors=[dict(ids=int(c.input_ids[i]), pos=int(c.positions[i]), seq=int(c.seq_lens[i]),
                          slot=int(c.slot_mapping[i]), bt=c.block_tables[i].tolist(), page=c.page_size)
                     for c in cursors]))
    return rows


def run_python(state, cursors, base_logits, nudger_logits, prm):
    """One step of the plain-Python model; prm: one Cfg for every row or a list (one per row)."""
    rows = to_rows(state, cursors)
    cfgs = list(prm) if isinstance(prm, (list, tuple)) else [prm] * len(rows)
    ws = state.word_start.tolist()
    for i, r in enumerate(rows):
        stop = set(state.stop_ids[i].tolist()) - {-1}
        py_step(r, None if base_logits is None else base_logits[i].float().tolist(),
                None if nudger_logits is None else nudger_logits[i].float().tolist(), cfgs[i], stop, ws)
    return rows


# ----------------------------------------------------------------------------- batch builders


def clone(obj):
    return type(obj)(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(obj).items()})


def assert_same(a, b, what=""):
    for k, v in vars(a).items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, getattr(b, k)), f"{what}{k}: {v.tolist()} != {getattr(b, k).tolist()}"


def make_cursor(positions, P, page, gen):
    B = len(positions)
    pos = torch.tensor(positions, dtype=torch.int64)
    bt = torch.randperm(4 * B * P, generator=gen)[: B * P].reshape(B, P).to(torch.int32)
    slot = bt.gather(1, (pos // page).unsqueeze(1)).squeeze(1).long() * page + pos % page
    return ModelCursor(input_ids=torch.randint(0, 9, (B,), generator=gen), positions=pos,
                       seq_lens=(pos + 1).to(torch.int32), slot_mapping=slot, block_tables=bt, page_size=page)


def make_state(B, V, max_new, gen, stop=(3,), finished_every=5):
    W = max(1, V - 3)  # the last ids are past the tokenizer's vocabulary: never word starts
    return legacy_state(
        seed=torch.randint(-(2**62), 2**62, (B,), generator=gen),
        word_state=torch.randint(0, 2, (B,), generator=gen, dtype=torch.int32),
        span=torch.randint(0, 3, (B,), generator=gen, dtype=torch.int32),
        finished=torch.tensor([FINISH_LENGTH if i % finished_every == finished_every - 1 else 0 for i in range(B)],
                              dtype=torch.int32),
        n_out=torch.randint(0, max_new, (B,), generator=gen, dtype=torch.int32),
        n_nudged=torch.randint(0, 3, (B,), generator=gen, dtype=torch.int32),
        out_tokens=torch.full((B, max_new), -1, dtype=torch.int32),
        out_from_nudger=torch.full((B, max_new), -1, dtype=torch.int8),
        stop_ids=torch.tensor(list(stop), dtype=torch.int64),
        word_start=torch.rand(W, generator=gen) < 0.5,
    )


def random_logits(B, V, gen, stop_id):
    """Rows of every kind the gate must handle: random scales, peaked (p ~ 1, sometimes on a stop id),
    flat (all equal), two equal maxima, and -inf padding entries."""
    x = torch.randn(B, V, generator=gen) * torch.empty(B, 1).uniform_(0.3, 6.0, generator=gen)
    for i in range(B):
        kind = i % 6
        if kind == 1:
            x[i, int(torch.randint(0, V, (1,), generator=gen))] = 40.0
        elif kind == 2:
            x[i] = 0.0
        elif kind == 3 and V > 4:
            x[i, 1] = x[i, V - 2] = float(x[i].max()) + 2.0
        elif kind == 4:
            x[i, stop_id] = 40.0
        elif kind == 5 and V > 4:
            x[i, -2:] = float("-inf")
    return x


def positions_crossing_pages(B, page, gen):
    """About half the rows sit on the last slot of a page, so the step moves them to the next page."""
    return [page * (1 + i % 3) - 1 if i % 2 == 0 else int(torch.randint(0, 3 * page - 1, (1,), generator=gen))
            for i in range(B)]


IMPLS = [pytest.param(nudge_step_ref, id="ref"), pytest.param(nudge_step, id="triton")]


# ----------------------------------------------------------------------------- explicit transitions

V_SMALL, STOP, PAGE = 37, 5, 4
WS_TRUE, WS_FALSE = 12, 13  # even ids are word starts in these scenarios
PAST_W = 35  # >= W: not a word start whatever the table says
# (word_state, span, confident, b, n, n_out) -> (emitted or None, from_nudger, word_state, span, finished)
WORD_CASES = [
    ("BASE->BASE", (STATE_BASE, 4, True, 10, WS_TRUE, 0), (10, 0, STATE_BASE, 4, FINISH_NONE)),
    ("BASE->NUDGE unconfident", (STATE_BASE, 4, False, 10, WS_TRUE, 0), (WS_TRUE, 1, STATE_NUDGE, 1, FINISH_NONE)),
    ("BASE->NUDGE b is stop", (STATE_BASE, 4, True, STOP, WS_TRUE, 0), (WS_TRUE, 1, STATE_NUDGE, 1, FINISH_NONE)),
    ("BASE->NUDGE b stop unconfident", (STATE_BASE, 0, False, STOP, 14, 0), (14, 1, STATE_NUDGE, 1, FINISH_NONE)),
    ("NUDGE->BASE confident", (STATE_NUDGE, 2, True, 10, WS_TRUE, 0), (10, 0, STATE_BASE, 2, FINISH_NONE)),
    ("NUDGE->BASE b == n", (STATE_NUDGE, 2, False, WS_TRUE, WS_TRUE, 0), (WS_TRUE, 0, STATE_BASE, 2, FINISH_NONE)),
    ("span 0 blocks the switch", (STATE_NUDGE, 0, True, 10, WS_TRUE, 0), (WS_TRUE, 1, STATE_NUDGE, 1, FINISH_NONE)),
    ("n not a word start", (STATE_NUDGE, 2, True, 10, WS_FALSE, 0), (WS_FALSE, 1, STATE_NUDGE, 3, FINISH_NONE)),
    ("n past the word table", (STATE_NUDGE, 2, True, 10, PAST_W, 0), (PAST_W, 1, STATE_NUDGE, 3, FINISH_NONE)),
    ("NUDGE stays unconfident", (STATE_NUDGE, 2, False, 10, WS_TRUE, 0), (WS_TRUE, 1, STATE_NUDGE, 3, FINISH_NONE)),
    ("b stop blocks the switch", (STATE_NUDGE, 2, True, STOP, WS_TRUE, 0), (WS_TRUE, 1, STATE_NUDGE, 3, FINISH_NONE)),
    ("n is stop", (STATE_NUDGE, 2, True, 10, STOP, 3), (None, 1, STATE_NUDGE, 3, FINISH_STOP)),
    ("max_new reached", (STATE_BASE, 1, True, 10, WS_TRUE, 5), (10, 0, STATE_BASE, 1, FINISH_LENGTH)),
]
TOKEN_CASES = [  # (confident, b, n) -> (emitted or None, from_nudger)
    ((True, 10, 14), (10, 0)),
    ((True, STOP, 14), (14, 1)),
    ((False, 10, 14), (14, 1)),
    ((False, 10, STOP), (None, 1)),
    ((True, 14, 14), (14, 0)),
]


def scenario_batch(rows, gate, dtype=torch.float32):
    """Greedy rows with the given (word_state, span, confident, b, n, n_out), plus one finished row."""
    B = len(rows) + 1
    gen = torch.Generator().manual_seed(0)
    state = make_state(B, V_SMALL, 6, gen, stop=(STOP, 30), finished_every=B)  # only the last row is finished
    state.word_start = torch.tensor([i % 2 == 0 for i in range(34)])
    base_logits = torch.zeros(B, V_SMALL)
    nudger_logits = torch.zeros(B, V_SMALL)
    for i, (ws, span, confident, b, n, n_out) in enumerate(rows):
        state.word_state[i], state.span[i], state.n_out[i] = ws, span, n_out
        base_logits[i, b] = 30.0 if confident else 1.0  # p ~ 1, H ~ 0; or p = 0.07, H = 3.5 nats
        nudger_logits[i, n] = 30.0
    base_logits[-1, 7] = nudger_logits[-1, 7] = 30.0
    cursors = [make_cursor([PAGE - 1] * B, 3, PAGE, gen), make_cursor([2 * PAGE - 1] * B, 3, PAGE, gen)]
    threshold = 0.4 if gate == GATE_TOP_PROB else 1.0
    return state, cursors, base_logits.to(dtype), nudger_logits.to(dtype), threshold


def check_expected(before, after, cursors_before, cursors_after, i, expected, token_state=False):
    token, from_n, ws, span, finished = expected
    n0 = int(before.n_out[i])
    assert int(after.finished[i]) == finished
    if not token_state:
        assert (int(after.word_state[i]), int(after.span[i])) == (ws, span)
    if token is None:  # a stop id: nothing written
        assert int(after.n_out[i]) == n0 and torch.equal(after.out_tokens[i], before.out_tokens[i])
    else:
        assert int(after.n_out[i]) == n0 + 1
        assert int(after.out_tokens[i, n0]) == token and int(after.out_from_nudger[i, n0]) == from_n
        assert int(after.n_nudged[i]) == int(before.n_nudged[i]) + from_n
    for cb, ca in zip(cursors_before, cursors_after):
        if finished != FINISH_NONE:
            assert int(ca.positions[i]) == int(cb.positions[i]) and int(ca.slot_mapping[i]) == int(cb.slot_mapping[i])
            assert int(ca.input_ids[i]) == int(cb.input_ids[i]) and int(ca.seq_lens[i]) == int(cb.seq_lens[i])
        else:
            pos = int(cb.positions[i]) + 1  # the last slot of a page: the new position opens the next page
            assert int(ca.input_ids[i]) == token and int(ca.positions[i]) == pos
            assert int(ca.seq_lens[i]) == int(cb.seq_lens[i]) + 1
            assert int(ca.slot_mapping[i]) == int(ca.block_tables[i, pos // PAGE]) * PAGE + pos % PAGE
            assert pos % PAGE == 0


def check_untouched(before, after, cursors_before, cursors_after, i):
    for k, v in vars(before).items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == before.seed.shape[0]:
            assert torch.equal(v[i], getattr(after, k)[i]), k
    for cb, ca in zip(cursors_before, cursors_after):
        for k, v in vars(cb).items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v[i], getattr(ca, k)[i]), k


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate", [GATE_TOP_PROB, GATE_ENTROPY])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_word_level_transitions(impl, gate, dtype):
    state, cursors, bl, nl, threshold = scenario_batch([c[1] for c in WORD_CASES], gate, dtype)
    prm = apply(state, Cfg(MODE_NUDGING, gate, threshold, True, 0.0, 1.0, 6))
    before, cur_before = clone(state), [clone(c) for c in cursors]
    impl(bl, nl, state, prm, *cursors)
    for i, (name, _, expected) in enumerate(WORD_CASES):
        check_expected(before, state, cur_before, cursors, i, expected)
    check_untouched(before, state, cur_before, cursors, len(WORD_CASES))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate", [GATE_TOP_PROB, GATE_ENTROPY])
def test_token_level_and_single_model_modes(impl, gate):
    rows = [(STATE_NUDGE, 0, c, b, n, 0) for (c, b, n), _ in TOKEN_CASES]
    for mode in (MODE_NUDGING, MODE_BASE_ONLY, MODE_NUDGER_ONLY):
        state, cursors, bl, nl, threshold = scenario_batch(rows, gate)
        prm = apply(state, Cfg(mode, gate, threshold, False, 0.0, 1.0, 6))
        before, cur_before = clone(state), [clone(c) for c in cursors]
        impl(None if mode == MODE_NUDGER_ONLY else bl, None if mode == MODE_BASE_ONLY else nl, state, prm, *cursors)
        for i, ((confident, b, n), (token, from_n)) in enumerate(TOKEN_CASES):
            if mode == MODE_BASE_ONLY:
                token, from_n = (None if b == STOP else b), 0
            elif mode == MODE_NUDGER_ONLY:
                token, from_n = (None if n == STOP else n), 1
            finished = FINISH_STOP if token is None else FINISH_NONE
            check_expected(before, state, cur_before, cursors, i, (token, from_n, None, None, finished), True)
            assert int(state.word_state[i]) == STATE_NUDGE and int(state.span[i]) == 0  # token level: untouched
        check_untouched(before, state, cur_before, cursors, len(TOKEN_CASES))


# ----------------------------------------------------------------------------- random batches

# (V, dtype, mode, gate, word, temperature, top_p)
TABLE = [
    (37, torch.float32, MODE_NUDGING, GATE_TOP_PROB, True, 0.0, 1.0),
    (37, torch.bfloat16, MODE_NUDGING, GATE_ENTROPY, True, 0.7, 0.8),
    (37, torch.float32, MODE_NUDGING, GATE_ENTROPY, False, 0.7, 1.0),
    (37, torch.float32, MODE_BASE_ONLY, GATE_TOP_PROB, False, 0.7, 0.8),
    (37, torch.bfloat16, MODE_NUDGER_ONLY, GATE_TOP_PROB, False, 0.0, 1.0),
    (1000, torch.bfloat16, MODE_NUDGING, GATE_TOP_PROB, True, 0.7, 1.0),
    (1000, torch.float32, MODE_NUDGING, GATE_TOP_PROB, False, 0.0, 1.0),
    (1000, torch.float32, MODE_NUDGER_ONLY, GATE_TOP_PROB, False, 0.7, 1.0),
    (1000, torch.bfloat16, MODE_BASE_ONLY, GATE_TOP_PROB, False, 0.0, 1.0),
    (4099, torch.float32, MODE_NUDGING, GATE_ENTROPY, True, 0.0, 1.0),
    (4099, torch.bfloat16, MODE_NUDGING, GATE_TOP_PROB, True, 0.7, 0.8),
    (4099, torch.float32, MODE_NUDGING, GATE_TOP_PROB, False, 0.7, 1.0),
]


def random_case(V, dtype, mode, B=8, seed=0, max_new=6):
    gen = torch.Generator().manual_seed(seed * 7919 + V)
    stop = (3, V - 4)
    state = make_state(B, V, max_new, gen, stop=stop)
    bl = random_logits(B, V, gen, stop[0]).to(dtype)
    nl = random_logits(B, V, gen, stop[1]).to(dtype)
    nl[::3] = bl[::3]  # some rows where the two models agree (b == n under greedy)
    page = 3
    cursors = [make_cursor(positions_crossing_pages(B, page, gen), 4, page, gen) for _ in range(2)]
    return (None if mode == MODE_NUDGER_ONLY else bl), (None if mode == MODE_BASE_ONLY else nl), state, cursors


def python_matches(state, cursors, rows):
    want = dict(word_state=[r["word_state"] for r in rows], span=[r["span"] for r in rows],
                finished=[r["finished"] for r in rows], n_out=[r["n_out"] for r in rows],
                n_nudged=[r["n_nudged"] for r in rows], out_tokens=[r["out"] for r in rows],
                out_from_nudger=[r["src"] for r in rows])
    for k, v in want.items():
        assert getattr(state, k).tolist() == v, k
    for j, c in enumerate(cursors):
        assert c.input_ids.tolist() == [r["cursors"][j]["ids"] for r in rows]
        assert c.positions.tolist() == [r["cursors"][j]["pos"] for r in rows]
        assert c.seq_lens.tolist() == [r["cursors"][j]["seq"] for r in rows]
        assert c.slot_mapping.tolist() == [r["cursors"][j]["slot"] for r in rows]


@pytest.mark.parametrize("V,dtype,mode,gate,word,temperature,top_p", TABLE)
def test_reference_matches_python_model(V, dtype, mode, gate, word, temperature, top_p):
    for seed in range(3):
        bl, nl, state, cursors = random_case(V, dtype, mode, seed=seed)
        prm = Cfg(mode, gate, 0.4 if gate == GATE_TOP_PROB else 1.5, word, temperature, top_p, 6)
        rows = run_python(state, cursors, bl, nl, prm)
        nudge_step_ref(bl, nl, state, apply(state, prm), *cursors)
        python_matches(state, cursors, rows)


@pytest.mark.parametrize("V,dtype,mode,gate,word,temperature,top_p", TABLE)
def test_triton_matches_reference(V, dtype, mode, gate, word, temperature, top_p):
    bl, nl, state, cursors = random_case(V, dtype, mode, seed=11)
    prm = Cfg(mode, gate, 0.4 if gate == GATE_TOP_PROB else 1.5, word, temperature, top_p, 6)
    ref_state, ref_cursors = clone(state), [clone(c) for c in cursors]
    nudge_step_ref(bl, nl, ref_state, apply(ref_state, prm), *ref_cursors)
    nudge_step(bl, nl, state, apply(state, prm), *cursors)
    assert_same(state, ref_state, "state.")
    for c, rc in zip(cursors, ref_cursors):
        assert_same(c, rc, "cursor.")


@pytest.mark.parametrize("word,temperature,top_p", [(True, 0.7, 1.0), (False, 0.0, 1.0)])
def test_thirty_steps_triton_reference_python(word, temperature, top_p):
    B, V, steps = 5, 50, 30
    gen = torch.Generator().manual_seed(5)
    state = make_state(B, V, steps, gen, stop=(3, 44), finished_every=5)
    state.word_state.fill_(STATE_NUDGE)
    state.span.zero_()
    state.n_out.zero_()
    state.n_nudged.zero_()
    cursors = [make_cursor([0] * B, 12, 3, gen), make_cursor([2] * B, 12, 3, gen)]
    prm = Cfg(MODE_NUDGING, GATE_TOP_PROB, 0.35, word, temperature, top_p, steps)
    ref_state, ref_cursors = clone(state), [clone(c) for c in cursors]
    rows = to_rows(state, cursors)
    stop, ws = set(state.stop_ids[0].tolist()), state.word_start.tolist()  # every row has the same stop ids
    for _ in range(steps):
        bl = torch.randn(B, V, generator=gen) * torch.empty(B, 1).uniform_(0.5, 5.0, generator=gen)
        nl = torch.randn(B, V, generator=gen) * 3
        nl[:, 3] -= 4.0  # stop ids are rare but reachable
        nl[:, 44] -= 4.0
        nudge_step(bl, nl, state, apply(state, prm), *cursors)
        nudge_step_ref(bl, nl, ref_state, apply(ref_state, prm), *ref_cursors)
        for i, r in enumerate(rows):
            py_step(r, bl[i].tolist(), nl[i].tolist(), prm, stop, ws)
    assert_same(state, ref_state, "state.")
    for c, rc in zip(cursors, ref_cursors):
        assert_same(c, rc, "cursor.")
    python_matches(ref_state, ref_cursors, rows)
    assert 0 < int(state.n_nudged.sum()) < int(state.n_out.sum())  # both models wrote


# ----------------------------------------------------------------------------- mixed rows (per-row parameters)



def mixed_case(V, dtype, mode, seed, rows=MIXED_ROWS):
    """A batch whose rows all differ: gate, threshold, granularity, sampler, seed, max_new, stop ids
    (0 to 3 per row, padded with -1), and n_out (some rows one token before their max_new)."""
    B = len(rows)
    bl, nl, state, cursors = random_case(V, dtype, mode, B=B, seed=seed, max_new=max(r[-1] for r in rows))
    cfgs = [Cfg(mode, *r) for r in rows]
    gen = torch.Generator().manual_seed(seed)
    state.stop_ids = torch.full((B, 3), -1, dtype=torch.int64)
    for i, c in enumerate(cfgs):
        stops = torch.randperm(V, generator=gen)[: i % 4].tolist()
        if i % 4 and bl is not None:
            stops[0] = int(bl[i].float().argmax())  # a stop id that the base candidate may hit
        state.stop_ids[i, :len(stops)] = torch.tensor(stops, dtype=torch.int64)
        state.n_out[i] = min(int(state.n_out[i]), c.max_new_tokens - 1) if i % 3 else c.max_new_tokens - 1
    return bl, nl, state, cursors, cfgs


def solo_rows(impl, bl, nl, state, cursors, cfgs):
    """Each row run alone (a batch of one, with its own compile-time sampler): a list of (state, cursors)."""
    out = []
    for i, c in enumerate(cfgs):
        st, cs = row_of(state, i), [row_of(cur, i) for cur in cursors]
        impl(None if bl is None else bl[i:i + 1], None if nl is None else nl[i:i + 1], st, apply(st, c), *cs)
        out.append((st, cs))
    return out


def assert_rows_equal(state, cursors, solo):
    for i, (st, cs) in enumerate(solo):
        assert_same(row_of(state, i), st, f"row {i} state.")
        for c, sc in zip(cursors, cs):
            assert_same(row_of(c, i), sc, f"row {i} cursor.")


@pytest.mark.parametrize("mode", [MODE_NUDGING, MODE_BASE_ONLY, MODE_NUDGER_ONLY])
def test_mixed_rows_reference_matches_python_model_and_solo_rows(mode):
    for seed in range(3):
        bl, nl, state, cursors, cfgs = mixed_case(37 if seed != 1 else 300, torch.float32, mode, seed)
        prm = apply(state, cfgs)
        rows = run_python(state, cursors, bl, nl, cfgs)
        solo = solo_rows(nudge_step_ref, bl, nl, state, cursors, cfgs)
        nudge_step_ref(bl, nl, state, prm, *cursors)
        python_matches(state, cursors, rows)
        assert_rows_equal(state, cursors, solo)
        assert {r["finished"] for r in rows} >= {FINISH_NONE, FINISH_LENGTH}, "the batch must exercise max_new"


@pytest.mark.parametrize("mode,V,dtype", [(MODE_NUDGING, 37, torch.float32), (MODE_NUDGING, 300, torch.bfloat16),
                                          (MODE_BASE_ONLY, 37, torch.float32)])
def test_mixed_rows_triton_matches_reference_and_solo_rows(mode, V, dtype):
    bl, nl, state, cursors, cfgs = mixed_case(V, dtype, mode, seed=4)
    prm = apply(state, cfgs)
    ref_state, ref_cursors = clone(state), [clone(c) for c in cursors]
    solo = solo_rows(nudge_step, bl, nl, state, cursors, cfgs)
    nudge_step_ref(bl, nl, ref_state, prm, *ref_cursors)
    nudge_step(bl, nl, state, prm, *cursors)
    assert_same(state, ref_state, "state.")
    for c, rc in zip(cursors, ref_cursors):
        assert_same(c, rc, "cursor.")
    assert_rows_equal(state, cursors, solo)


def test_greedy_compiled_batch_equals_nucleus_compiled_batch():
    """max_sample only prunes code: an all-greedy batch gives the same under either constant."""
    bl, nl, state, cursors, cfgs = mixed_case(37, torch.float32, MODE_NUDGING, seed=5,
                                              rows=[r for r in MIXED_ROWS if r[3] == 0.0])
    prm = apply(state, cfgs)
    assert prm.max_sample == 0
    other, other_cursors = clone(state), [clone(c) for c in cursors]
    nudge_step(bl, nl, state, prm, *cursors)
    nudge_step(bl, nl, other, GateParams(MODE_NUDGING), *other_cursors)
    assert_same(state, other, "state.")


@pytest.mark.parametrize("impl", IMPLS)
def test_out_tokens_ring_wraps(impl):
    """Output step t lands at column t % Wout: a narrow ring holds the last Wout tokens of a wide run."""
    B, V, steps, width = 4, 40, 11, 4
    gen = torch.Generator().manual_seed(9)
    wide = make_state(B, V, steps, gen, stop=(V + 5,), finished_every=B + 1)  # a stop id never drawn
    wide.n_out.zero_()
    cursors = [make_cursor([0] * B, 8, 3, gen)]
    narrow = legacy_state(**{k: getattr(wide, k).clone() for k in (
        "seed", "word_state", "span", "finished", "n_out", "n_nudged", "stop_ids", "word_start")},
        out_tokens=torch.zeros(B, width, dtype=torch.int32), out_from_nudger=torch.zeros(B, width, dtype=torch.int8))
    cfg = Cfg(MODE_NUDGING, GATE_TOP_PROB, 0.4, True, 0.7, 1.0, steps)
    prm_w, prm_n = apply(wide, cfg), apply(narrow, cfg)
    narrow_cursors = [clone(c) for c in cursors]
    for _ in range(steps):
        bl, nl = torch.randn(B, V, generator=gen) * 3, torch.randn(B, V, generator=gen) * 3
        impl(bl, nl, wide, prm_w, *cursors, None)
        impl(bl, nl, narrow, prm_n, *narrow_cursors, None)
    for r in range(B):
        n = int(wide.n_out[r])
        assert n == int(narrow.n_out[r]) == steps
        for t in range(n - width, n):
            assert int(narrow.out_tokens[r, t % width]) == int(wide.out_tokens[r, t])
            assert int(narrow.out_from_nudger[r, t % width]) == int(wide.out_from_nudger[r, t])


def test_state_helpers():
    ws = torch.tensor([True, False, True])
    st = new_gate_state(3, out_width=5, stop_width=2, word_start=ws)
    assert st.finished.tolist() == [FINISH_STOP] * 3  # inert slots: no kernel touches them
    set_row(st, 1, seed=7, gate="entropy", threshold=1.5, granularity="word", temperature=0.5, top_p=0.9,
            max_new_tokens=4, stop_ids=[11], n_out=2)
    assert st.finished.tolist() == [FINISH_STOP, FINISH_NONE, FINISH_STOP]
    assert st.stop_ids[1].tolist() == [11, -1] and int(st.n_out[1]) == 2 and int(st.seed[1]) == 7
    assert (int(st.gate[1]), int(st.word_level[1]), int(st.sample_mode[1]), int(st.max_new[1])) == (
        GATE_ENTROPY, 1, 2, 4)
    assert float(st.inv_temp[1]) == 2.0 and float(st.threshold[1]) == 1.5
    cfg = type("C", (), dict(mode="nudging", gate="top_prob", threshold=0.3, granularity="token", temperature=0.0,
                             top_p=1.0, max_new_tokens=6))()
    st = gate_state_for(cfg, 2, [5, 2, 5], ws, [3, 4])
    assert st.stop_ids.tolist() == [[2, 5], [2, 5]] and st.finished.tolist() == [0, 0]
    assert st.out_tokens.shape == (2, 6) and st.max_new.tolist() == [6, 6] and st.sample_mode.tolist() == [0, 0]
    assert gate_params_for(cfg) == GateParams(MODE_NUDGING, 0)
    with pytest.raises(ValueError, match="n_out"):
        set_row(st, 0, seed=7, gate="entropy", threshold=1.5, granularity="word", temperature=0.5, top_p=0.9,
                max_new_tokens=4, stop_ids=[], n_out=4)
    empty = gate_state_for(cfg, 1, [], ws, [3])
    assert empty.stop_ids.tolist() == [[-1]]


def test_bad_inputs_are_rejected():
    bl, nl, state, cursors = random_case(37, torch.float32, MODE_NUDGING)
    prm = apply(state, Cfg(MODE_NUDGING, GATE_TOP_PROB, 0.4, True, 0.0, 1.0, 6))
    with pytest.raises(ValueError, match="nudger_logits"):
        nudge_step_ref(bl, None, state, prm, *cursors)
    with pytest.raises(ValueError, match="mode"):
        nudge_step_ref(bl, nl, state, GateParams(5), *cursors)
    with pytest.raises(ValueError, match="max_sample"):
        nudge_step(bl, nl, state, GateParams(MODE_NUDGING, 7), *cursors)
    with pytest.raises(ValueError, match="rows"):
        nudge_step(bl[:3], nl, state, prm, *cursors)
    # the per-row parameters are validated where they are written (never in the decode loop)
    for kwargs, match in ((dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                          (dict(max_new_tokens=0), "max_new_tokens"), (dict(gate="maxprob"), "gate"),
                          (dict(granularity="sentence"), "granularity")):
        args = dict(gate="top_prob", threshold=0.4, granularity="word", temperature=0.0, top_p=1.0,
                    max_new_tokens=6) | kwargs
        with pytest.raises(ValueError, match=match):
            set_row_params(state, 0, **args)
    with pytest.raises(ValueError, match="stop ids"):
        set_row(state, 0, seed=1, gate="top_prob", threshold=0.4, granularity="word", temperature=0.0, top_p=1.0,
                max_new_tokens=6, stop_ids=[1, 2, 3])  # wider than the state's stop_ids
    bad = clone(state)
    bad.stop_ids = bad.stop_ids[0]
    with pytest.raises(ValueError, match="stop_ids"):
        nudge_step_ref(bl, nl, bad, prm, *cursors)
    bad = clone(state)
    bad.threshold = bad.threshold.double()
    with pytest.raises(TypeError, match="threshold"):
        nudge_step(bl, nl, bad, prm, *cursors)
    state.n_out = state.n_out.long()
    with pytest.raises(TypeError, match="n_out"):
        nudge_step(bl, nl, state, prm, *cursors)


# ----------------------------------------------------------------------------- GPU


def robust_rows(bl, nl, state):
    """bool [B]: rows whose candidates and gate decision are farther than FAST_MATH_TOL from a rounding
    boundary (gpu_margins.py): on a GPU only these are expected to equal the reference exactly."""
    ok = torch.ones(state.seed.shape[0], dtype=torch.bool)
    rows = (state.seed, state.n_out)
    params = (state.inv_temp, state.top_p, state.sample_mode)
    if bl is not None:
        ok &= sample_margins(bl, *rows, 0, *params) > FAST_MATH_TOL
        ok &= gate_margins(bl, state.gate, state.threshold) > FAST_MATH_TOL
    if nl is not None:
        ok &= sample_margins(nl, *rows, 1, *params) > FAST_MATH_TOL
    return ok


@pytest.mark.gpu
@pytest.mark.parametrize("chunks", [None, 1])  # None: rows split over programs (B = 8 < SMs); 1: one program
@pytest.mark.parametrize("V", [50_000, 151_936])
@pytest.mark.parametrize("mode,word,temperature,top_p", [
    (MODE_NUDGING, True, 0.0, 1.0), (MODE_NUDGING, True, 0.7, 0.9), (MODE_NUDGING, False, 0.8, 1.0),
    (MODE_BASE_ONLY, False, 0.7, 1.0)])
def test_gpu_real_vocab_bf16(V, mode, word, temperature, top_p, chunks):
    bl, nl, state, cursors = random_case(V, torch.bfloat16, mode, B=8, seed=1)
    to = lambda t: None if t is None else t.cuda()  # noqa: E731
    prm = Cfg(mode, GATE_TOP_PROB, 0.4, word, temperature, top_p, 6)
    apply(state, prm)
    # The kernel's gate statistics and draws use fast-math exp/log and FMA contraction on the GPU, the
    # reference rounds every op: rows within FAST_MATH_TOL of a decision boundary are left out
    # (gpu_margins.py), the others must be exactly equal.
    ok = robust_rows(bl, nl, state)
    assert int((~ok).sum()) <= 1, "too many rows at a rounding boundary: pick other test data"
    state = GateState(**{k: to(v) for k, v in vars(state).items()})
    cursors = [ModelCursor(**{k: to(v) if isinstance(v, torch.Tensor) else v for k, v in vars(c).items()})
               for c in cursors]
    ref_state, ref_cursors = clone(state), [clone(c) for c in cursors]
    nudge_step_ref(to(bl), to(nl), ref_state, apply(ref_state, prm), *ref_cursors)
    nudge_step(to(bl), to(nl), state, apply(state, prm), *cursors, chunks=chunks)
    for i in ok.nonzero().flatten().tolist():
        assert_same(row_of(state, i), row_of(ref_state, i), f"row {i} state.")
        for c, rc in zip(cursors, ref_cursors):
            assert_same(row_of(c, i), row_of(rc, i), f"row {i} cursor.")


@pytest.mark.gpu
def test_gpu_step_replays_in_a_cuda_graph():
    # Graph against eager on the same device: the same kernels, so exact (no fast-math caveat). At
    # B = 8 the launcher splits rows: the graph also captures the chunk workspace from its pool.
    bl, nl, state, cursors = random_case(50_000, torch.bfloat16, MODE_NUDGING, B=8, seed=2, max_new=12)
    state = GateState(**{k: v.cuda() for k, v in vars(state).items()})
    cursors = [ModelCursor(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in vars(c).items()})
               for c in cursors]
    bl, nl = bl.cuda(), nl.cuda()
    prm = apply(state, Cfg(MODE_NUDGING, GATE_TOP_PROB, 0.4, True, 0.7, 0.9, 12))  # before the capture
    eager_state, eager_cursors = clone(state), [clone(c) for c in cursors]
    nudge_step(bl, nl, clone(state), prm, *[clone(c) for c in cursors])  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nudge_step(bl, nl, state, prm, *cursors)
    for _ in range(3):
        graph.replay()
        nudge_step(bl, nl, eager_state, prm, *eager_cursors)
    torch.cuda.synchronize()
    assert_same(state, eager_state, "state.")
    for c, ec in zip(cursors, eager_cursors):
        assert_same(c, ec, "cursor.")
