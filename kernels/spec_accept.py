"""Speculative accept: replay the nudging rule over a drafted block on the device (DESIGN "Speculation").

A round, for each running row (finished rows are not touched at all, stats and cursors included):
the nudger drafted d_0..d_{K-1}, d_i being its candidate n at output step n_out + i (stream 1, the
same RNG keys as plain decoding); the base model scored [last, d_0..d_{K-1}] in one forward, so
verify_logits[:, i] is the base distribution for output step n_out + i. Then, with n_out the running
count (it grows as tokens are emitted):
  for i in 0..K-1: b_i = candidate(verify_logits[row, i], step = n_out, stream 0), confident_i from the
      same row; apply the gate rule to (b_i, n = d_i) exactly as nudge_step does (word state, span,
      stop, max_new). The row finished -> stop. Emitted token != d_i -> stop: that token (necessarily
      b_i) is the correction. Else the draft token is accepted (its provenance is what the rule says:
      base-chosen when the rule took b and b == d_i).
  i == K (the bonus, only when all K drafts were accepted and the row still runs): emit b_K only where
      the rule does not need n: base_only, or nudging with (token granularity or word state BASE) and
      confident and b_K not a stop id. Otherwise nothing more.
So the emitted tokens are exactly what K+1 sequential nudge_step calls would emit on the same logits
(the draft being the nudger's own candidates), stopping where a later position would need a nudger
distribution that was not computed. MODE_NUDGER_ONLY has no base model to verify with and is refused.

Cursors, for rows still running after the round (c = tokens emitted this round, >= 1 for them): both
get input_ids = the last emitted token, positions += c, seq_lens += c, slot_mapping for the new
position. A row that ends in the round moves its cursors exactly as the sequential steps would have:
by the tokens after which it still ran (c for a stop, c - 1 when max_new ends it), so the whole state
after a round equals the state after the corresponding nudge_step calls. Both cursors must describe
the round's start (input_ids = last, positions = its position): the engine drafts on its own copies.
The base cache holds KV for [last, d_0..d_{K-1}], which covers every position before the new one.
The nudger's holds KV only for [last, d_0..d_{K-2}], so when c == K + 1 (d_{K-1} accepted plus a
bonus) the position just before the new one has no nudger KV: SpecStats.prev_kv_missing says so and
SpecStats.prev_token gives the token there, for the engine to run the nudger's next step on
[prev_token, input_ids] at [positions - 1, positions].

Programs: the single-program kernel (one program per row, one launch) scans each position it
reaches in turn. When the B x (K+1) verify positions do not fill the SMs, the launcher instead splits
every position's row into C chunks (vocab_split.py): records for all positions of all running rows
at once (position i drawn with step n_out + i, the step it has whenever the round reaches it), the
split nucleus search where needed, then the per-row replay combines: 2 launches (11 nucleus-capable)
instead of 1, positions after a rejection scanned too (in parallel, at no latency cost).
"""
from dataclasses import dataclass

import torch

from nudgefast.kernels import HAS_TRITON
from nudgefast.kernels.nudge_gate import (FINISH_NONE, MODE_BASE_ONLY, MODE_NUDGER_ONLY, MODE_NUDGING, STATE_BASE,
                                          GateParams, GateState, ModelCursor, advance_cursor_ref, candidate_ref,
                                          check_cursor, check_params, check_state, check_tensor, confident_ref,
                                          emit_ref, in_set_ref, rule_ref)
from nudgefast.kernels.sample import NUM_WARPS, SCAN_BLOCK
from nudgefast.kernels.vocab_split import SPLIT_MAX_CHUNKS, plan_chunks


@dataclass
class SpecStats:
    """Per-row speculation counters and the nudger's repair hint (device tensors, B rows).

    Counters accumulate over rounds; accepted counts draft tokens that were emitted as drafted, so
    emitted - accepted = corrections + bonus tokens. round_emitted, prev_token and prev_kv_missing
    describe the latest round of each row (left as they were for rows already finished).
    prev_token is the token at the nudger's (new) positions - 1: the emitted token before the last
    one, or the round's old input when c == 1; for a row that finished in the round it is the old
    input and prev_kv_missing is 0 (nothing to repair).
    """
    rounds: torch.Tensor  # int32 [B]: rounds the row took part in
    drafted: torch.Tensor  # int32 [B]: += K per round
    accepted: torch.Tensor  # int32 [B]: draft tokens emitted as drafted
    emitted: torch.Tensor  # int32 [B]: += c per round
    round_emitted: torch.Tensor  # int32 [B]: c of the latest round
    prev_token: torch.Tensor  # int64 [B]: token at nudger.positions - 1 after the round
    prev_kv_missing: torch.Tensor  # int32 [B]: 1 iff c == K + 1 (the nudger never computed KV for prev_token)

    @staticmethod
    def zeros(batch: int, device=None) -> "SpecStats":
        z = lambda dtype: torch.zeros(batch, dtype=dtype, device=device)  # noqa: E731
        return SpecStats(z(torch.int32), z(torch.int32), z(torch.int32), z(torch.int32), z(torch.int32),
                         z(torch.int64), z(torch.int32))


def check_spec_inputs(verify_logits, draft, state, params, base, nudger, stats) -> tuple[int, int, int]:
    """Validates everything spec_accept takes; returns (B, K, sampler mode)."""
    sampler = check_params(params)
    if params.mode == MODE_NUDGER_ONLY:
        raise ValueError("spec_accept needs a base model: params.mode must be MODE_NUDGING or MODE_BASE_ONLY")
    B = check_state(state, params)
    dev = state.seed.device
    if not isinstance(draft, torch.Tensor) or draft.dim() != 2 or draft.shape[0] != B or draft.shape[1] < 1:
        raise ValueError(f"draft must be int64 [B={B}, K>=1], got {getattr(draft, 'shape', draft)}")
    K = draft.shape[1]
    check_tensor(draft, "draft", torch.int64, (B, K), dev)
    if not isinstance(verify_logits, torch.Tensor) or verify_logits.dim() != 3:
        raise ValueError(f"verify_logits must be [B, K+1, V], got {getattr(verify_logits, 'shape', verify_logits)}")
    if tuple(verify_logits.shape[:2]) != (B, K + 1) or verify_logits.shape[2] < 1:
        raise ValueError(f"verify_logits must be [B={B}, K+1={K + 1}, V], got {tuple(verify_logits.shape)}")
    if verify_logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"verify_logits must be float32, float16 or bfloat16, got {verify_logits.dtype}")
    if verify_logits.device != dev:
        raise ValueError(f"verify_logits is on {verify_logits.device}, the state on {dev}")
    if verify_logits.stride(2) != 1:
        raise ValueError("verify_logits must have unit stride along the vocabulary")
    check_cursor(base, "base", B, dev)
    check_cursor(nudger, "nudger", B, dev)
    if not isinstance(stats, SpecStats):
        raise TypeError(f"stats must be SpecStats, got {type(stats).__name__}")
    for name in ("rounds", "drafted", "accepted", "emitted", "round_emitted", "prev_kv_missing"):
        check_tensor(getattr(stats, name), f"stats.{name}", torch.int32, (B,), dev)
    check_tensor(stats.prev_token, "stats.prev_token", torch.int64, (B,), dev)
    return B, K, sampler


# ----------------------------------------------------------------------------- torch reference


def spec_accept_ref(verify_logits: torch.Tensor, draft: torch.Tensor, state: GateState, params: GateParams,
                    base: ModelCursor, nudger: ModelCursor, stats: SpecStats) -> None:
    """One speculative round for the whole batch, in place (vectorised over rows; K+1 positions)."""
    B, K, _ = check_spec_inputs(verify_logits, draft, state, params, base, nudger, stats)
    rows = state.finished == FINISH_NONE
    active = rows.clone()
    old_input = nudger.input_ids.clone()
    last, prev = old_input.clone(), old_input.clone()
    count = torch.zeros_like(state.n_out)
    accepted = torch.zeros_like(state.n_out)
    moved, moved_to = torch.zeros_like(state.n_out), old_input.clone()  # tokens after which the row still ran
    for i in range(K + 1):
        logits = verify_logits[:, i]
        b = candidate_ref(logits, state, params, state.n_out, 0)
        confident = confident_ref(logits, state) if params.mode == MODE_NUDGING else torch.zeros_like(rows)
        if i < K:
            d = draft[:, i]
            token, from_nudger, word_state, span = rule_ref(b, d, confident, state.word_state, state.span, state,
                                                            params)
            state.word_state.copy_(torch.where(active, word_state, state.word_state))
            state.span.copy_(torch.where(active, span, state.span))
            wrote = emit_ref(state, active, token, from_nudger)
            accepted += (wrote & (token == d)).to(torch.int32)
            active = wrote & (state.finished == FINISH_NONE) & (token == d)
        else:
            token = b
            if params.mode == MODE_BASE_ONLY:
                bonus = active
            else:
                # a word-level row needs the nudger's candidate unless it is in state BASE
                bonus = active & confident & ~in_set_ref(b, state.stop_ids)
                bonus = bonus & ((state.word_level == 0) | (state.word_state == STATE_BASE))
            wrote = emit_ref(state, bonus, b, torch.zeros_like(rows))
        prev = torch.where(wrote, last, prev)
        last = torch.where(wrote, token, last)
        count += wrote.to(torch.int32)
        still = wrote & (state.finished == FINISH_NONE)
        moved += still.to(torch.int32)
        moved_to = torch.where(still, token, moved_to)
    running = rows & (state.finished == FINISH_NONE)
    stats.rounds.add_(rows.to(torch.int32))
    stats.drafted.add_(rows.to(torch.int32) * K)
    stats.accepted.add_(accepted)
    stats.emitted.add_(count)
    stats.round_emitted.copy_(torch.where(rows, count, stats.round_emitted))
    stats.prev_token.copy_(torch.where(rows, torch.where(running, prev, old_input), stats.prev_token))
    missing = (running & (count == K + 1)).to(torch.int32)
    stats.prev_kv_missing.copy_(torch.where(rows, missing, stats.prev_kv_missing))
    advance_cursor_ref(base, moved > 0, moved_to, moved)  # == (running, last, count) for running rows
    advance_cursor_ref(nudger, moved > 0, moved_to, moved)


# ----------------------------------------------------------------------------- Triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from nudgefast.kernels.nudge_gate import (advance_cursor, base_candidate, base_candidate_split, cursor_args, emit,
                                              gate_rule, in_set, state_args)
    from nudgefast.kernels.sample import split_scan
    from nudgefast.kernels.rng import row_key

    _MODE_NUDGING = tl.constexpr(MODE_NUDGING)
    _STATE_BASE = tl.constexpr(STATE_BASE)
    _FINISH_NONE = tl.constexpr(FINISH_NONE)

    @triton.jit(do_not_specialize=["C"])
    def _spec_accept_kernel(
        verify_ptr, v_stride_b, v_stride_k, V, draft_ptr, d_stride, K,
        seed_ptr, wstate_ptr, span_ptr, fin_ptr, nout_ptr, nnud_ptr,
        otok_ptr, otok_stride, ofrom_ptr, ofrom_stride, Wout, stop_ptr, stop_stride, S, wstart_ptr, W,
        gate_ptr, thr_ptr, word_ptr, itemp_ptr, topp_ptr, smode_ptr, maxnew_ptr,
        bc_ids, bc_pos, bc_sl, bc_slot, bc_bt, bc_bt_stride, bc_P, bc_page,
        nc_ids, nc_pos, nc_sl, nc_slot, nc_bt, nc_bt_stride, nc_P, nc_page,
        rounds_ptr, drafted_ptr, accepted_ptr, emitted_ptr, round_emitted_ptr, prev_tok_ptr, prev_missing_ptr,
        fl_ptr, it_ptr, C,
        MODE: tl.constexpr, MAX_SAMPLE: tl.constexpr, BLOCK: tl.constexpr, S_BLOCK: tl.constexpr,
        SPLIT: tl.constexpr, C_BLOCK: tl.constexpr,
    ):
        """One program per row. SPLIT: position i's candidate and statistics come from the chunk records
        of logical row row * (K + 1) + i (split_scan drew them with step n_out + i: the step position i
        has whenever the round reaches it, since every earlier position then emitted one token)."""
        row = tl.program_id(0)
        if tl.load(fin_ptr + row) == _FINISH_NONE:
            seed = tl.load(seed_ptr + row)
            n_out = tl.load(nout_ptr + row)
            n_nudged = tl.load(nnud_ptr + row)
            word_state = tl.load(wstate_ptr + row)
            span = tl.load(span_ptr + row)
            gate = tl.load(gate_ptr + row)
            threshold = tl.load(thr_ptr + row)
            word = tl.load(word_ptr + row)
            inv_temp = tl.load(itemp_ptr + row)
            top_p = tl.load(topp_ptr + row)
            sample = tl.minimum(tl.load(smode_ptr + row), MAX_SAMPLE)
            max_new = tl.load(maxnew_ptr + row)
            stops = stop_ptr + row.to(tl.int64) * stop_stride
            old_input = tl.load(nc_ids + row)
            last = old_input
            prev = old_input
            finished = tl.zeros([], tl.int32)
            count = tl.zeros([], tl.int32)
            accepted = tl.zeros([], tl.int32)
            moved = tl.zeros([], tl.int32)  # emitted tokens after which the row still ran
            moved_to = old_input
            active = tl.full([], 1, tl.int32)
            row_base = verify_ptr + row.to(tl.int64) * v_stride_b
            for i in range(0, K + 1):
                # the bonus position is scanned only where the rule could emit without n
                if MODE == _MODE_NUDGING:
                    worth = (i < K) | (word == 0) | (word_state == _STATE_BASE)
                else:
                    worth = i <= K
                if (active != 0) & worth:
                    if SPLIT:
                        b, confident = base_candidate_split(fl_ptr, it_ptr, row * (K + 1) + i, C, sample, gate,
                                                            threshold, MODE == _MODE_NUDGING, C_BLOCK)
                    else:
                        b, confident = base_candidate(row_base + i * v_stride_k, V, row_key(seed, n_out, 0),
                                                      inv_temp, top_p, sample, gate, threshold,
                                                      MODE == _MODE_NUDGING, MAX_SAMPLE, BLOCK)
                    bonus = b != b
                    if i < K:
                        d = tl.load(draft_ptr + row.to(tl.int64) * d_stride + i)
                        token, from_nudger, word_state, span = gate_rule(b, d, confident, word_state, span, word,
                                                                         stops, S, wstart_ptr, W, MODE, S_BLOCK)
                        same = token == d
                    else:
                        token = b
                        from_nudger = tl.zeros([], tl.int32)
                        same = b != b
                        if MODE == _MODE_NUDGING:  # word level: `worth` already required state BASE
                            bonus = confident & (in_set(b, stops, S, S_BLOCK) == 0)
                        else:
                            bonus = b == b
                    if (i < K) | bonus:
                        wrote, n_out, n_nudged, finished = emit(row, token, from_nudger, n_out, n_nudged, stops,
                                                                S, otok_ptr, otok_stride, ofrom_ptr, ofrom_stride,
                                                                Wout, max_new, S_BLOCK)
                        if wrote:
                            prev = last
                            last = token
                            count += 1
                            accepted += same.to(tl.int32)
                            if finished == _FINISH_NONE:
                                moved += 1
                                moved_to = token
                    active = ((finished == _FINISH_NONE) & same).to(tl.int32)
            tl.store(wstate_ptr + row, word_state)
            tl.store(span_ptr + row, span)
            tl.store(nout_ptr + row, n_out)
            tl.store(nnud_ptr + row, n_nudged)
            tl.store(fin_ptr + row, finished)
            running = finished == _FINISH_NONE
            tl.store(rounds_ptr + row, tl.load(rounds_ptr + row) + 1)
            tl.store(drafted_ptr + row, tl.load(drafted_ptr + row) + K)
            tl.store(accepted_ptr + row, tl.load(accepted_ptr + row) + accepted)
            tl.store(emitted_ptr + row, tl.load(emitted_ptr + row) + count)
            tl.store(round_emitted_ptr + row, count)
            tl.store(prev_tok_ptr + row, tl.where(running, prev, old_input))
            tl.store(prev_missing_ptr + row, (running & (count == K + 1)).to(tl.int32))
            advance_cursor(row, moved > 0, moved_to, moved, bc_ids, bc_pos, bc_sl, bc_slot, bc_bt, bc_bt_stride,
                           bc_P, bc_page)
            advance_cursor(row, moved > 0, moved_to, moved, nc_ids, nc_pos, nc_sl, nc_slot, nc_bt, nc_bt_stride,
                           nc_P, nc_page)


def spec_accept(verify_logits: torch.Tensor, draft: torch.Tensor, state: GateState, params: GateParams,
                base: ModelCursor, nudger: ModelCursor, stats: SpecStats, chunks: int | None = None) -> None:
    """Triton version of spec_accept_ref, no host syncs.

    chunks: programs per verify position for the vocabulary scans (vocab_split.plan_chunks over the
    B * (K + 1) positions; None = its heuristic). 1: one launch, one program per row, scanning the
    positions the round reaches. C > 1: split_scan writes chunk records of every position of every
    running row ((B * (K + 1), C) programs: positions after a rejection are scanned too, in
    parallel), then one program per row replays the rule on the combined records: 2 launches, 11
    when params.max_sample is SAMPLE_NUCLEUS."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use spec_accept_ref")
    B, K, sampler = check_spec_inputs(verify_logits, draft, state, params, base, nudger, stats)
    V = verify_logits.shape[2]
    C, (length,) = plan_chunks(B * (K + 1), [V], state.seed.device, chunks)
    floats = ints = state.n_out  # never read on the single-program path
    if C > 1:
        floats, ints = split_scan([(verify_logits, verify_logits.stride(0), verify_logits.stride(1), V)], B * (K + 1),
                                  K + 1, C, [length], state.seed, state.n_out, state.finished, state.inv_temp,
                                  state.top_p, state.sample_mode, 0, params.mode == MODE_NUDGING, sampler)
    _spec_accept_kernel[(B,)](
        verify_logits, verify_logits.stride(0), verify_logits.stride(1), verify_logits.shape[2],
        draft, draft.stride(0), K, *state_args(state),
        *cursor_args(base, None), *cursor_args(nudger, None),
        stats.rounds, stats.drafted, stats.accepted, stats.emitted, stats.round_emitted, stats.prev_token,
        stats.prev_kv_missing, floats, ints, C,
        MODE=params.mode, MAX_SAMPLE=sampler, BLOCK=SCAN_BLOCK,
        S_BLOCK=triton.next_power_of_2(state.stop_ids.shape[1]), SPLIT=C > 1, C_BLOCK=SPLIT_MAX_CHUNKS,
        num_warps=NUM_WARPS,
    )
