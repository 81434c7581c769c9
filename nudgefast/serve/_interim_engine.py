"""TEMPORARY stand-in for nf.AsyncNudgingEngine (issue 11, /work/notes/ENGINE_API.md) until the
request-level engine lands on main; REMOVE it then (app.py picks the real engine when it exists).

Built over today's NudgingEngine.generate_ids: one request at a time in a worker thread, the whole
answer computed, then handed out as RequestOutput deltas (one per run of one writer). It keeps the
contract's surface (stream / abort / close / engine.kv_usage / engine.counts) so the server code is
the final one; it does not give real streaming latency or batching.
"""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list
    from_nudger: list
    text: str
    pieces: list
    finished: bool
    finish_reason: str | None
    completion: object = None


class _EngineView:
    """The NudgingEngine, plus the contract's kv_usage() and counts()."""

    def __init__(self, engine, owner):
        self._engine, self._owner = engine, owner

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def kv_usage(self) -> dict:
        out = {}
        for name in ("base", "nudger"):
            m = getattr(self._engine, name)
            if m is not None:
                alloc = m.kv.allocator
                out[name] = {"used": alloc.num_pages - alloc.num_free, "total": alloc.num_pages}
        return out

    def counts(self) -> dict:
        return dict(self._owner._counts, waiting=len(self._owner._queue))


class InterimAsyncEngine:
    def __init__(self, engine):
        self.engine = _EngineView(engine, self)
        self._queue: list = []
        self._counts = {"running": 0, "waiting": 0, "finished": 0, "aborted": 0, "preempted": 0}
        self._wake = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._run())
        self._ids = itertools.count()
        self._closed = False

    async def _run(self):
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            job = self._queue.pop(0)
            if job["fut"].cancelled():
                continue
            self._counts["running"] = 1
            try:
                res = await asyncio.to_thread(self._generate, job)
                if not job["fut"].done():
                    job["fut"].set_result(res)
            except Exception as e:  # noqa: BLE001 -- handed to the request's consumer
                if not job["fut"].done():
                    job["fut"].set_exception(e)
            finally:
                self._counts["running"] = 0

    def _generate(self, job):
        e = self.engine._engine
        if job["prompt"] is not None:
            return e.generate([job["prompt"]], job["config"], system_prompt=job["system_prompt"],
                              answer_prefix=job["answer_prefix"])[0]
        b, n = job["base_ids"], job["nudger_ids"]
        return e.generate_ids([b] if b is not None else None, [n] if n is not None else None, job["config"])[0]

    def _pieces(self, c):
        spans = c.stats.get("spans")
        if spans is not None:
            return [(c.text[a:b], nudged) for a, b, nudged in spans]
        tok = (self.engine.nudger or self.engine.base).tokenizer
        ids, flags = c.token_ids, c.from_nudger
        cuts = [i for i in range(1, len(flags)) if flags[i] != flags[i - 1]] + [len(flags)]
        out, prev, start = [], "", 0
        for cut in cuts if ids else []:
            text = tok.decode(ids[:cut])
            out.append((text[len(prev):], flags[start], ids[start:cut], flags[start:cut]))
            prev, start = text, cut
        return out

    async def stream(self, prompt=None, config=None, *, base_ids=None, nudger_ids=None, system_prompt="",
                     answer_prefix="", request_id=None):
        if self._closed:
            raise RuntimeError("the engine is closed")
        rid = request_id or f"req-{next(self._ids)}"
        fut = asyncio.get_running_loop().create_future()
        self._queue.append({"fut": fut, "prompt": prompt, "config": config, "base_ids": base_ids,
                            "nudger_ids": nudger_ids, "system_prompt": system_prompt, "answer_prefix": answer_prefix})
        self._wake.set()
        done = False
        try:
            c = await fut
            pieces = self._pieces(c)
            if pieces and len(pieces[0]) == 2:  # cross-vocabulary spans: tokens go with the last delta
                pieces = [(t, f, [], []) for t, f in pieces]
                pieces[-1] = (pieces[-1][0], pieces[-1][1], list(c.token_ids), list(c.from_nudger))
            for i, (text, nudged, ids, flags) in enumerate(pieces):
                last = i == len(pieces) - 1
                done = last
                yield RequestOutput(rid, ids, flags, text, [(text, nudged)], last, c.finish_reason if last else None,
                                    c if last else None)
                await asyncio.sleep(0)
            if not pieces:
                done = True
                yield RequestOutput(rid, [], [], "", [], True, c.finish_reason, c)
        finally:
            if done:
                self._counts["finished"] += 1
            else:
                fut.cancel()
                self._queue[:] = [j for j in self._queue if j["fut"] is not fut]
                self._counts["aborted"] += 1

    def abort(self, request_id) -> None:
        pass  # a closed consumer already aborted in stream()'s finally

    async def close(self):
        self._closed = True
        self._worker.cancel()
