"""The device work of one step, for any rows: a decode forward of each model at its cursor, the fused
gate step, and the speculative round (the nudger drafts K, the base verifies K+1 positions, the
accept kernel replays the rule). Nothing here allocates pages, reads the host, or knows requests:
these are the callables a CUDA graph captures.

Kernels by backend: Triton on CUDA, the C++ ops on the CPU when built, else the torch references.
"""
from __future__ import annotations

import torch

from ..kernels.nudge_gate import GateParams, GateState, ModelCursor, nudge_step, nudge_step_ref
from ..kernels.rng import STREAM_NUDGER
from ..kernels.sample import sample_rows, sample_rows_ref
from ..kernels.spec_accept import SpecStats, spec_accept, spec_accept_ref
from ..kv_cache import AttentionMetadata, slots_for


class Kernels:
    """The gate step, the per-row sampler and the accept kernel of one backend."""

    def __init__(self, backend_kind: str):
        self.kind = backend_kind
        self.gate = nudge_step_ref
        self.sample = sample_rows_ref
        self.accept = spec_accept_ref
        if backend_kind == "triton":
            self.gate, self.sample, self.accept = nudge_step, sample_rows, spec_accept
        elif backend_kind == "native":
            from .. import native

            self.gate = native.nudge_step_native
            self.sample = getattr(native, "sample_rows_native", sample_rows_ref)


def decode_forward(loaded, cursor: ModelCursor) -> torch.Tensor:
    """One token per row at the cursor: logits [B, V]."""
    meta = AttentionMetadata(slot_mapping=cursor.slot_mapping, block_tables=cursor.block_tables,
                             seq_lens=cursor.seq_lens, cu_q_lens=None)
    return loaded.model.forward(cursor.input_ids, cursor.positions, meta, loaded.kv)


def plain_step(kernels: Kernels, loaded: dict, params: GateParams, state: GateState, cursors: dict):
    """A closure running one decode step of every model in play plus the gate, in place."""
    base, nudger = loaded.get("base"), loaded.get("nudger")
    bc, nc = cursors.get("base"), cursors.get("nudger")
    # a tensor-parallel base (parallel/tensor.py) reduces its vocabulary shards to the gate's few
    # numbers per row and runs the gate itself, instead of gathering its logits here
    sharded = bc is not None and hasattr(base.model, "decode_and_gate") and base.model.reduces_gate(state, params)

    def step() -> None:
        if sharded:
            nl = decode_forward(nudger, nc) if nc is not None else None
            base.model.decode_and_gate(bc, base.kv, nl, state, params, nc, kernels.sample)
            return
        bl = decode_forward(base, bc) if bc is not None else None
        nl = decode_forward(nudger, nc) if nc is not None else None
        kernels.gate(bl, nl, state, params, bc, nc)

    return step


class SpeculativeRound:
    """One round for a batch, fixed shapes (capture-safe on CUDA):
      1. the nudger drafts K tokens, each its candidate n at output step n_out + i (the same RNG keys
         as plain decoding); its first draft step runs on [prev_token, last] at [pos - 1, pos]: after
         a fully accepted draft plus a bonus, the nudger never computed KV for the token before `last`
         (spec_accept reports it); otherwise that slot is -1 and the existing KV is left as it is;
      2. the base scores [last, d_0 .. d_{K-1}] in ONE forward: K+1 distributions;
      3. spec_accept replays the rule over the draft, keeps the longest prefix the sequential rule would
         write, emits the correction or a bonus, and moves both cursors. Rejected KV entries are
         overwritten by later rounds; nothing is rolled back on the host.
    Every candidate is keyed by its output step, so a speculative run emits exactly what the plain run
    emits, greedy or sampled with the same seed. Cursor positions must be >= 1 (a row's first token
    comes from a plain step)."""

    def __init__(self, kernels: Kernels, loaded: dict, params: GateParams, K: int, state: GateState,
                 cursors: dict, stats: SpecStats):
        self.kernels, self.params, self.K, self.state, self.stats = kernels, params, K, state, stats
        self.base, self.nudger = loaded["base"], loaded["nudger"]
        self.bc, self.nc = cursors["base"], cursors["nudger"]
        B = state.seed.shape[0]
        dev = state.seed.device
        self.B = B
        self.draft = torch.zeros(B, K, dtype=torch.int64, device=dev)
        self.offsets_verify = torch.arange(K + 1, device=dev)
        self.cu_two = torch.arange(0, 2 * B + 1, 2, dtype=torch.int32, device=dev)
        self.cu_verify = torch.arange(0, (K + 1) * B + 1, K + 1, dtype=torch.int32, device=dev)
        self.last_of_two = torch.arange(1, 2 * B, 2, device=dev)

    def _draft(self) -> None:
        c, kv, model = self.nc, self.nudger.kv, self.nudger.model
        st = self.state
        page = c.page_size
        pos = c.positions
        running = st.finished == 0  # finished (and padding) rows store nothing
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
        sample = self.kernels.sample
        self.draft[:, 0] = sample(logits, st.seed, st.n_out, STREAM_NUDGER, st.inv_temp, st.top_p, st.sample_mode)
        for i in range(1, self.K):
            q_pos = pos + i
            slot = torch.where(running, slots_for(c.block_tables, q_pos[:, None], page)[:, 0], -1)
            meta = AttentionMetadata(slot_mapping=slot, block_tables=c.block_tables, seq_lens=(c.seq_lens + i),
                                     cu_q_lens=None)
            logits = model.forward(self.draft[:, i - 1], q_pos, meta, kv)
            self.draft[:, i] = sample(logits, st.seed, st.n_out + i, STREAM_NUDGER, st.inv_temp, st.top_p,
                                      st.sample_mode)

    def _verify(self) -> torch.Tensor:
        c, kv, model = self.bc, self.base.kv, self.base.model
        K1 = self.K + 1
        ids = torch.cat([c.input_ids[:, None], self.draft], 1).reshape(-1)
        positions = (c.positions[:, None] + self.offsets_verify[None, :])
        running = (self.state.finished == 0)[:, None]
        slots = torch.where(running, slots_for(c.block_tables, positions, c.page_size), -1).reshape(-1)
        meta = AttentionMetadata(slot_mapping=slots, block_tables=c.block_tables, seq_lens=c.seq_lens + self.K,
                                 cu_q_lens=self.cu_verify, max_q_len=K1)
        logits = model.forward(ids, positions.reshape(-1), meta, kv)
        return logits.view(self.B, K1, -1)

    def __call__(self) -> None:
        self._draft()
        verify_logits = self._verify()
        self.kernels.accept(verify_logits, self.draft, self.state, self.params, self.bc, self.nc, self.stats)
