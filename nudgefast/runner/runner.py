"""The device side of the engine: prefill chunks, the running groups, one decode round per step.

Rows are grouped by what must be compile-time: the mode (which models run) and the speculation depth.
Everything else is per row, so any mix of requests is served; a user never sees the groups. The
runner knows requests only as rows: the engine (engine/) decides who runs and holds which pages;
the runner never allocates a page and never imports the engine.
"""
from __future__ import annotations

import contextlib

import torch

from ..kernels.nudge_gate import FINISH_LENGTH, FINISH_STOP, MODE_BASE_ONLY, MODE_NUDGER_ONLY, MODE_NUDGING
from ..kv_cache import AttentionMetadata
from .batch import RowBatch, RowInit
from .graphs import GraphCache
from .lazy import LazyBatch
from .steps import Kernels, SpeculativeRound, plain_step

MODE_CODES = {"nudging": MODE_NUDGING, "base_only": MODE_BASE_ONLY, "nudger_only": MODE_NUDGER_ONLY}
MODELS_OF = {"nudging": ("base", "nudger"), "base_only": ("base",), "nudger_only": ("nudger",)}


def group_key(config) -> tuple[str, int]:
    return config.mode, (config.speculate if config.mode == "nudging" else 0)


class Group:
    """The running rows of one (mode, K): a RowBatch stepped on the device, or (the lazy schedule of
    nudging with K = 0, lazy.py) a LazyBatch stepped by the host one model at a time."""

    def __init__(self, mode: str, K: int, batch):
        self.mode, self.K, self.batch = mode, K, batch
        self.mode_code = MODE_CODES[mode]
        self.lazy = isinstance(batch, LazyBatch)


class ModelRunner:
    def __init__(self, loaded: dict, device: torch.device, backend_kind: str, flag_interval: int,
                 cuda_graphs: bool, sync_debug: bool, word_start: torch.Tensor, lazy: bool = False):
        self.loaded = loaded  # name -> LoadedModel (model, kv pool, spec)
        self.device = device
        self.kernels = Kernels(backend_kind)
        self.flag_interval = flag_interval
        self.graphs = GraphCache() if cuda_graphs else None
        self.sync_debug = sync_debug and device.type == "cuda"
        self.word_start = word_start
        self.groups: dict[tuple[str, int], Group] = {}
        # block tables as wide as the model's whole context (+ speculation slack): one shape for all
        self.widths = {m: lm.kv.pages_for(lm.spec.max_position_embeddings + 2 * 16 + 2) for m, lm in loaded.items()}
        # nudging with K = 0 runs the lazy schedule (lazy.py) for groups created while this is True
        self.lazy = lazy
        self.step_hook = None  # called after each decode step / round with (group key, rows): the bench's seam

    # ---- sizes -------------------------------------------------------------------------------
    def steps_per_round(self, K: int) -> int:
        return self.flag_interval if K == 0 else max(1, self.flag_interval // (K + 1))

    def positions_per_round(self, K: int) -> int:
        """How far past a row's current length one round can write KV (the scheduler's page need)."""
        if K == 0:
            return self.flag_interval + 1
        return (self.steps_per_round(K) + 1) * (K + 1) + 1  # + the plain first step of a fresh row

    def ring_width(self, K: int) -> int:
        return self.positions_per_round(K) + 1

    # ---- prefill -----------------------------------------------------------------------------
    def prefill(self, model: str, chunks: list[tuple[list[int], int, list[int]]]) -> None:
        """KV only, for chunks (ids, start position, the row's pages): one varlen forward."""
        if not chunks:
            return
        lm = self.loaded[model]
        page = lm.kv.page_size
        lens = torch.tensor([len(ids) for ids, _, _ in chunks], dtype=torch.int64)
        start = torch.tensor([s for _, s, _ in chunks], dtype=torch.int64)
        ids = torch.tensor([t for c, _, _ in chunks for t in c], dtype=torch.int64, device=self.device)
        row_of_token = torch.repeat_interleave(torch.arange(len(chunks)), lens)
        cu = torch.zeros(len(chunks) + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(lens, 0)
        positions = start[row_of_token] + torch.arange(int(cu[-1])) - cu[:-1][row_of_token]
        width = max(len(p) for _, _, p in chunks)
        table = torch.tensor([p + [lm.kv.scratch_page] * (width - len(p)) for _, _, p in chunks], dtype=torch.int32)
        slots = table[row_of_token, positions // page].to(torch.int64) * page + positions % page
        meta = AttentionMetadata(slot_mapping=slots.to(self.device), block_tables=table.to(self.device),
                                 seq_lens=(start + lens).to(torch.int32).to(self.device),
                                 cu_q_lens=cu.to(torch.int32).to(self.device), max_q_len=int(lens.max()))
        with torch.inference_mode():
            lm.model.forward(ids, positions.to(self.device), meta, lm.kv, logits_indices=(cu[1:] - 1).to(self.device))

    # ---- membership --------------------------------------------------------------------------
    def group(self, mode: str, K: int) -> Group:
        key = (mode, K)
        g = self.groups.get(key)
        lazy = self.lazy and mode == "nudging" and K == 0
        if g is not None and g.lazy != lazy and len(g.batch) == 0:  # the switch changed while the group was empty
            g = None
        if g is None and lazy:
            batch = LazyBatch(self.loaded, self.kernels.sample, self.ring_width(K), self.word_start, self.device)
            g = self.groups[key] = Group(mode, K, batch)
        if g is None:
            models = MODELS_OF[mode]
            batch = RowBatch(models, {m: self.loaded[m].kv for m in models}, {m: self.widths[m] for m in models},
                             self.ring_width(K), self.word_start, self.device, speculative=K > 0)
            g = self.groups[key] = Group(mode, K, batch)
        return g

    def add(self, requests: list, rows: list[RowInit]) -> None:
        """Rows whose prefill is complete join their group. A fresh speculative row first emits its
        first token with a plain step: the draft's first forward runs on the token before the cursor
        too, and a fresh row's cursor may sit at position 0."""
        by_group: dict[tuple[str, int], list] = {}
        for req, row in zip(requests, rows):
            by_group.setdefault(group_key(req.config), []).append((req, row))
        for (mode, K), items in by_group.items():
            g = self.group(mode, K)
            if g.lazy:  # K = 0: no draft, so no first plain step
                g.batch.add([r for r, _ in items], [i for _, i in items])
                continue
            fresh = g.batch.spawn()
            fresh.add([r for r, _ in items if K and not r.tokens], [i for r, i in items if K and not r.tokens])
            if len(fresh):
                old_input = fresh.cursors["nudger"].input_ids.clone()
                with torch.inference_mode():
                    plain_step(self.kernels, self.loaded, fresh.params(g.mode_code), fresh.state, fresh.cursors)()
                # the token before the new cursor is the old one, whose KV that step wrote
                fresh.stats.prev_token.copy_(old_input)
                g.batch.extend(fresh)
            g.batch.add([r for r, _ in items if not (K and not r.tokens)],
                        [i for r, i in items if not (K and not r.tokens)])

    def remove(self, requests: set) -> None:
        for g in self.groups.values():
            b = g.batch
            if any(r in requests for r in b.requests):
                b.keep([i for i, r in enumerate(b.requests) if r not in requests])

    def locate(self, req) -> tuple[Group, int] | None:
        for g in self.groups.values():
            for i, r in enumerate(g.batch.requests):
                if r is req:
                    return g, i
        return None

    # ---- decoding ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _no_host_sync(self):
        """With sync_debug on CUDA, any host synchronisation inside a round raises."""
        if not self.sync_debug:
            yield
            return
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def run_round(self, g: Group, steps: int) -> None:
        b = g.batch
        if len(b) == 0:
            return
        if g.lazy:
            with torch.inference_mode():
                b.run(steps)
            if self.step_hook is not None:
                self.step_hook((g.mode, g.K), steps, len(b))
            return
        params = b.params(g.mode_code)
        with torch.inference_mode():
            if self.graphs is not None:
                cap = self.graphs.get("round" if g.K else "step", b, self.kernels, self.loaded, params, g.K)
                cap.load(b)
                with self._no_host_sync():
                    for _ in range(steps):
                        cap.graph.replay()
                cap.store(b)
            else:
                fn = (SpeculativeRound(self.kernels, self.loaded, params, g.K, b.state, b.cursors, b.stats) if g.K
                      else plain_step(self.kernels, self.loaded, params, b.state, b.cursors))
                for _ in range(steps):
                    fn()
        if self.step_hook is not None:
            self.step_hook((g.mode, g.K), steps, len(b))

    def collect(self, g: Group) -> list:
        """After a round: every row's new tokens onto its request; returns the requests that ended."""
        b = g.batch
        if len(b) == 0:
            return []
        n_out, finished, ring, src, stats = b.read()
        counts = b.take_forward_counts() if g.lazy else None
        W = ring.shape[1]
        ended = []
        for i, req in enumerate(b.requests):
            req.row_stats["host_reads"] = req.row_stats.get("host_reads", 0) + 1
            if counts is not None:  # decode forwards of each model (prefill not counted)
                # the lazy schedule reads every forward's candidates on the host
                req.row_stats["host_reads"] += sum(counts[i][0].values())
                for key, per_model in zip(("forwards", "forward_tokens"), counts[i]):
                    acc = req.row_stats.setdefault(key, {"base": 0, "nudger": 0})
                    for m, v in per_model.items():
                        acc[m] += v
            have = len(req.tokens)
            cols = [t % W for t in range(have, n_out[i])]
            req.tokens.extend(ring[i, cols].tolist())
            req.from_nudger.extend(bool(x) for x in src[i, cols].tolist())
            if stats is not None:
                req.spec_counters = {k: v[i] for k, v in stats.items()}
            if finished[i]:
                req.finish_reason = {FINISH_STOP: "stop", FINISH_LENGTH: "length"}[finished[i]]
                ended.append(req)
        return ended
