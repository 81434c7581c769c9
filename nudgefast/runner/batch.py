"""The running rows of one group, as device tensors: per-row gate state and parameters, one cursor
per model, speculation counters.

Rows join (after their prefill) and leave (finished, aborted, preempted) between rounds; the batch
is then rebuilt by concatenation / row selection, which costs a few small copies per membership
change and nothing per token. Rows keep arrival order. Everything a kernel reads per row (threshold,
gate, granularity, temperature, top_p, seed, max_new_tokens, stop ids) is a device tensor here, so
any mix of requests shares one step (see kernels/nudge_gate.py, GateState).

Emitted tokens go to a ring (out_tokens[row, step % ring]); the host reads every row's new tokens
after each round, so the ring only has to hold one round.
"""
from __future__ import annotations

import dataclasses

import torch

from ..kernels.nudge_gate import (GATE_ENTROPY, GATE_TOP_PROB, STATE_NUDGE, GateParams, GateState, ModelCursor)
from ..kernels.sample import SAMPLE_GREEDY, SAMPLE_NUCLEUS, inverse_temperature, sample_mode
from ..kernels.spec_accept import SpecStats
from ..kv_cache import KVPool

SHARED_STATE = ("word_start",)  # GateState fields that are one table for all rows


@dataclasses.dataclass
class RowInit:
    """Host values of one row joining a batch (from its request and, after preemption, its snapshot)."""
    ids: dict[str, list[int]]       # per model: prompt + emitted tokens; the last one is the cursor's
    pages: dict[str, list[int]]
    seed: int
    config: object                  # NudgeConfig
    stop_ids: list[int]
    n_out: int = 0
    n_nudged: int = 0
    word_state: int = STATE_NUDGE
    span: int = 0


def block_row(pages: list[int], width: int, pool: KVPool) -> list[int]:
    if len(pages) > width:
        raise ValueError(f"a row holds {len(pages)} pages but block tables have {width} entries")
    return list(pages) + [pool.scratch_page] * (width - len(pages))


def _pad_cols(t: torch.Tensor, width: int, fill) -> torch.Tensor:
    if t.shape[1] >= width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], 1)


class RowBatch:
    """One group's rows. `models`: the models in play; `pools`/`widths`: their page pools and
    block-table widths (pages per row, fixed per model so shapes do not change with lengths)."""

    def __init__(self, models: tuple[str, ...], pools: dict[str, KVPool], widths: dict[str, int], ring: int,
                 word_start: torch.Tensor, device, speculative: bool):
        self.models, self.pools, self.widths, self.ring = models, pools, widths, ring
        self.device, self.speculative = device, speculative
        self.requests: list = []
        self.word_start = word_start.to(device)
        self.state = self._empty_state()
        self.cursors = {m: self._cursor_from_rows([], m) for m in models}
        self.stats = SpecStats.zeros(0, device) if speculative else None
        self.max_sample = SAMPLE_GREEDY

    def __len__(self) -> int:
        return len(self.requests)

    # ---- building rows ----------------------------------------------------------------------
    def _empty_state(self) -> GateState:
        return self._state_from_rows([])

    def _state_from_rows(self, rows: list[RowInit]) -> GateState:
        dev, n = self.device, len(rows)
        i32 = dict(dtype=torch.int32)
        need = max([1] + [len(r.stop_ids) for r in rows])
        stop_w = 4
        while stop_w < need:  # powers of two: few distinct widths, so few CUDA-graph keys
            stop_w *= 2
        stops = torch.full((n, stop_w), -1, dtype=torch.int64)
        for i, r in enumerate(rows):
            if r.stop_ids:
                stops[i, :len(r.stop_ids)] = torch.tensor(r.stop_ids, dtype=torch.int64)
        cfgs = [r.config for r in rows]
        values = dict(
            seed=torch.tensor([r.seed for r in rows], dtype=torch.int64),
            word_state=torch.tensor([r.word_state for r in rows], **i32),
            span=torch.tensor([r.span for r in rows], **i32),
            finished=torch.zeros(n, **i32),
            n_out=torch.tensor([r.n_out for r in rows], **i32),
            n_nudged=torch.tensor([r.n_nudged for r in rows], **i32),
            out_tokens=torch.zeros(n, self.ring, **i32),
            out_from_nudger=torch.zeros(n, self.ring, dtype=torch.int8),
            stop_ids=stops,
            gate=torch.tensor([GATE_TOP_PROB if c.gate == "top_prob" else GATE_ENTROPY for c in cfgs], **i32),
            threshold=torch.tensor([float(c.threshold) for c in cfgs], dtype=torch.float32),
            word_level=torch.tensor([int(c.granularity == "word") for c in cfgs], **i32),
            inv_temp=torch.tensor([inverse_temperature(c.temperature) for c in cfgs], dtype=torch.float32),
            top_p=torch.tensor([float(c.top_p) for c in cfgs], dtype=torch.float32),
            sample_mode=torch.tensor([sample_mode(c.temperature, c.top_p) for c in cfgs], **i32),
            max_new=torch.tensor([c.max_new_tokens for c in cfgs], **i32),
        )
        fields = {f.name: (self.word_start if f.name in SHARED_STATE else values[f.name].to(dev))
                  for f in dataclasses.fields(GateState)}
        return GateState(**fields)

    def _cursor_from_rows(self, rows: list[RowInit], m: str) -> ModelCursor:
        pool, width = self.pools[m], self.widths[m]
        page = pool.page_size
        last = [r.ids[m][-1] for r in rows]
        pos = [len(r.ids[m]) - 1 for r in rows]
        slots = [r.pages[m][p // page] * page + p % page for r, p in zip(rows, pos)]
        table = torch.tensor([block_row(r.pages[m], width, pool) for r in rows], dtype=torch.int32)
        dev = self.device
        return ModelCursor(input_ids=torch.tensor(last, dtype=torch.int64).to(dev),
                           positions=torch.tensor(pos, dtype=torch.int64).to(dev),
                           seq_lens=torch.tensor([p + 1 for p in pos], dtype=torch.int32).to(dev),
                           slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev),
                           block_tables=table.reshape(len(rows), width).to(dev), page_size=page)

    def _stats_from_rows(self, rows: list[RowInit]) -> SpecStats:
        stats = SpecStats.zeros(len(rows), self.device)
        # the token before the nudger's cursor; its KV is in the cache (prefilled), nothing to repair
        prev = [r.ids["nudger"][-2] if len(r.ids["nudger"]) > 1 else r.ids["nudger"][-1] for r in rows]
        stats.prev_token.copy_(torch.tensor(prev, dtype=torch.int64))
        return stats

    # ---- membership -------------------------------------------------------------------------
    def spawn(self) -> "RowBatch":
        """An empty batch of the same kind (same models, tables, ring)."""
        return RowBatch(self.models, self.pools, self.widths, self.ring, self.word_start, self.device,
                        self.speculative)

    def add(self, requests: list, rows: list[RowInit]) -> None:
        if not rows:
            return
        new = self.spawn()
        new.state = new._state_from_rows(rows)
        new.cursors = {m: new._cursor_from_rows(rows, m) for m in self.models}
        if self.speculative:
            new.stats = new._stats_from_rows(rows)
        new.requests = list(requests)
        self.extend(new)

    def extend(self, other: "RowBatch") -> None:
        """Append another batch's rows (after this batch's)."""
        stop_w = max(self.state.stop_ids.shape[1], other.state.stop_ids.shape[1])
        merged = {}
        for f in dataclasses.fields(GateState):
            a, b = getattr(self.state, f.name), getattr(other.state, f.name)
            if f.name in SHARED_STATE:
                merged[f.name] = a
            elif f.name == "stop_ids":
                merged[f.name] = torch.cat([_pad_cols(a, stop_w, -1), _pad_cols(b, stop_w, -1)])
            else:
                merged[f.name] = torch.cat([a, b])
        self.state = GateState(**merged)
        for m in self.models:
            a, b = self.cursors[m], other.cursors[m]
            self.cursors[m] = ModelCursor(**{f.name: (a.page_size if f.name == "page_size"
                                                      else torch.cat([getattr(a, f.name), getattr(b, f.name)]))
                                             for f in dataclasses.fields(ModelCursor)})
        if self.speculative:
            self.stats = SpecStats(**{f.name: torch.cat([getattr(self.stats, f.name), getattr(other.stats, f.name)])
                                      for f in dataclasses.fields(SpecStats)})
        self.requests.extend(other.requests)
        self._update_max_sample()

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order)."""
        if len(indices) == len(self.requests):
            return
        idx = torch.tensor(indices, dtype=torch.int64, device=self.device)
        self.state = GateState(**{f.name: (getattr(self.state, f.name) if f.name in SHARED_STATE
                                           else getattr(self.state, f.name).index_select(0, idx))
                                  for f in dataclasses.fields(GateState)})
        for m in self.models:
            c = self.cursors[m]
            self.cursors[m] = ModelCursor(**{f.name: (c.page_size if f.name == "page_size"
                                                      else getattr(c, f.name).index_select(0, idx))
                                             for f in dataclasses.fields(ModelCursor)})
        if self.speculative:
            self.stats = SpecStats(**{f.name: getattr(self.stats, f.name).index_select(0, idx)
                                      for f in dataclasses.fields(SpecStats)})
        self.requests = [self.requests[i] for i in indices]
        self._update_max_sample()

    def _update_max_sample(self) -> None:
        greedy = all(r.config.temperature == 0 for r in self.requests)
        self.max_sample = SAMPLE_GREEDY if greedy else SAMPLE_NUCLEUS

    def set_pages(self, row: int, model: str, pages: list[int]) -> None:
        """A row grew: its block-table row now lists these pages (host -> device, between rounds)."""
        pool = self.pools[model]
        self.cursors[model].block_tables[row] = torch.tensor(block_row(pages, self.widths[model], pool),
                                                             dtype=torch.int32, device=self.device)

    def params(self, mode_code: int) -> GateParams:
        return GateParams(mode=mode_code, max_sample=self.max_sample)

    # ---- reading results --------------------------------------------------------------------
    def read(self) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor, dict | None]:
        """One host read after a round: n_out, finished, the ring, and speculation counters."""
        st = self.state
        n_out = st.n_out.cpu().tolist()
        finished = st.finished.cpu().tolist()
        stats = None
        if self.speculative:
            stats = {f.name: getattr(self.stats, f.name).cpu().tolist()
                     for f in dataclasses.fields(SpecStats) if f.name in ("rounds", "drafted", "accepted", "emitted")}
        return n_out, finished, st.out_tokens.cpu(), st.out_from_nudger.cpu(), stats

    def row_snapshot(self, row: int) -> dict:
        """What a preempted row needs to resume exactly: the rule's state for its next token."""
        st = self.state
        return {"word_state": int(st.word_state[row]), "span": int(st.span[row]), "n_nudged": int(st.n_nudged[row])}
