"""CUDA-graph capture of the decode step (base forward, nudger forward, gate) and of the
speculative round (K nudger steps, one base verify, the accept kernel).

A graph is captured per (batch-size bucket, compile-time gate parameters, models in play, state
widths) -- never per threshold, temperature or length, which are per-row state tensors -- and
replayed for every token (or round). It owns static copies of the per-row state and the cursors:
a generation copies its state in after prefill, replays, and copies the state back out at the end.
Rows past the real batch are padding: finished from the start, slots -1 (never stored), a dummy
position 1 with two visible keys so every attention shape stays valid.
"""
from __future__ import annotations

import dataclasses

import torch

from .kernels.nudge_gate import FINISH_STOP, GateState, ModelCursor, nudge_step

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
_SHARED = ("word_start",)  # a shared table, not per-row state


def bucket_for(n: int) -> int:
    return next((b for b in BUCKETS if n <= b), n)


def _rows_like(t: torch.Tensor, rows: int, fill) -> torch.Tensor:
    return torch.full((rows, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)


class _Captured:
    """Static buffers shared by both graph kinds, plus load / copy-out."""

    def __init__(self, sides, state: GateState, rows: int):
        self.rows, self.n_real = rows, 0
        self.state = GateState(**{f.name: (getattr(state, f.name).clone() if f.name in _SHARED
                                           else _rows_like(getattr(state, f.name), rows, 0))
                                  for f in dataclasses.fields(GateState)})
        self.cursors = {}
        for s in sides:
            c = s.cursor
            # block tables as wide as the model's whole context: one graph serves every prompt length
            width = -(-s.loaded.spec.max_position_embeddings // c.page_size) + 2
            self.cursors[s.name] = ModelCursor(
                input_ids=_rows_like(c.input_ids, rows, 0), positions=_rows_like(c.positions, rows, 1),
                seq_lens=_rows_like(c.seq_lens, rows, 2), slot_mapping=_rows_like(c.slot_mapping, rows, -1),
                block_tables=torch.zeros(rows, width, dtype=c.block_tables.dtype, device=c.block_tables.device),
                page_size=c.page_size)
        self.sides = {s.name: dataclasses.replace(s, cursor=self.cursors[s.name]) for s in sides}
        self.state.finished.fill_(FINISH_STOP)  # every row inert during warm-up and capture

    def _capture(self, fn) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up: compiles the Triton kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            fn()

    def load(self, sides, state: GateState) -> None:
        """Copy a generation's state and cursors into the static buffers (padding rows inert)."""
        n = self.n_real = state.seed.shape[0]
        for f in dataclasses.fields(GateState):
            dst, src = getattr(self.state, f.name), getattr(state, f.name)
            (dst if f.name in _SHARED else dst[:n]).copy_(src)
        self.state.finished[n:] = FINISH_STOP
        for s in sides:
            dst = self.cursors[s.name]
            for name in ("input_ids", "positions", "seq_lens", "slot_mapping"):
                getattr(dst, name)[:n].copy_(getattr(s.cursor, name))
            dst.block_tables[:n].zero_()
            dst.block_tables[:n, :s.cursor.block_tables.shape[1]].copy_(s.cursor.block_tables)
            dst.positions[n:], dst.seq_lens[n:], dst.slot_mapping[n:] = 1, 2, -1

    def run(self) -> None:
        self.graph.replay()

    def copy_out(self, state: GateState) -> None:
        n = self.n_real
        for f in dataclasses.fields(GateState):
            if f.name not in _SHARED:
                getattr(state, f.name).copy_(getattr(self.state, f.name)[:n])

    @staticmethod
    def _key(kind, rows, params, sides, state, *extra):
        return (kind, rows, params, tuple(s.name for s in sides), state.out_tokens.shape[1],
                state.stop_ids.shape[1], state.word_start.shape[0], *extra)


class GraphStep(_Captured):
    """One decode step of every model in play plus the fused gate, as one graph."""

    def __init__(self, sides, state: GateState, params, rows: int):
        from .decode import decode_forward

        super().__init__(sides, state, rows)
        base, nudger = self.sides.get("base"), self.sides.get("nudger")

        def step():
            bl = decode_forward(base) if base else None
            nl = decode_forward(nudger) if nudger else None
            nudge_step(bl, nl, self.state, params, base and base.cursor, nudger and nudger.cursor)

        self._capture(step)

    @classmethod
    def get(cls, engine, sides, state: GateState, params) -> "GraphStep":
        rows = bucket_for(state.seed.shape[0])
        key = cls._key("step", rows, params, sides, state)
        runner = engine._graphs.get(key)
        if runner is None:
            runner = engine._graphs[key] = cls(sides, state, params, rows)
        runner.load(sides, state)
        return runner


class GraphRound(_Captured):
    """One speculative round (K draft steps, the verify forward, the accept kernel) as one graph."""

    def __init__(self, engine, sides, state: GateState, params, K: int, stats, rows: int):
        from .kernels.spec_accept import SpecStats
        from .speculative import SpeculativeRound

        super().__init__(sides, state, rows)
        self.stats = SpecStats(**{f.name: _rows_like(getattr(stats, f.name), rows, 0)
                                  for f in dataclasses.fields(SpecStats)})
        self.round = SpeculativeRound(engine, self.sides["base"], self.sides["nudger"], self.state, params, K,
                                      self.stats)
        self._capture(self.round.run)

    @classmethod
    def get(cls, engine, sides, state: GateState, params, K: int, stats) -> "GraphRound":
        rows = bucket_for(state.seed.shape[0])
        key = cls._key("round", rows, params, sides, state, K)
        runner = engine._graphs.get(key)
        if runner is None:
            runner = engine._graphs[key] = cls(engine, sides, state, params, K, stats, rows)
        runner.load(sides, state)
        n = runner.n_real
        for f in dataclasses.fields(stats):
            getattr(runner.stats, f.name)[:n].copy_(getattr(stats, f.name))
        return runner

    def copy_out(self, state: GateState, stats=None) -> None:
        super().copy_out(state)
        if stats is not None:
            for f in dataclasses.fields(stats):
                getattr(stats, f.name).copy_(getattr(self.stats, f.name)[:self.n_real])
