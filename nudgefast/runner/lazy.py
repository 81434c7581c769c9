"""The lazy schedule of shared-vocabulary nudging (mode "nudging", speculate=0), for the CPU.

The eager step (steps.plain_step) runs a decode forward of BOTH models for every row at every
position, then the fused gate. But the rule of DESIGN.md section 1 reads only part of that:

- token granularity, and word granularity in state BASE: `b` and `confident` come first (a base
  forward); `n` is read only when not (confident and b is not a stop id);
- word granularity in state NUDGE: `n` comes first (a nudger forward); `b` and `confident` are read
  only when span >= 1 and n is a word start; otherwise n is emitted and the base is not needed.

Here each row asks for the logits its rule reads, one model at a time. A model that is not asked at
a position keeps a backlog: the tokens emitted since its last forward. When it is asked again, its
forward runs over the whole backlog at once, a varlen chunk per row (prefill-style, logits of each
chunk's last position only), which writes the KV of every position it skipped. On the CPU a
multi-token forward costs about what one token costs (the weights are read once), so a position
costs one model's weight reads where the rule needs one model, and two where it needs both.

Why the output is the eager output, token for token:
- the logits a row reads at output step t are those after its prompt + y[:t], whichever forward
  computes them (chunked or not: the KV of a position depends only on the tokens before it);
- candidates are drawn with the same counter-based keys (row seed, step t = tokens emitted so far,
  stream 0 for the base, 1 for the nudger) and the same sampler as the fused gate, so a draw made
  late, or only when needed, is the same draw; the gate statistics are those of the torch reference
  (float32, the row's threshold as float32);
- the decisions below are the rule, branch for branch (steps.py's gate kernel is the other form;
  tests/test_lazy.py holds the two equal, and both equal nudgefast/reference.py).

Pages: a lagging model writes KV only at positions below the row's current length, which the
scheduler reserved in earlier rounds (it reserves prompt + tokens + positions_per_round and never
shrinks a running row); block tables are built per forward from each row's page list. Preemption
and aborts happen between rounds, where a row's backlog is just ids it has not cached: a preempted
row is re-prefilled from its prompt and tokens and resumes with no backlog.

The host reads candidates every forward, which is fine on the CPU and not what the CUDA loop wants:
the engine routes here on the CPU by default (NudgingEngine(lazy=...), NUDGEFAST_LAZY).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.nudge_gate import (FINISH_LENGTH, FINISH_NONE, FINISH_STOP, GATE_ENTROPY, GATE_TOP_PROB, STATE_BASE,
                                  STATE_NUDGE, base_stats_ref)
from ..kernels.rng import STREAM_BASE, STREAM_NUDGER
from ..kernels.sample import inverse_temperature, sample_mode
from ..kv_cache import AttentionMetadata

BASE, NUDGER = "base", "nudger"
MODELS = (BASE, NUDGER)


@dataclass(eq=False)
class LazyRow:
    """One row's rule state and each model's ids (prompt + emitted tokens) with how many are cached."""
    req: object
    ids: dict                  # model -> prompt + emitted tokens
    cached: dict               # model -> ids[:cached] have KV in the cache
    pages: dict                # model -> the row's pages
    seed: int
    stop_ids: frozenset
    word_level: bool
    gate: int
    threshold: float
    inv_temp: float
    top_p: float
    sample_mode: int
    max_new: int
    n_out: int
    n_nudged: int
    word_state: int
    span: int
    finished: int = FINISH_NONE
    waits: str | None = None   # the model whose logits the current position waits for
    base_first: bool = True    # the current position asked the base first
    held_b: int = -1           # base candidate and gate, kept while the nudger is asked
    held_confident: bool = False
    held_n: int = -1           # nudger candidate, kept while the base decides
    quota: int = 0             # n_out at which this round ends for the row
    new_tokens: list = field(default_factory=list)   # (token, from_nudger) since the last read
    forwards: dict = field(default_factory=lambda: dict.fromkeys(MODELS, 0))        # since the last read
    forward_tokens: dict = field(default_factory=lambda: dict.fromkeys(MODELS, 0))

    def first_need(self) -> str:
        """Which model the rule reads first at this position."""
        return NUDGER if self.word_level and self.word_state == STATE_NUDGE else BASE


class LazyBatch:
    """The rows of the nudging group under the lazy schedule. Same surface as RowBatch for the
    runner and the engine (add, keep, set_pages, read, row_snapshot), host state per row."""

    def __init__(self, loaded: dict, sample, ring: int, word_start: torch.Tensor, device):
        self.loaded, self.sample, self.ring, self.device = loaded, sample, ring, device
        self.word_start = word_start.tolist()
        self.rows: list[LazyRow] = []

    @property
    def requests(self) -> list:
        return [r.req for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    # ---- membership --------------------------------------------------------------------------
    def add(self, requests: list, rows: list) -> None:
        """Rows (batch.RowInit) whose prefill is complete: both models hold the KV of every id but the
        last, which the row's first forward of each model computes."""
        for req, r in zip(requests, rows):
            c = r.config
            self.rows.append(LazyRow(
                req=req, ids={m: list(r.ids[m]) for m in MODELS}, cached={m: len(r.ids[m]) - 1 for m in MODELS},
                pages={m: list(r.pages[m]) for m in MODELS}, seed=int(r.seed), stop_ids=frozenset(r.stop_ids),
                word_level=c.granularity == "word", gate=GATE_TOP_PROB if c.gate == "top_prob" else GATE_ENTROPY,
                threshold=float(c.threshold), inv_temp=inverse_temperature(c.temperature), top_p=float(c.top_p),
                sample_mode=sample_mode(c.temperature, c.top_p), max_new=c.max_new_tokens, n_out=r.n_out,
                n_nudged=r.n_nudged, word_state=r.word_state, span=r.span))

    def keep(self, indices: list[int]) -> None:
        self.rows = [self.rows[i] for i in indices]

    def set_pages(self, row: int, model: str, pages: list[int]) -> None:
        self.rows[row].pages[model] = list(pages)

    def row_snapshot(self, row: int) -> dict:
        r = self.rows[row]
        return {"word_state": r.word_state, "span": r.span, "n_nudged": r.n_nudged}

    # ---- reading results --------------------------------------------------------------------
    def read(self):
        """RowBatch.read's shape: n_out, finished, the ring of new tokens and their sources, no
        speculation counters."""
        B, W = len(self.rows), self.ring
        ring = torch.zeros(B, W, dtype=torch.int32)
        src = torch.zeros(B, W, dtype=torch.int8)
        for i, r in enumerate(self.rows):
            first = r.n_out - len(r.new_tokens)
            for j, (tok, nudged) in enumerate(r.new_tokens):
                ring[i, (first + j) % W] = tok
                src[i, (first + j) % W] = int(nudged)
            r.new_tokens.clear()
        return [r.n_out for r in self.rows], [r.finished for r in self.rows], ring, src, None

    def take_forward_counts(self) -> list[tuple[dict, dict]]:
        """Per row: (forwards, forward_tokens) per model since the last call, reset."""
        out = []
        for r in self.rows:
            out.append((dict(r.forwards), dict(r.forward_tokens)))
            r.forwards, r.forward_tokens = dict.fromkeys(MODELS, 0), dict.fromkeys(MODELS, 0)
        return out

    # ---- the round ---------------------------------------------------------------------------
    def run(self, steps: int) -> None:
        """Every running row emits `steps` tokens (or finishes). Per iteration each model runs at
        most ONE forward, over the rows waiting for it; the base goes first, so a row whose base
        candidate hands the position to the nudger is served in the same iteration."""
        for r in self.rows:
            r.quota = r.n_out + steps
        while True:
            live = [r for r in self.rows if r.finished == FINISH_NONE and (r.waits or r.n_out < r.quota)]
            if not live:
                return
            for r in live:
                if r.waits is None:
                    r.waits = r.first_need()
                    r.base_first = r.waits == BASE
            for m in MODELS:
                group = [r for r in live if r.waits == m and r.finished == FINISH_NONE]
                if group:
                    self._step(m, group)

    def _step(self, m: str, rows: list[LazyRow]) -> None:
        logits = self._forward(m, rows)
        seeds = torch.tensor([r.seed for r in rows], dtype=torch.int64)
        steps = torch.tensor([r.n_out for r in rows], dtype=torch.int32)
        inv_temp = torch.tensor([r.inv_temp for r in rows], dtype=torch.float32)
        top_p = torch.tensor([r.top_p for r in rows], dtype=torch.float32)
        modes = torch.tensor([r.sample_mode for r in rows], dtype=torch.int32)
        stream = STREAM_BASE if m == BASE else STREAM_NUDGER
        cands = self.sample(logits, seeds.to(self.device), steps.to(self.device), stream, inv_temp.to(self.device),
                            top_p.to(self.device), modes.to(self.device)).tolist()
        if m == BASE:
            # confident_ref's comparison: float32 statistics against the float32 threshold
            p_top, entropy = base_stats_ref(logits)
            thr = torch.tensor([r.threshold for r in rows], dtype=torch.float32, device=p_top.device)
            top = torch.tensor([r.gate == GATE_TOP_PROB for r in rows], device=p_top.device)
            confident = torch.where(top, p_top >= thr, entropy <= thr).tolist()
            for r, b, conf in zip(rows, cands, confident):
                self._on_base(r, int(b), bool(conf))
        else:
            for r, n in zip(rows, cands):
                self._on_nudger(r, int(n))

    # ---- the rule (DESIGN.md section 1), split where it reads one model's candidate ------------
    def _on_base(self, r: LazyRow, b: int, confident: bool) -> None:
        b_ok = b not in r.stop_ids
        if r.base_first:  # token granularity, or word granularity in BASE
            if confident and b_ok:
                self._emit(r, b, False)  # word_state stays BASE; span is unchanged
            else:
                r.held_b, r.held_confident, r.waits = b, confident, NUDGER
            return
        # word granularity in NUDGE, n a word start, span >= 1: the base may take over here
        n = r.held_n
        if (confident or b == n) and b_ok:
            r.word_state = STATE_BASE
            self._emit(r, b, False)
        else:
            r.span += 1
            self._emit(r, n, True)

    def _on_nudger(self, r: LazyRow, n: int) -> None:
        if r.base_first:  # the base was not confident (or wanted to stop): n is emitted
            if r.word_level:  # BASE -> NUDGE
                r.word_state, r.span = STATE_NUDGE, 1
            self._emit(r, n, True)
            return
        ws = 0 <= n < len(self.word_start) and self.word_start[n]
        if r.span >= 1 and ws:
            r.held_n, r.waits = n, BASE
        else:
            r.span += 1
            self._emit(r, n, True)

    def _emit(self, r: LazyRow, token: int, from_nudger: bool) -> None:
        """The ending of DESIGN.md section 1: a stop id ends the row unwritten; max_new ends it after."""
        r.waits = None
        if token in r.stop_ids:
            r.finished = FINISH_STOP
            return
        r.new_tokens.append((token, from_nudger))
        r.n_out += 1
        r.n_nudged += int(from_nudger)
        for m in MODELS:
            r.ids[m].append(token)
        if r.n_out >= r.max_new:
            r.finished = FINISH_LENGTH

    # ---- the forward -------------------------------------------------------------------------
    def _forward(self, m: str, rows: list[LazyRow]) -> torch.Tensor:
        """One varlen forward of model m over each row's backlog (its uncached ids, at least the
        last one); logits [R, V] at each row's last id."""
        loaded = self.loaded[m]
        pool, page = loaded.kv, loaded.kv.page_size
        chunks, starts = [], []
        for r in rows:
            start = r.cached[m]
            chunk = r.ids[m][start:]
            assert chunk, "a row asks a model for logits it already computed"
            chunks.append(chunk)
            starts.append(start)
            r.cached[m] = len(r.ids[m])
            r.forwards[m] += 1
            r.forward_tokens[m] += len(chunk)
        lens = torch.tensor([len(c) for c in chunks], dtype=torch.int64)
        start = torch.tensor(starts, dtype=torch.int64)
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.int64)
        row_of_token = torch.repeat_interleave(torch.arange(len(rows)), lens)
        cu = torch.zeros(len(rows) + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(lens, 0)
        positions = start[row_of_token] + torch.arange(int(cu[-1])) - cu[:-1][row_of_token]
        for r, s0, c in zip(rows, starts, chunks):
            if s0 + len(c) > len(r.pages[m]) * page:  # would land in the scratch page and be lost
                raise RuntimeError(f"a {m} forward of {len(c)} tokens at position {s0} reaches past the row's "
                                   f"{len(r.pages[m])} pages (the scheduler reserves them)")
        width = max(len(r.pages[m]) for r in rows)
        table = torch.tensor([r.pages[m] + [pool.scratch_page] * (width - len(r.pages[m])) for r in rows],
                             dtype=torch.int32)
        slots = table[row_of_token, positions // page].to(torch.int64) * page + positions % page
        dev = self.device
        seq_lens = (start + lens).to(torch.int32).to(dev)
        if int(lens.max()) == 1:  # every row has one token: the decode path
            meta = AttentionMetadata(slot_mapping=slots.to(dev), block_tables=table.to(dev), seq_lens=seq_lens,
                                     cu_q_lens=None)
            last = None
        else:
            meta = AttentionMetadata(slot_mapping=slots.to(dev), block_tables=table.to(dev), seq_lens=seq_lens,
                                     cu_q_lens=cu.to(torch.int32).to(dev), max_q_len=int(lens.max()))
            last = (cu[1:] - 1).to(dev)
        return loaded.model.forward(ids.to(dev), positions.to(dev), meta, pool, logits_indices=last)
