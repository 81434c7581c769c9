"""Speculative nudging (DESIGN.md section 1, "Speculation"): the nudger drafts, the base verifies.

A round, for the whole batch, with fixed shapes (so it can be one CUDA graph):
  1. The nudger drafts K tokens, each its candidate n at output step n_out + i (the same counter-
     based RNG keys as plain decoding). Its first draft step runs on two tokens per row,
     [prev_token, last] at [pos - 1, pos]: after a fully accepted draft plus a bonus, the nudger
     never computed KV for the token before `last` (spec_accept reports it); otherwise that slot is
     -1 and the existing KV is left as it is.
  2. The base model scores [last, d_0 .. d_{K-1}] in ONE multi-token forward: K+1 distributions.
  3. spec_accept replays the gate and the word state machine over the draft on the device, keeps
     the longest prefix the sequential rule would write, emits the correction (or a bonus where the
     rule does not need the nudger), and moves both cursors. Rejected KV entries are simply
     overwritten by later rounds; nothing is rolled back on the host.
Because every candidate is keyed by its output step, a speculative run emits exactly what the
non-speculative run emits, greedy or sampled with the same seed.
"""
from __future__ import annotations

import torch

from .kernels.nudge_gate import GateParams, GateState
from .kernels.sample import sample, sample_ref
from .kernels.spec_accept import SpecStats, spec_accept, spec_accept_ref
from .kernels.rng import STREAM_NUDGER
from .kv_cache import AttentionMetadata, slots_for


class SpeculativeRound:
    """Static buffers and the round itself for one batch; `run()` is capture-safe on CUDA."""

    def __init__(self, engine, base_side, nudger_side, state: GateState, params: GateParams, K: int,
                 stats: SpecStats):
        self.base, self.nudger = base_side, nudger_side
        self.state, self.params, self.K, self.stats = state, params, K, stats
        triton = engine.backend.kind == "triton"
        self.sample = sample if triton else sample_ref
        if engine.backend.kind == "native":
            self.sample = torch.ops.nudgefast.sample
        self.accept = spec_accept if triton else spec_accept_ref
        B = state.seed.shape[0]
        dev = state.seed.device
        self.B = B
        self.draft = torch.zeros(B, K, dtype=torch.int64, device=dev)
        self.offsets_draft = torch.arange(K, device=dev)
        self.offsets_verify = torch.arange(K + 1, device=dev)
        self.cu_two = torch.arange(0, 2 * B + 1, 2, dtype=torch.int32, device=dev)
        self.cu_verify = torch.arange(0, (K + 1) * B + 1, K + 1, dtype=torch.int32, device=dev)
        self.last_of_two = torch.arange(1, 2 * B, 2, device=dev)

    # -- the nudger's draft ------------------------------------------------------------------
    def _draft(self) -> None:
        c, kv, model = self.nudger.cursor, self.nudger.loaded.kv, self.nudger.loaded.model
        st, p = self.state, self.params
        page = c.page_size
        pos = c.positions
        running = st.finished == 0  # finished (and padding) rows store nothing
        # step 0 on [prev_token, last]: re-create the missing KV of prev_token where needed
        prev_pos = (pos - 1).clamp_min(0)
        prev_slot = slots_for(c.block_tables, prev_pos[:, None], page)[:, 0]
        prev_slot = torch.where(self.stats.prev_kv_missing.bool() & running, prev_slot, -1)
        ids = torch.stack([self.stats.prev_token, c.input_ids], 1).reshape(-1)
        positions = torch.stack([prev_pos, pos], 1).reshape(-1)
        slots = torch.stack([prev_slot, torch.where(running, c.slot_mapping, -1)], 1).reshape(-1)
        # a row that finished at its first token after a one-token prompt still sits at position 0:
        # two queries need two keys (its outputs are ignored and it stores nothing)
        meta = AttentionMetadata(slot_mapping=slots, block_tables=c.block_tables, seq_lens=c.seq_lens.clamp_min(2),
                                 cu_q_lens=self.cu_two, max_q_len=2)
        logits = model.forward(ids, positions, meta, kv, logits_indices=self.last_of_two)
        self.draft[:, 0] = self.sample(logits, st.seed, st.n_out, STREAM_NUDGER, p.temperature, p.top_p)
        for i in range(1, self.K):
            q_pos = pos + i
            slot = torch.where(running, slots_for(c.block_tables, q_pos[:, None], page)[:, 0], -1)
            meta = AttentionMetadata(slot_mapping=slot, block_tables=c.block_tables, seq_lens=(c.seq_lens + i),
                                     cu_q_lens=None)
            logits = model.forward(self.draft[:, i - 1], q_pos, meta, kv)
            self.draft[:, i] = self.sample(logits, st.seed, st.n_out + i, STREAM_NUDGER, p.temperature, p.top_p)

    # -- the base model's verify ------------------------------------------------------------
    def _verify(self) -> torch.Tensor:
        c, kv, model = self.base.cursor, self.base.loaded.kv, self.base.loaded.model
        K1 = self.K + 1
        ids = torch.cat([c.input_ids[:, None], self.draft], 1).reshape(-1)
        positions = (c.positions[:, None] + self.offsets_verify[None, :])
        running = (self.state.finished == 0)[:, None]
        slots = torch.where(running, slots_for(c.block_tables, positions, c.page_size), -1).reshape(-1)
        meta = AttentionMetadata(slot_mapping=slots, block_tables=c.block_tables, seq_lens=c.seq_lens + self.K,
                                 cu_q_lens=self.cu_verify, max_q_len=K1)
        logits = model.forward(ids, positions.reshape(-1), meta, kv)
        return logits.view(self.B, K1, -1)

    def run(self) -> None:
        self._draft()
        verify_logits = self._verify()
        self.accept(verify_logits, self.draft, self.state, self.params, self.base.cursor, self.nudger.cursor,
                    self.stats)


def run_speculative(engine, sides, state: GateState, params: GateParams, config) -> dict:
    """Prefill both prompts, emit the first token with the plain gate step, then speculative rounds
    until every row has finished."""
    from .decode import gate_fn, no_host_sync, prefill

    by_name = {s.name: s for s in sides}
    base, nudger = by_name["base"], by_name["nudger"]
    logits = {s.name: prefill(s, engine.device) for s in sides}
    gate_fn(engine)(logits["base"], logits["nudger"], state, params, base.cursor, nudger.cursor)
    B = state.seed.shape[0]
    stats = SpecStats.zeros(B, engine.device)
    stats.prev_token.copy_(torch.tensor([p[-1] for p in nudger.prompts], dtype=torch.int64))
    K = config.speculate
    if engine.cuda_graphs:
        from .cuda_graphs import GraphRound
        round_ = GraphRound.get(engine, sides, state, params, K, stats)
    else:
        round_ = SpeculativeRound(engine, base, nudger, state, params, K, stats)
    live_state = round_.state
    rounds_per_read = max(1, engine.flag_interval // (K + 1))
    rounds, flag_reads = 0, 0
    # every round emits >= 1 token per running row, and the gate step above emitted the first one,
    # so max_new_tokens - 1 rounds always suffice
    while rounds < params.max_new_tokens - 1:
        with no_host_sync(engine):
            for _ in range(min(rounds_per_read, params.max_new_tokens - 1 - rounds)):
                round_.run()
        rounds += rounds_per_read
        flag_reads += 1
        if bool((live_state.finished != 0).all()):
            break
    if engine.cuda_graphs:
        round_.copy_out(state, stats)
    per_row = {
        "rounds": stats.rounds.cpu().tolist(),
        "drafted": stats.drafted.cpu().tolist(),
        "accepted": stats.accepted.cpu().tolist(),
        "emitted_in_rounds": stats.emitted.cpu().tolist(),
    }
    per_row["acceptance_rate"] = [a / d if d else 0.0 for a, d in zip(per_row["accepted"], per_row["drafted"])]
    per_row["tokens_per_round"] = [e / r if r else 0.0 for e, r in zip(per_row["emitted_in_rounds"], per_row["rounds"])]
    return {"speculate": K, "flag_reads": flag_reads, "per_row": per_row}
