"""The fused nudging step: gate statistics, both candidates, the rule, the ending, and the splice.

One decode step of DESIGN section 1 for a whole batch, in place on device tensors. Every row carries
its own parameters in GateState (gate, threshold, granularity, temperature, top_p, max_new, stop ids),
so requests with different settings share one launch; only the mode (which logits exist) and the
most general sampler are compile-time (GateParams). Per running row (finished == 0; finished rows
are not touched at all, cursors included), with that row's parameters:
1. p = max softmax and H = entropy (nats) of the untempered base logits, in ONE pass that also draws
   the base candidate when it can (greedy, or temperature without top-p);
   confident = p >= threshold (GATE_TOP_PROB) or H <= threshold (GATE_ENTROPY).
2. b from the base logits (stream 0), n from the nudger logits (stream 1), both with step = n_out,
   sampled with min(sample_mode, params.max_sample) (sample.py).
3. the rule: base_only emits b, nudger_only emits n; nudging, token granularity: b if confident and
   b not in stop_ids, else n; word granularity (word_state, span), starting at (NUDGE, 0):
     BASE:  confident and b not a stop -> emit b; else -> NUDGE, emit n, span = 1
     NUDGE: span >= 1 and word_start(n) and (confident or b == n) and b not a stop -> BASE, emit b
            (span is left as it was); else emit n, span += 1
   from_nudger = 1 iff the emitted token came from the n branch. The state updates of the rule are
   applied even when the emitted token then ends the row.
4. ending: an emitted stop id sets finished = FINISH_STOP and is not written; otherwise the token and
   its provenance go to out_tokens/out_from_nudger[row, n_out % Wout] (a ring: with Wout >= max_new
   it is the plain layout; a streaming engine drains it before it wraps), n_nudged += from_nudger,
   n_out += 1, and n_out >= max_new sets finished = FINISH_LENGTH.
5. splice, only for rows still running: each given cursor gets input_ids = token, positions += 1,
   seq_lens += 1, slot_mapping = block_tables[row, pos // page] * page + pos % page for the new pos
   (-1 when pos falls past the block table: the engine reserves pages so that never happens).

`nudge_step_ref` is vectorised torch (no loop over rows, no host sync); `nudge_step` is Triton with
one program per row for the rule, ending and splice. Programs per row for the vocabulary scans:
before the split 1 (every row's base and nudger scans in its one program, one launch per step);
now, when the B rows do not fill the SMs, C per row and model (vocab_split.plan_chunks; 64 for a
262k vocabulary at batch 1): the chunk records (one launch over B x C x models programs), for a
nucleus-capable batch 8 search passes and the draw (9 launches of the same grid), then the step
kernel combines the records: 2 launches per step (greedy / Gumbel), 11 (nucleus); 1 as before
when C = 1. The rule, ending and splice exist once per implementation here and are reused by
spec_accept.py.
"""
from dataclasses import dataclass

import torch

from nudgefast.kernels import HAS_TRITON
from nudgefast.kernels.sample import (NUM_WARPS, SAMPLE_GREEDY, SAMPLE_GUMBEL, SAMPLE_NUCLEUS, SCAN_BLOCK,
                                      check_logits, inverse_temperature, sample_mode, sample_rows_ref)
from nudgefast.kernels.vocab_split import SPLIT_MAX_CHUNKS, plan_chunks

MODE_NUDGING, MODE_BASE_ONLY, MODE_NUDGER_ONLY = 0, 1, 2
GATE_TOP_PROB, GATE_ENTROPY = 0, 1
STATE_NUDGE, STATE_BASE = 0, 1
FINISH_NONE, FINISH_STOP, FINISH_LENGTH = 0, 1, 2
_GATE_CODES = {"top_prob": GATE_TOP_PROB, "entropy": GATE_ENTROPY}
_MODE_CODES = {"nudging": MODE_NUDGING, "base_only": MODE_BASE_ONLY, "nudger_only": MODE_NUDGER_ONLY}


@dataclass(frozen=True)
class GateParams:
    """What must be a compile-time constant of the step (and so is part of a CUDA-graph key).

    Everything else (gate, threshold, granularity, temperature, top_p, max_new_tokens, stop ids) is
    per row in GateState. A row is sampled with min(its sample_mode, max_sample): SAMPLE_GREEDY
    compiles an all-greedy batch without the sampling code; SAMPLE_NUCLEUS lets each row choose.
    """
    mode: int  # MODE_*: which logits exist
    max_sample: int = SAMPLE_NUCLEUS  # SAMPLE_*: the most general sampler any row may use


@dataclass
class ModelCursor:
    """One model's next-step inputs and attention metadata (device tensors, B rows), updated in place."""
    input_ids: torch.Tensor  # int64 [B]: the token whose KV the next forward computes
    positions: torch.Tensor  # int64 [B]: the position of input_ids
    seq_lens: torch.Tensor  # int32 [B]: positions + 1 (the cache length the next forward attends to)
    slot_mapping: torch.Tensor  # int64 [B]: KV slot of `positions`
    block_tables: torch.Tensor  # int32 [B, P]
    page_size: int


@dataclass
class GateState:
    """Per-row decode state and per-row parameters (device tensors); the kernels update the first
    eight in place and only read the rest."""
    seed: torch.Tensor  # int64 [B]
    word_state: torch.Tensor  # int32 [B], STATE_*; starts at STATE_NUDGE
    span: torch.Tensor  # int32 [B]; starts at 0
    finished: torch.Tensor  # int32 [B], FINISH_*
    n_out: torch.Tensor  # int32 [B]: tokens emitted so far (= the output step of the next token)
    n_nudged: torch.Tensor  # int32 [B]: emitted tokens that came from the nudger
    out_tokens: torch.Tensor  # int32 [B, Wout], a ring: output step t goes to column t % Wout
    out_from_nudger: torch.Tensor  # int8 [B, Wout], the same ring
    stop_ids: torch.Tensor  # int64 [B, S], S >= 1; -1 = padding (no stop id)
    word_start: torch.Tensor  # bool [W], shared by every row; ids >= W are not word starts
    gate: torch.Tensor  # int32 [B], GATE_*
    threshold: torch.Tensor  # float32 [B]
    word_level: torch.Tensor  # int32 [B]: 1 = granularity "word", 0 = "token"
    inv_temp: torch.Tensor  # float32 [B]: inverse_temperature(temperature) (1.0 for greedy rows)
    top_p: torch.Tensor  # float32 [B]
    sample_mode: torch.Tensor  # int32 [B], SAMPLE_* (sample.sample_mode(temperature, top_p))
    max_new: torch.Tensor  # int32 [B]: the row ends with FINISH_LENGTH when n_out reaches it


ROW_FIELDS = ("seed", "word_state", "span", "finished", "n_out", "n_nudged", "out_tokens", "out_from_nudger",
              "stop_ids", "gate", "threshold", "word_level", "inv_temp", "top_p", "sample_mode", "max_new")
PARAM_FIELDS = ("gate", "threshold", "word_level", "inv_temp", "top_p", "sample_mode", "max_new")
_I32_FIELDS = ("word_state", "span", "finished", "n_out", "n_nudged", "gate", "word_level", "sample_mode", "max_new")
_F32_FIELDS = ("threshold", "inv_temp", "top_p")


# ----------------------------------------------------------------------------- building states


def new_gate_state(B: int, *, out_width: int, stop_width: int = 1, word_start: torch.Tensor | None = None,
                   device=None) -> GateState:
    """A GateState of B inert rows (finished = FINISH_STOP: no kernel touches them) with neutral
    parameters (greedy, top_prob gate at 1.0, token granularity, max_new = out_width); set_row
    admits a request into a slot."""
    if not isinstance(B, int) or B < 1:
        raise ValueError(f"B must be an int >= 1, got {B!r}")
    if not isinstance(out_width, int) or out_width < 1:
        raise ValueError(f"out_width must be an int >= 1, got {out_width!r}")
    if not isinstance(stop_width, int) or stop_width < 1:
        raise ValueError(f"stop_width must be an int >= 1, got {stop_width!r}")
    if word_start is None:
        word_start = torch.zeros(1, dtype=torch.bool)
    i32 = dict(dtype=torch.int32, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    return GateState(
        seed=torch.zeros(B, dtype=torch.int64, device=device),
        word_state=torch.full((B,), STATE_NUDGE, **i32),
        span=torch.zeros(B, **i32),
        finished=torch.full((B,), FINISH_STOP, **i32),
        n_out=torch.zeros(B, **i32),
        n_nudged=torch.zeros(B, **i32),
        out_tokens=torch.zeros(B, out_width, **i32),
        out_from_nudger=torch.zeros(B, out_width, dtype=torch.int8, device=device),
        stop_ids=torch.full((B, stop_width), -1, dtype=torch.int64, device=device),
        word_start=word_start.to(device=device, dtype=torch.bool),
        gate=torch.full((B,), GATE_TOP_PROB, **i32),
        threshold=torch.ones(B, **f32),
        word_level=torch.zeros(B, **i32),
        inv_temp=torch.ones(B, **f32),
        top_p=torch.ones(B, **f32),
        sample_mode=torch.full((B,), SAMPLE_GREEDY, **i32),
        max_new=torch.full((B,), out_width, **i32),
    )


def _gate_code(gate) -> int:
    if isinstance(gate, str):
        if gate not in _GATE_CODES:
            raise ValueError(f"gate must be 'top_prob' or 'entropy', got {gate!r}")
        return _GATE_CODES[gate]
    if gate not in (GATE_TOP_PROB, GATE_ENTROPY) or isinstance(gate, bool):
        raise ValueError(f"gate must be GATE_TOP_PROB, GATE_ENTROPY, 'top_prob' or 'entropy', got {gate!r}")
    return int(gate)


def _word_level(granularity) -> int:
    if isinstance(granularity, str):
        if granularity not in ("word", "token"):
            raise ValueError(f"granularity must be 'word' or 'token', got {granularity!r}")
        return int(granularity == "word")
    if not isinstance(granularity, (bool, int)) or granularity not in (0, 1):
        raise ValueError(f"granularity must be 'word', 'token' or a bool (True = word), got {granularity!r}")
    return int(granularity)


def set_row_params(state: GateState, rows, *, gate, threshold: float, granularity, temperature: float,
                   top_p: float, max_new_tokens: int) -> None:
    """Writes one set of parameters into the rows `rows` (an int, a slice or an index tensor) of
    state, validated; the running state (cursors, counters, finished) is left as it is."""
    g, word = _gate_code(gate), _word_level(granularity)
    if not isinstance(threshold, (int, float)) or threshold != threshold:
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    mode = sample_mode(temperature, top_p)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max_new_tokens >= 2**31:
        raise ValueError(f"max_new_tokens must be < 2**31, got {max_new_tokens}")
    state.gate[rows] = g
    state.threshold[rows] = float(threshold)
    state.word_level[rows] = word
    state.inv_temp[rows] = inverse_temperature(temperature)
    state.top_p[rows] = float(top_p)
    state.sample_mode[rows] = mode
    state.max_new[rows] = max_new_tokens


def set_row(state: GateState, row: int, *, seed: int, gate, threshold: float, granularity, temperature: float,
            top_p: float, max_new_tokens: int, stop_ids, word_state: int = STATE_NUDGE, span: int = 0,
            n_out: int = 0, n_nudged: int = 0) -> None:
    """Fills slot `row` from host values and makes it running (finished = 0).

    Host -> device copies: for admission, never inside the decode loop."""
    B = state.seed.shape[0]
    if not isinstance(row, int) or not 0 <= row < B:
        raise ValueError(f"row must be an int in [0, {B}), got {row!r}")
    stops = [int(t) for t in (stop_ids or [])]
    if len(stops) > state.stop_ids.shape[1]:
        raise ValueError(f"{len(stops)} stop ids do not fit the state's stop_ids width {state.stop_ids.shape[1]}")
    if any(t < 0 for t in stops):
        raise ValueError(f"stop ids must be >= 0, got {stops}")
    if word_state not in (STATE_NUDGE, STATE_BASE):
        raise ValueError(f"word_state must be STATE_NUDGE or STATE_BASE, got {word_state!r}")
    if not isinstance(n_out, int) or n_out < 0 or (isinstance(max_new_tokens, int) and n_out >= max_new_tokens):
        raise ValueError(f"n_out must be an int in [0, max_new_tokens={max_new_tokens}), got {n_out!r}")
    if not isinstance(n_nudged, int) or not 0 <= n_nudged <= n_out or not isinstance(span, int) or span < 0:
        raise ValueError(f"n_nudged must be in [0, n_out] and span >= 0, got n_nudged={n_nudged!r}, span={span!r}")
    set_row_params(state, row, gate=gate, threshold=threshold, granularity=granularity, temperature=temperature,
                   top_p=top_p, max_new_tokens=max_new_tokens)
    state.seed[row] = int(seed)
    state.word_state[row] = word_state
    state.span[row] = int(span)
    state.n_out[row] = int(n_out)
    state.n_nudged[row] = int(n_nudged)
    state.stop_ids[row] = -1
    if stops:
        state.stop_ids[row, :len(stops)] = torch.tensor(stops, dtype=torch.int64)
    state.finished[row] = FINISH_NONE


def gate_state_for(config_like, B: int, stop_ids, word_start: torch.Tensor, seeds, device=None) -> GateState:
    """A running GateState of B rows sharing one configuration (what single-config callers use).

    config_like has gate, threshold, granularity, temperature, top_p and max_new_tokens (a
    NudgeConfig); stop_ids: one list for every row; seeds: int64 [B] (or a list of ints)."""
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    if tuple(seeds.shape) != (B,):
        raise ValueError(f"seeds must have {B} entries, got shape {tuple(seeds.shape)}")
    stops = sorted(set(int(t) for t in (stop_ids or [])))
    max_new = int(config_like.max_new_tokens)
    state = new_gate_state(B, out_width=max_new, stop_width=max(1, len(stops)), word_start=word_start,
                           device=device)
    set_row_params(state, slice(None), gate=config_like.gate, threshold=float(config_like.threshold),
                   granularity=config_like.granularity, temperature=float(config_like.temperature),
                   top_p=float(config_like.top_p), max_new_tokens=max_new)
    if stops:
        state.stop_ids.copy_(torch.tensor(stops, dtype=torch.int64).expand(B, -1))
    state.seed.copy_(seeds)
    state.finished.fill_(FINISH_NONE)
    return state


def gate_params_for(config_like) -> GateParams:
    """GateParams of one configuration: its mode, and the sampler its (temperature, top_p) needs."""
    return GateParams(mode=_MODE_CODES[config_like.mode],
                      max_sample=sample_mode(float(config_like.temperature), float(config_like.top_p)))


# ----------------------------------------------------------------------------- validation


def check_tensor(t, name: str, dtype: torch.dtype, shape: tuple, device, contiguous: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place)")
    if not contiguous and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dimension")


def check_params(params: GateParams) -> int:
    """Validates params; returns the most general sampler (sample.SAMPLE_*) the kernels compile."""
    if not isinstance(params, GateParams):
        raise TypeError(f"params must be GateParams, got {type(params).__name__}")
    if params.mode not in (MODE_NUDGING, MODE_BASE_ONLY, MODE_NUDGER_ONLY):
        raise ValueError(f"params.mode must be MODE_NUDGING, MODE_BASE_ONLY or MODE_NUDGER_ONLY, got {params.mode!r}")
    if params.max_sample not in (SAMPLE_GREEDY, SAMPLE_GUMBEL, SAMPLE_NUCLEUS):
        raise ValueError(f"params.max_sample must be SAMPLE_GREEDY, SAMPLE_GUMBEL or SAMPLE_NUCLEUS, "
                         f"got {params.max_sample!r}")
    return params.max_sample


def check_state(state: GateState, params: GateParams | None = None) -> int:
    """Validates the state tensors (dtypes, shapes, devices: no values, which would need the host);
    returns B."""
    if not isinstance(state, GateState):
        raise TypeError(f"state must be GateState, got {type(state).__name__}")
    if not isinstance(state.seed, torch.Tensor) or state.seed.dim() != 1:
        raise ValueError("state.seed must be a 1-D int64 tensor")
    B, dev = state.seed.shape[0], state.seed.device
    check_tensor(state.seed, "state.seed", torch.int64, (B,), dev)
    for name in _I32_FIELDS:
        check_tensor(getattr(state, name), f"state.{name}", torch.int32, (B,), dev)
    for name in _F32_FIELDS:
        check_tensor(getattr(state, name), f"state.{name}", torch.float32, (B,), dev)
    if not isinstance(state.out_tokens, torch.Tensor) or state.out_tokens.dim() != 2 or state.out_tokens.shape[1] < 1:
        raise ValueError(f"state.out_tokens must be int32 [B, Wout] with Wout >= 1, got "
                         f"{tuple(getattr(state.out_tokens, 'shape', ()))}")
    width = state.out_tokens.shape[1]
    check_tensor(state.out_tokens, "state.out_tokens", torch.int32, (B, width), dev)
    check_tensor(state.out_from_nudger, "state.out_from_nudger", torch.int8, (B, width), dev)
    if not isinstance(state.stop_ids, torch.Tensor) or state.stop_ids.dim() != 2 or state.stop_ids.shape[1] < 1:
        raise ValueError("state.stop_ids must be int64 [B, S] with S >= 1 (-1 = no stop id), got "
                         f"{tuple(getattr(state.stop_ids, 'shape', ()))}")
    check_tensor(state.stop_ids, "state.stop_ids", torch.int64, (B, state.stop_ids.shape[1]), dev)
    if not isinstance(state.word_start, torch.Tensor) or state.word_start.dim() != 1 or state.word_start.shape[0] < 1:
        raise ValueError("state.word_start must be bool [W] with W >= 1")
    check_tensor(state.word_start, "state.word_start", torch.bool, tuple(state.word_start.shape), dev)
    return B


def check_cursor(cur: ModelCursor, name: str, B: int, device) -> None:
    if not isinstance(cur, ModelCursor):
        raise TypeError(f"{name} must be ModelCursor, got {type(cur).__name__}")
    check_tensor(cur.input_ids, f"{name}.input_ids", torch.int64, (B,), device)
    check_tensor(cur.positions, f"{name}.positions", torch.int64, (B,), device)
    check_tensor(cur.seq_lens, f"{name}.seq_lens", torch.int32, (B,), device)
    check_tensor(cur.slot_mapping, f"{name}.slot_mapping", torch.int64, (B,), device)
    if cur.block_tables.dim() != 2:
        raise ValueError(f"{name}.block_tables must be int32 [B, P], got {tuple(cur.block_tables.shape)}")
    check_tensor(cur.block_tables, f"{name}.block_tables", torch.int32, (B, cur.block_tables.shape[1]), device,
                 contiguous=False)  # a column slice of a wider table is fine: rows go by stride
    if not isinstance(cur.page_size, int) or cur.page_size < 1:
        raise ValueError(f"{name}.page_size must be an int >= 1, got {cur.page_size!r}")


def check_step_inputs(base_logits, nudger_logits, state, params, base, nudger) -> tuple[int, int]:
    """Validates everything nudge_step takes; returns (B, max sampler)."""
    sampler = check_params(params)
    B = check_state(state, params)
    dev = state.seed.device
    if params.mode != MODE_NUDGER_ONLY:
        if base_logits is None:
            raise ValueError("base_logits is required unless params.mode is MODE_NUDGER_ONLY")
        check_logits(base_logits, "base_logits", B)
    if params.mode != MODE_BASE_ONLY:
        if nudger_logits is None:
            raise ValueError("nudger_logits is required unless params.mode is MODE_BASE_ONLY")
        check_logits(nudger_logits, "nudger_logits", B)
    for lg, name in ((base_logits, "base_logits"), (nudger_logits, "nudger_logits")):
        if lg is not None and lg.device != dev:
            raise ValueError(f"{name} is on {lg.device}, the state on {dev}")
    for cur, name in ((base, "base"), (nudger, "nudger")):
        if cur is not None:
            check_cursor(cur, name, B, dev)
    return B, sampler


# ----------------------------------------------------------------------------- torch reference


def base_stats_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_top, entropy) float32 [B] of the untempered softmax; -inf logits are allowed."""
    x = logits.float()
    xm = x - x.max(dim=-1, keepdim=True).values
    e = torch.exp(xm)
    z = e.sum(dim=-1)
    sx = torch.where(e > 0, e * xm, 0.0).sum(dim=-1)
    return 1.0 / z, torch.log(z) - sx / z


def confident_from_stats(p_top: torch.Tensor, entropy: torch.Tensor, state: GateState) -> torch.Tensor:
    """bool [B]: each row's gate (p_top >= threshold or entropy <= threshold) against its own threshold."""
    return torch.where(state.gate == GATE_TOP_PROB, p_top >= state.threshold, entropy <= state.threshold)


def confident_ref(logits: torch.Tensor, state: GateState) -> torch.Tensor:
    """bool [B]: each row's gate against its own threshold."""
    return confident_from_stats(*base_stats_ref(logits), state)


def in_set_ref(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """bool [B]: tokens[r] is one of ids[r] (ids [B, S], -1 padding never matches a token)."""
    return (tokens.reshape(-1, 1) == ids).any(dim=1)


def word_start_ref(tokens: torch.Tensor, word_start: torch.Tensor) -> torch.Tensor:
    inside = (tokens >= 0) & (tokens < word_start.shape[0])
    return inside & word_start[tokens.clamp(0, word_start.shape[0] - 1)]


def rule_ref(b, n, confident, word_state, span, state: GateState, params: GateParams):
    """The rule for all rows: (emitted int64, from_nudger bool, new word_state, new span)."""
    if params.mode == MODE_BASE_ONLY:
        return b, torch.zeros_like(b, dtype=torch.bool), word_state, span
    if params.mode == MODE_NUDGER_ONLY:
        return n, torch.ones_like(n, dtype=torch.bool), word_state, span
    b_ok = ~in_set_ref(b, state.stop_ids)
    word = state.word_level != 0
    # word granularity; token rows keep word_state and span as they are
    in_base = word_state == STATE_BASE
    to_base = (span >= 1) & word_start_ref(n, state.word_start) & (confident | (b == n)) & b_ok
    take_b = torch.where(word, torch.where(in_base, confident & b_ok, to_base), confident & b_ok)
    new_span = torch.where(take_b, span, torch.where(in_base, torch.ones_like(span), span + 1))
    new_state = torch.where(take_b, STATE_BASE, STATE_NUDGE).to(torch.int32)
    span = torch.where(word, new_span, span)
    word_state = torch.where(word, new_state, word_state)
    return torch.where(take_b, b, n), ~take_b, word_state, span


def emit_ref(state: GateState, rows: torch.Tensor, token: torch.Tensor, from_nudger: torch.Tensor) -> torch.Tensor:
    """Ending for `rows` (bool [B]) emitting `token`; returns bool [B]: rows that wrote a token."""
    stop = rows & in_set_ref(token, state.stop_ids)
    wrote = rows & ~stop
    col = (state.n_out.long() % state.out_tokens.shape[1]).unsqueeze(1)  # the ring's column of step n_out
    old_tok = state.out_tokens.gather(1, col).squeeze(1)
    old_src = state.out_from_nudger.gather(1, col).squeeze(1)
    state.out_tokens.scatter_(1, col, torch.where(wrote, token.to(torch.int32), old_tok).unsqueeze(1))
    state.out_from_nudger.scatter_(1, col, torch.where(wrote, from_nudger.to(torch.int8), old_src).unsqueeze(1))
    state.n_out.add_(wrote.to(torch.int32))
    state.n_nudged.add_((wrote & from_nudger).to(torch.int32))
    length = wrote & (state.n_out >= state.max_new)
    state.finished.copy_(torch.where(stop, FINISH_STOP, torch.where(length, FINISH_LENGTH, state.finished)))
    return wrote


def advance_cursor_ref(cur: ModelCursor, rows: torch.Tensor, token: torch.Tensor, count: torch.Tensor) -> None:
    """For `rows`: input_ids = token, positions/seq_lens += count, slot of the new position."""
    pos = cur.positions + torch.where(rows, count.to(torch.int64), 0)
    page = pos // cur.page_size
    pages = cur.block_tables.shape[1]
    block = cur.block_tables.gather(1, page.clamp(0, pages - 1).unsqueeze(1)).squeeze(1).to(torch.int64)
    slot = torch.where(page < pages, block * cur.page_size + pos % cur.page_size, -1)
    cur.input_ids.copy_(torch.where(rows, token.to(torch.int64), cur.input_ids))
    cur.positions.copy_(pos)
    cur.seq_lens.add_(torch.where(rows, count.to(torch.int32), 0))
    cur.slot_mapping.copy_(torch.where(rows, slot, cur.slot_mapping))


def candidate_ref(logits: torch.Tensor, state: GateState, params: GateParams, step: torch.Tensor,
                  stream: int) -> torch.Tensor:
    """int64 [B]: each row's candidate with its own sampler."""
    return sample_rows_ref(logits, state.seed, step, stream, state.inv_temp, state.top_p, state.sample_mode,
                           params.max_sample)


def candidates_ref(base_logits, nudger_logits, state: GateState, params: GateParams, step: torch.Tensor):
    """(b, n, confident) for every row; the missing ones (by mode) are placeholders."""
    b = n = None
    confident = torch.zeros_like(state.finished, dtype=torch.bool)
    if params.mode != MODE_NUDGER_ONLY:
        b = candidate_ref(base_logits, state, params, step, 0)
    if params.mode != MODE_BASE_ONLY:
        n = candidate_ref(nudger_logits, state, params, step, 1)
    if params.mode == MODE_NUDGING:
        confident = confident_ref(base_logits, state)
    return (n if b is None else b), (b if n is None else n), confident


def nudge_step_ref(base_logits: torch.Tensor | None, nudger_logits: torch.Tensor | None, state: GateState,
                   params: GateParams, base: ModelCursor | None, nudger: ModelCursor | None) -> None:
    """One nudging decode step for the whole batch, in place (vectorised torch)."""
    check_step_inputs(base_logits, nudger_logits, state, params, base, nudger)
    b, n, confident = candidates_ref(base_logits, nudger_logits, state, params, state.n_out)
    step_from_candidates_ref(b, n, confident, state, params, base, nudger)


def step_from_candidates_ref(b: torch.Tensor, n: torch.Tensor, confident: torch.Tensor, state: GateState,
                             params: GateParams, base: ModelCursor | None, nudger: ModelCursor | None) -> None:
    """The rest of a step once every row's (b, n, confident) is known: the rule, the ending and the
    splice, in place (also what the tensor-parallel gate runs on candidates combined from shards)."""
    rows = state.finished == 0
    token, from_nudger, word_state, span = rule_ref(b, n, confident, state.word_state, state.span, state, params)
    state.word_state.copy_(torch.where(rows, word_state, state.word_state))
    state.span.copy_(torch.where(rows, span, state.span))
    emit_ref(state, rows, token, from_nudger)
    running = rows & (state.finished == 0)
    one = torch.ones_like(state.n_out)
    for cur in (base, nudger):
        if cur is not None:
            advance_cursor_ref(cur, running, token, one)


# ----------------------------------------------------------------------------- Triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from nudgefast.kernels.rng import row_key
    from nudgefast.kernels.sample import combine_chunks, finish_sample, sample_row, scan_row, split_scan

    _MODE_NUDGING = tl.constexpr(MODE_NUDGING)
    _MODE_BASE_ONLY = tl.constexpr(MODE_BASE_ONLY)
    _MODE_NUDGER_ONLY = tl.constexpr(MODE_NUDGER_ONLY)
    _GATE_TOP_PROB = tl.constexpr(GATE_TOP_PROB)
    _STATE_NUDGE = tl.constexpr(STATE_NUDGE)
    _STATE_BASE = tl.constexpr(STATE_BASE)
    _FINISH_NONE = tl.constexpr(FINISH_NONE)
    _FINISH_STOP = tl.constexpr(FINISH_STOP)
    _FINISH_LENGTH = tl.constexpr(FINISH_LENGTH)

    @triton.jit
    def in_set(tok, ids_ptr, S, S_BLOCK: tl.constexpr):
        """tok (scalar int64) is one of ids[0:S] (the row's stop ids; -1 padding never matches)."""
        offs = tl.arange(0, S_BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < S, other=-1)
        hit = (ids == tok) & (offs < S)
        return tl.max(hit.to(tl.int32), axis=0) != 0

    @triton.jit
    def base_candidate(row_ptr, V, key, inv_temp, top_p, sample, gate, threshold, STATS: tl.constexpr,
                       MAX_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
        """(b, confident): the gate statistics ride along the first sampling pass over the row."""
        p_top, entropy, best, mt, zt = scan_row(row_ptr, V, key, inv_temp, sample, STATS, MAX_SAMPLE, BLOCK)
        b = finish_sample(row_ptr, V, key, inv_temp, top_p, sample, best, mt, zt, MAX_SAMPLE, BLOCK)
        confident = tl.where(gate == _GATE_TOP_PROB, p_top >= threshold, entropy <= threshold)
        return b.to(tl.int64), confident

    @triton.jit
    def base_candidate_split(fl_ptr, it_ptr, slot, C, sample, gate, threshold, STATS: tl.constexpr,
                             C_BLOCK: tl.constexpr):
        """base_candidate from the row's chunk records (vocab_split.py), written by split_scan."""
        b, p_top, entropy = combine_chunks(fl_ptr, it_ptr, slot, C, sample, STATS, C_BLOCK)
        confident = tl.where(gate == _GATE_TOP_PROB, p_top >= threshold, entropy <= threshold)
        return b.to(tl.int64), confident

    @triton.jit
    def gate_rule(b, n, confident, word_state, span, word, stop_ptr, S, wstart_ptr, W, MODE: tl.constexpr,
                  S_BLOCK: tl.constexpr):
        """DESIGN section 1 for one row: (token int64, from_nudger int32, word_state, span).

        word (runtime, per row): granularity "word" (!= 0) or "token" (0: word_state, span kept)."""
        if MODE == _MODE_BASE_ONLY:
            take_b = b == b
        elif MODE == _MODE_NUDGER_ONLY:
            take_b = b != b
        else:
            b_ok = in_set(b, stop_ptr, S, S_BLOCK) == 0
            is_word = word != 0
            n_ws = tl.load(wstart_ptr + n, mask=(n >= 0) & (n < W) & is_word, other=0) != 0
            in_base = word_state == _STATE_BASE
            to_base = (span >= 1) & n_ws & (confident | (b == n)) & b_ok
            take_b = tl.where(is_word, tl.where(in_base, confident & b_ok, to_base), confident & b_ok)
            span = tl.where(is_word, tl.where(take_b, span, tl.where(in_base, 1, span + 1)), span)
            word_state = tl.where(is_word, tl.where(take_b, _STATE_BASE, _STATE_NUDGE), word_state)
        token = tl.where(take_b, b, n)
        return token, tl.where(take_b, 0, 1), word_state, span

    @triton.jit
    def emit(row, token, from_nudger, n_out, n_nudged, stop_ptr, S, otok_ptr, otok_stride, ofrom_ptr,
             ofrom_stride, Wout, max_new, S_BLOCK: tl.constexpr):
        """Ending for one emitted token: (wrote int1, n_out, n_nudged, finished)."""
        stop = in_set(token, stop_ptr, S, S_BLOCK)
        wrote = stop == 0
        r = row.to(tl.int64)
        col = n_out % Wout  # the ring's column of output step n_out
        tl.store(otok_ptr + r * otok_stride + col, token.to(tl.int32), mask=wrote)
        tl.store(ofrom_ptr + r * ofrom_stride + col, from_nudger.to(tl.int8), mask=wrote)
        n_out = n_out + wrote.to(tl.int32)
        n_nudged = n_nudged + (wrote & (from_nudger != 0)).to(tl.int32)
        finished = tl.where(stop, _FINISH_STOP, tl.where(n_out >= max_new, _FINISH_LENGTH, _FINISH_NONE))
        return wrote, n_out, n_nudged, finished

    @triton.jit
    def advance_cursor(row, running, token, count, ids_ptr, pos_ptr, sl_ptr, slot_ptr, bt_ptr, bt_stride, P,
                       page_size):
        """For a running row: input_ids = token, positions/seq_lens += count, slot of the new position."""
        pos = tl.load(pos_ptr + row) + count
        page = pos // page_size
        inside = page < P
        block = tl.load(bt_ptr + row.to(tl.int64) * bt_stride + page, mask=inside & running, other=0)
        slot = tl.where(inside, block.to(tl.int64) * page_size + pos % page_size, -1)
        tl.store(ids_ptr + row, token.to(tl.int64), mask=running)
        tl.store(pos_ptr + row, pos, mask=running)
        tl.store(sl_ptr + row, tl.load(sl_ptr + row) + count.to(tl.int32), mask=running)
        tl.store(slot_ptr + row, slot, mask=running)

    @triton.jit(do_not_specialize=["B", "C"])
    def _nudge_step_kernel(
        base_ptr, base_stride, Vb, nudger_ptr, nudger_stride, Vn,
        seed_ptr, wstate_ptr, span_ptr, fin_ptr, nout_ptr, nnud_ptr,
        otok_ptr, otok_stride, ofrom_ptr, ofrom_stride, Wout, stop_ptr, stop_stride, S, wstart_ptr, W,
        gate_ptr, thr_ptr, word_ptr, itemp_ptr, topp_ptr, smode_ptr, maxnew_ptr,
        bc_ids, bc_pos, bc_sl, bc_slot, bc_bt, bc_bt_stride, bc_P, bc_page,
        nc_ids, nc_pos, nc_sl, nc_slot, nc_bt, nc_bt_stride, nc_P, nc_page,
        fl_ptr, it_ptr, B, C,
        MODE: tl.constexpr, MAX_SAMPLE: tl.constexpr,
        HAS_BASE_CURSOR: tl.constexpr, HAS_NUDGER_CURSOR: tl.constexpr, BLOCK: tl.constexpr,
        S_BLOCK: tl.constexpr, SPLIT: tl.constexpr, C_BLOCK: tl.constexpr,
    ):
        """One program per row. SPLIT: the candidates and the gate statistics come from the chunk
        records split_scan wrote (record rows: the base's 0..B-1, then the nudger's in nudging mode)."""
        row = tl.program_id(0)
        if tl.load(fin_ptr + row) == _FINISH_NONE:
            n_out = tl.load(nout_ptr + row)
            seed = tl.load(seed_ptr + row)
            inv_temp = tl.load(itemp_ptr + row)
            top_p = tl.load(topp_ptr + row)
            sample = tl.minimum(tl.load(smode_ptr + row), MAX_SAMPLE)
            stops = stop_ptr + row.to(tl.int64) * stop_stride
            b = tl.zeros([], tl.int64)
            n = tl.zeros([], tl.int64)
            confident = b != b
            if MODE != _MODE_NUDGER_ONLY:
                if SPLIT:
                    b, confident = base_candidate_split(fl_ptr, it_ptr, row, C, sample, tl.load(gate_ptr + row),
                                                        tl.load(thr_ptr + row), MODE == _MODE_NUDGING, C_BLOCK)
                else:
                    b, confident = base_candidate(base_ptr + row.to(tl.int64) * base_stride, Vb,
                                                  row_key(seed, n_out, 0), inv_temp, top_p, sample,
                                                  tl.load(gate_ptr + row), tl.load(thr_ptr + row),
                                                  MODE == _MODE_NUDGING, MAX_SAMPLE, BLOCK)
            if MODE != _MODE_BASE_ONLY:
                if SPLIT:
                    slot = row
                    if MODE == _MODE_NUDGING:
                        slot = row + B  # the nudger's records follow the base's
                    n, _p, _h = combine_chunks(fl_ptr, it_ptr, slot, C, sample, False, C_BLOCK)
                    n = n.to(tl.int64)
                else:
                    n = sample_row(nudger_ptr + row.to(tl.int64) * nudger_stride, Vn, row_key(seed, n_out, 1),
                                   inv_temp, top_p, sample, MAX_SAMPLE, BLOCK).to(tl.int64)
            word_state = tl.load(wstate_ptr + row)
            span = tl.load(span_ptr + row)
            token, from_nudger, word_state, span = gate_rule(b, n, confident, word_state, span,
                                                             tl.load(word_ptr + row), stops, S, wstart_ptr, W, MODE,
                                                             S_BLOCK)
            tl.store(wstate_ptr + row, word_state)
            tl.store(span_ptr + row, span)
            _wrote, n_out, n_nudged, finished = emit(row, token, from_nudger, n_out, tl.load(nnud_ptr + row),
                                                     stops, S, otok_ptr, otok_stride, ofrom_ptr, ofrom_stride, Wout,
                                                     tl.load(maxnew_ptr + row), S_BLOCK)
            tl.store(nout_ptr + row, n_out)
            tl.store(nnud_ptr + row, n_nudged)
            tl.store(fin_ptr + row, finished)
            running = finished == _FINISH_NONE
            one = tl.full([], 1, tl.int32)
            if HAS_BASE_CURSOR:
                advance_cursor(row, running, token, one, bc_ids, bc_pos, bc_sl, bc_slot, bc_bt, bc_bt_stride, bc_P,
                               bc_page)
            if HAS_NUDGER_CURSOR:
                advance_cursor(row, running, token, one, nc_ids, nc_pos, nc_sl, nc_slot, nc_bt, nc_bt_stride, nc_P,
                               nc_page)


def cursor_args(cur: ModelCursor | None, dummy: torch.Tensor) -> list:
    """The 8 kernel arguments for a cursor (a dummy set, never dereferenced, when it is None)."""
    if cur is None:
        return [dummy, dummy, dummy, dummy, dummy, 0, 1, 1]
    bt = cur.block_tables
    return [cur.input_ids, cur.positions, cur.seq_lens, cur.slot_mapping, bt, bt.stride(0), bt.shape[1], cur.page_size]


def state_args(state: GateState) -> list:
    """State pointers in kernel order, from seed to max_new (widths and strides included)."""
    return [state.seed, state.word_state, state.span, state.finished, state.n_out, state.n_nudged,
            state.out_tokens, state.out_tokens.stride(0), state.out_from_nudger, state.out_from_nudger.stride(0),
            state.out_tokens.shape[1], state.stop_ids, state.stop_ids.stride(0), state.stop_ids.shape[1],
            state.word_start.view(torch.uint8), state.word_start.shape[0],
            state.gate, state.threshold, state.word_level, state.inv_temp, state.top_p, state.sample_mode,
            state.max_new]


def _rows(logits: torch.Tensor | None, dummy: torch.Tensor) -> list:
    if logits is None:
        return [dummy, 0, 1]
    if logits.stride(1) != 1:
        raise ValueError("logits must have unit stride along the vocabulary")
    return [logits, logits.stride(0), logits.shape[1]]


def nudge_step(base_logits: torch.Tensor | None, nudger_logits: torch.Tensor | None, state: GateState,
               params: GateParams, base: ModelCursor | None, nudger: ModelCursor | None,
               chunks: int | None = None) -> None:
    """Triton version of nudge_step_ref, no host syncs.

    chunks: programs per row for the vocabulary scans (vocab_split.plan_chunks; None = its heuristic
    from B, V and the SM count). 1: one launch, one program per row. C > 1: split_scan writes chunk
    records of the base and nudger rows over (B, C, models) programs, then the step kernel (one
    program per row) combines them and applies the rule: 2 launches, 11 when params.max_sample is
    SAMPLE_NUCLEUS (the split cut-off search and draw)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use nudge_step_ref")
    B, sampler = check_step_inputs(base_logits, nudger_logits, state, params, base, nudger)
    dummy = state.n_out
    rows_args = [*_rows(base_logits, dummy), *_rows(nudger_logits, dummy)]  # checks the unit strides
    models = [lg for lg, skip in ((base_logits, MODE_NUDGER_ONLY), (nudger_logits, MODE_BASE_ONLY))
              if params.mode != skip]  # record rows: the base's, then the nudger's
    C, lengths = plan_chunks(B, [lg.shape[1] for lg in models], state.seed.device, chunks)
    floats = ints = dummy  # never read on the single-program path
    if C > 1:
        floats, ints = split_scan([(lg, lg.stride(0), 0, lg.shape[1]) for lg in models], B, 1, C, lengths,
                                  state.seed, state.n_out, state.finished, state.inv_temp, state.top_p,
                                  state.sample_mode, 1 if params.mode == MODE_NUDGER_ONLY else 0,
                                  params.mode == MODE_NUDGING, sampler)
    _nudge_step_kernel[(B,)](
        *rows_args, *state_args(state),
        *cursor_args(base, dummy), *cursor_args(nudger, dummy), floats, ints, B, C,
        MODE=params.mode, MAX_SAMPLE=sampler,
        HAS_BASE_CURSOR=base is not None, HAS_NUDGER_CURSOR=nudger is not None, BLOCK=SCAN_BLOCK,
        S_BLOCK=triton.next_power_of_2(state.stop_ids.shape[1]), SPLIT=C > 1, C_BLOCK=SPLIT_MAX_CHUNKS,
        num_warps=NUM_WARPS,
    )
