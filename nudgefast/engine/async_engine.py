"""AsyncNudgingEngine: the request-level engine behind asyncio, for servers.

One background task drives engine.step() in a worker thread (a step is seconds of compute on a
CPU; the event loop must keep serving meanwhile) and hands every RequestOutput to the queue of its
stream. The engine is not thread-safe, so every call into it (add, abort, step) holds one lock; a
coroutine waits for that lock in a thread too, never blocking the loop. A consumer that stops
listening (cancelled, closed, the client gone) aborts its request: its pages return to the pools
at the next step.
"""
from __future__ import annotations

import asyncio
import threading
import uuid

from ..params import Completion, NudgeConfig, RequestOutput


class AsyncNudgingEngine:
    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # ---- calls into the engine (one at a time) ------------------------------------------------
    def _add(self, **kw) -> str:
        with self._lock:
            return self.engine.add_request(**kw)

    def _step(self) -> list[RequestOutput]:
        with self._lock:
            return self.engine.step()

    def _abort(self, request_id: str) -> None:
        with self._lock:
            try:
                self.engine.abort(request_id)
            except ValueError:
                pass  # already finished and forgotten

    # ---- public ------------------------------------------------------------------------------
    async def stream(self, prompt: str | None = None, config: NudgeConfig | None = None, *,
                     base_ids: list[int] | None = None, nudger_ids: list[int] | None = None,
                     system_prompt: str = "", answer_prefix: str = "", request_id: str | None = None):
        """Yield the request's RequestOutput deltas; the last has finished=True. A bad request
        raises here before anything is yielded; leaving the loop early aborts the request."""
        if self._closed:
            raise RuntimeError("AsyncNudgingEngine is closed")
        self._loop = asyncio.get_running_loop()
        rid = request_id if request_id is not None else uuid.uuid4().hex
        if rid in self._queues:
            raise ValueError(f"request id {rid!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue  # before the add: the driver may produce output at once
        finished = False
        try:
            await asyncio.to_thread(self._add, prompt=prompt, base_ids=base_ids, nudger_ids=nudger_ids, config=config,
                                    system_prompt=system_prompt, answer_prefix=answer_prefix, request_id=rid)
        except BaseException:
            self._queues.pop(rid, None)
            raise
        self._kick()
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                await asyncio.to_thread(self._abort, rid)
                self._kick()

    async def generate(self, prompt: str | None = None, config: NudgeConfig | None = None, **kw) -> Completion:
        """The whole answer of one request (its final Completion)."""
        completion = None
        async for out in self.stream(prompt, config, **kw):
            if out.finished:
                completion = out.completion
        if completion is None:
            raise RuntimeError("the request was aborted")
        return completion

    def abort(self, request_id: str) -> None:
        """Stop a request (its stream ends with finish_reason 'abort'). Safe from any thread."""
        self._abort(request_id)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._kick()
        else:  # a worker thread: wake the driver on its own loop
            loop.call_soon_threadsafe(self._kick)

    async def close(self) -> None:
        """Stop the driver; every request still running is aborted and its stream ends."""
        self._closed = True
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except (asyncio.CancelledError, Exception):
                pass
            self._driver = None
        with self._lock:
            for rid in list(self.engine.requests):
                self.engine.abort(rid)
            while self.engine.has_unfinished():
                self.engine.step()
        for q in self._queues.values():
            q.put_nowait(RuntimeError("AsyncNudgingEngine closed"))

    # ---- the driver --------------------------------------------------------------------------
    def _kick(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())

    async def _drive(self) -> None:
        while not self._closed:
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outs = await asyncio.to_thread(self._step)
            except Exception as e:  # an engine failure ends every stream with it; the driver goes on
                for q in self._queues.values():
                    q.put_nowait(e)
                with self._lock:
                    for rid in list(self.engine.requests):
                        self.engine.abort(rid)
                continue
            for out in outs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
