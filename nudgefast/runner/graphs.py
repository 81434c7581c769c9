"""CUDA graphs of the step and of the speculative round, private to the runner.

A graph is captured per key of shapes and compile-time constants only -- (kind, batch bucket, mode,
max_sample, K, models, ring width, stop-table width) -- never per threshold, temperature or length:
those are per-row device tensors that the graph reads. It owns static copies of the per-row state,
the cursors and the speculation counters; a round copies the batch in, replays the graph, and copies
it back out. Rows past the real batch are padding: finished from the start, slots -1 (never stored),
a dummy position 1 with two visible keys so every attention shape stays valid. Every graph shares one
memory pool, and their number is bounded by the buckets.
"""
from __future__ import annotations

import dataclasses

import torch

from ..kernels.nudge_gate import FINISH_STOP, GateState, ModelCursor
from ..kernels.spec_accept import SpecStats
from .steps import SpeculativeRound, plain_step

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
SHARED = ("word_start",)


def bucket_for(n: int) -> int:
    return next((b for b in BUCKETS if n <= b), n)


def _rows_like(t: torch.Tensor, rows: int, fill) -> torch.Tensor:
    return torch.full((rows, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)


class CapturedStep:
    def __init__(self, kind: str, batch, kernels, loaded: dict, params, K: int, rows: int, pool):
        self.rows = rows
        st = batch.state
        self.state = GateState(**{f.name: (getattr(st, f.name) if f.name in SHARED
                                           else _rows_like(getattr(st, f.name), rows, 0))
                                  for f in dataclasses.fields(GateState)})
        self.state.finished.fill_(FINISH_STOP)  # every row inert during warm-up and capture
        self.cursors = {}
        for m, c in batch.cursors.items():
            self.cursors[m] = ModelCursor(
                input_ids=_rows_like(c.input_ids, rows, 0), positions=_rows_like(c.positions, rows, 1),
                seq_lens=_rows_like(c.seq_lens, rows, 2), slot_mapping=_rows_like(c.slot_mapping, rows, -1),
                block_tables=_rows_like(c.block_tables, rows, 0), page_size=c.page_size)
        self.stats = None
        if kind == "round":
            self.stats = SpecStats(**{f.name: _rows_like(getattr(batch.stats, f.name), rows, 0)
                                      for f in dataclasses.fields(SpecStats)})
            fn = SpeculativeRound(kernels, loaded, params, K, self.state, self.cursors, self.stats)
        else:
            fn = plain_step(kernels, loaded, params, self.state, self.cursors)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up: compiles the Triton kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            fn()

    def load(self, batch) -> None:
        n = len(batch)
        for f in dataclasses.fields(GateState):
            if f.name not in SHARED:
                dst, src = getattr(self.state, f.name), getattr(batch.state, f.name)
                dst[:n].copy_(src)
        self.state.finished[n:] = FINISH_STOP
        for m, c in batch.cursors.items():
            dst = self.cursors[m]
            for name in ("input_ids", "positions", "seq_lens", "slot_mapping", "block_tables"):
                getattr(dst, name)[:n].copy_(getattr(c, name))
            dst.positions[n:], dst.seq_lens[n:], dst.slot_mapping[n:] = 1, 2, -1
        if self.stats is not None:
            for f in dataclasses.fields(SpecStats):
                getattr(self.stats, f.name)[:n].copy_(getattr(batch.stats, f.name))

    def store(self, batch) -> None:
        n = len(batch)
        for f in dataclasses.fields(GateState):
            if f.name not in SHARED:
                getattr(batch.state, f.name).copy_(getattr(self.state, f.name)[:n])
        for m, c in batch.cursors.items():
            for name in ("input_ids", "positions", "seq_lens", "slot_mapping"):
                getattr(c, name).copy_(getattr(self.cursors[m], name)[:n])
        if self.stats is not None:
            for f in dataclasses.fields(SpecStats):
                getattr(batch.stats, f.name).copy_(getattr(self.stats, f.name)[:n])


class GraphCache:
    """Captured steps by key; one memory pool for all of them."""

    def __init__(self):
        self.graphs: dict = {}
        self.pool = None

    def get(self, kind: str, batch, kernels, loaded: dict, params, K: int) -> CapturedStep:
        rows = bucket_for(len(batch))
        st = batch.state
        key = (kind, rows, params, K, tuple(batch.cursors), st.out_tokens.shape[1], st.stop_ids.shape[1],
               tuple(c.block_tables.shape[1] for c in batch.cursors.values()))
        g = self.graphs.get(key)
        if g is None:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            g = self.graphs[key] = CapturedStep(kind, batch, kernels, loaded, params, K, rows, self.pool)
        return g
