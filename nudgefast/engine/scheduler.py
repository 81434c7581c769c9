"""Who runs, and on which pages.

- waiting: a FIFO queue; a preempted request goes back in arrival order ahead of newer ones.
- admission: the oldest waiting request is admitted when a running slot is free (max_running) and
  the pools have the pages for its prefix and its first round; otherwise it waits (no skipping, so a
  large request is not starved by small ones).
- growth: before each round every running request gets the pages that round can write; when a pool
  runs short, the youngest running request is preempted (its pages freed; it is re-prefilled later
  from its prompt and what it already wrote, so its output does not change).
- prefill: admitted requests are prefilled in chunks within a token budget per step, so a long
  prompt or a burst of arrivals never makes one step's activations larger than the budget.
Pages live here and in the requests; the runner only reads block tables.
"""
from __future__ import annotations

import bisect
from collections import deque

from ..kv_cache import KVPool
from .request import Request, Status


class Scheduler:
    def __init__(self, pools: dict[str, KVPool], max_running: int, prefill_budget: int):
        self.pools = pools
        self.max_running = max_running
        self.prefill_budget = prefill_budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []     # admitted, arrival order (prefilling or decoding)
        self.prefilled: dict[str, dict[str, int]] = {}  # request id -> model -> prefix tokens with KV
        self.preempted_total = 0

    # ---- queues ------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def requeue(self, req: Request) -> None:
        """A preempted request waits again, ahead of every request that arrived after it."""
        arrivals = [r.arrival for r in self.waiting]
        self.waiting.insert(bisect.bisect_left(arrivals, req.arrival), req)

    def remove(self, req: Request) -> None:
        """The request leaves (finished or aborted): its pages return to the pools."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.release(req)

    def release(self, req: Request) -> None:
        for m, pages in req.pages.items():
            self.pools[m].allocator.free(pages)
        req.pages = {}
        self.prefilled.pop(req.id, None)

    # ---- pages -------------------------------------------------------------------------------
    def pages_short(self, needs: dict[str, int]) -> bool:
        return any(n > self.pools[m].allocator.num_free for m, n in needs.items())

    def grow(self, req: Request, target: dict[str, int], preempt) -> bool:
        """Give `req` at least target[m] pages per model, preempting the youngest other running
        requests while a pool is short. Returns False when `req` itself had to be preempted."""
        while True:
            needs = {m: max(0, n - len(req.pages.get(m, []))) for m, n in target.items()}
            if not self.pages_short(needs):
                break
            victims = [r for r in self.running if r is not req and r.arrival > req.arrival]
            victim = max(victims, key=lambda r: r.arrival) if victims else req
            preempt(victim)
            if victim is req:
                return False
        for m, n in needs.items():
            if n:
                req.pages.setdefault(m, []).extend(self.pools[m].allocator.allocate(n, what=f"request {req.id}"))
        return True

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.release(req)
        req.status = Status.WAITING
        req.preemptions += 1
        self.preempted_total += 1
        self.requeue(req)

    # ---- admission and prefill ---------------------------------------------------------------
    def admit(self, first_need) -> list[Request]:
        """Admit waiting requests in order while slots and pages allow; first_need(req) gives the
        pages per model the request needs to start. Returns the admitted requests."""
        admitted = []
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            need = first_need(req)
            if self.pages_short(need):
                break
            self.waiting.popleft()
            for m, n in need.items():
                req.pages[m] = self.pools[m].allocator.allocate(n, what=f"request {req.id}")
            req.status = Status.RUNNING
            self.running.append(req)
            self.prefilled[req.id] = {m: 0 for m in need}
            admitted.append(req)
        return admitted

    def prefill_chunks(self, prefix_len) -> tuple[dict[str, list], list[Request]]:
        """Chunks for this step within the token budget, oldest request first: (model -> [(request,
        start, end)], requests whose prefill completes with these chunks)."""
        budget = self.prefill_budget
        chunks: dict[str, list] = {}
        done = []
        for req in self.running:
            state = self.prefilled.get(req.id)
            if state is None:
                continue
            complete = True
            for m, have in state.items():
                total = prefix_len(req, m)
                if have >= total:
                    continue
                take = min(total - have, budget)
                if take > 0:
                    chunks.setdefault(m, []).append((req, have, have + take))
                    state[m] = have + take
                    budget -= take
                if state[m] < total:
                    complete = False
            if complete:
                done.append(req)
                del self.prefilled[req.id]
            if budget <= 0:
                break
        return chunks, done
