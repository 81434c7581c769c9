"""The request-level engine: add_request / step / abort over the scheduler and the runner.

A request flows add_request (validated at once) -> waiting -> admitted (pages for its prefix) ->
prefilled in chunks -> a row of its group's batch -> one decode round per step -> finished, its
pages back in the pools. step() returns the deltas of every request that produced something.
"""
from __future__ import annotations

import itertools
import os
import uuid

import torch

from ..kv_cache import RequestTooLarge
from ..params import MAX_STOP_IDS, Completion, NudgeConfig, RequestOutput
from ..runner.batch import RowInit
from ..runner.crossvocab import CrossVocabRunner, check_crossvocab_config, crossvocab_slack, crossvocab_stop_ids
from ..runner.runner import MODELS_OF, ModelRunner, group_key
from .request import Request, Status
from .scheduler import Scheduler


def row_seeds(seed: int | None, n: int) -> list[int]:
    """Distinct, decorrelated sampler seeds for rows 0..n-1 of one config (the RNG hashes them further)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 2
    return [(seed * 0x9E3779B1 + r * 0x85EBCA77) % (1 << 62) for r in range(n)]


def validate_prompt(model: str, p, vocab: int, max_ctx: int, max_new: int, row: int | None = None) -> None:
    name = f"{model} prompt" if row is None else f"{model} prompt {row}"
    if not isinstance(p, (list, tuple)) or not all(type(t) is int for t in p):
        raise TypeError(f"{name} must be a list of ints")
    if len(p) == 0:
        raise ValueError(f"{name} is empty")
    bad = [t for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{name} has token ids outside the model's vocabulary [0, {vocab}): {bad[:5]}")
    if len(p) + max_new > max_ctx:
        raise ValueError(f"{name} has {len(p)} tokens; with max_new_tokens={max_new} it exceeds the "
                         f"model's context of {max_ctx} positions")


class RequestEngine:
    """The request-level half of NudgingEngine (api.py loads the models and builds prompts).

    Subclasses provide: self.device, self.backend, self.base / self.nudger (LoadedModel or None),
    self.flag_interval, self.cuda_graphs, self.sync_debug, self.lazy (the runner's lazy schedule of
    shared-vocabulary nudging, runner/lazy.py), and call _init_requests()."""

    def _init_requests(self, max_running: int, prefill_budget: int) -> None:
        if type(max_running) is not int or max_running < 1:
            raise ValueError(f"max_running={max_running!r} must be an int >= 1")
        if type(prefill_budget) is not int or prefill_budget < 1:
            raise ValueError(f"prefill_budget={prefill_budget!r} must be an int >= 1")
        self.models = {m: lm for m, lm in (("base", self.base), ("nudger", self.nudger)) if lm is not None}
        self.scheduler = Scheduler({m: lm.kv for m, lm in self.models.items()}, max_running, prefill_budget)
        self.runner = ModelRunner(self.models, self.device, self.backend.kind, self.flag_interval,
                                  self.cuda_graphs, self.sync_debug, self._word_start_table(), lazy=self.lazy)
        self.crossvocab_runner = CrossVocabRunner(self) if self.cross_vocabulary else None
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._counts = {"finished": 0, "aborted": 0}

    def _word_start_table(self) -> torch.Tensor:
        size = max(lm.spec.vocab_size for lm in self.models.values())
        tok = (self.nudger and self.nudger.tokenizer) or (self.base and self.base.tokenizer)
        return tok.word_start_table(size) if tok is not None else torch.zeros(size, dtype=torch.bool)

    # ---- the contract ------------------------------------------------------------------------
    def add_request(self, prompt: str | None = None, *, base_ids: list[int] | None = None,
                    nudger_ids: list[int] | None = None, config: NudgeConfig | None = None,
                    system_prompt: str = "", answer_prefix: str = "", request_id: str | None = None) -> str:
        """Queue one request; every check happens here, and a rejected request changes nothing."""
        req = self._build_request(prompt, base_ids, nudger_ids, config, system_prompt, answer_prefix, request_id)
        self.requests[req.id] = req
        self.scheduler.add(req)
        return req.id

    def abort(self, request_id: str) -> None:
        """The request stops at the next step; its pages return to the pools then."""
        req = self.requests.get(request_id)
        if req is None:
            raise ValueError(f"abort: unknown request id {request_id!r} (finished requests are forgotten once "
                             "their last output was returned)")
        req.abort_requested = True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def kv_usage(self) -> dict:
        return {m: {"used": lm.kv.allocator.num_used, "total": lm.kv.num_pages} for m, lm in self.models.items()}

    def counts(self) -> dict:
        s = self.scheduler
        return {"running": len(s.running), "waiting": len(s.waiting), "finished": self._counts["finished"],
                "aborted": self._counts["aborted"], "preempted": s.preempted_total}

    def stop_ids_for(self, config: NudgeConfig) -> list[int]:
        """The stop ids a shared-vocabulary request with this config runs with."""
        return self._stop_ids(config, MODELS_OF[config.mode])

    def word_start_for(self, config: NudgeConfig) -> torch.Tensor:
        """The word-start table the rule reads for this config (all False unless word-level nudging)."""
        table = self.runner.word_start
        return table.clone() if config.mode == "nudging" and config.granularity == "word" else torch.zeros_like(table)

    def step(self) -> list[RequestOutput]:
        """One scheduling round: aborts, page growth (preempting if short), admission, prefill
        chunks, one decode round per group, retirement. Returns the deltas."""
        with torch.inference_mode():
            for req in [r for r in self.requests.values() if r.abort_requested and not r.finished]:
                self._retire(req, Status.ABORTED, "abort")
            self._grow_running()
            admitted = self.scheduler.admit(self._first_need)
            for req in admitted:
                if req.kind == "crossvocab":
                    self.crossvocab_runner.admit(req)
            chunks, ready = self.scheduler.prefill_chunks(self._prefix_len)
            for m, items in chunks.items():
                self.runner.prefill(m, [(self._prefix(r, m)[a:b], a, r.pages[m]) for r, a, b in items])
            ready = [r for r in ready if r.kind != "crossvocab"]
            self.runner.add(ready, [self._row_init(r) for r in ready])
            for g in list(self.runner.groups.values()):
                if len(g.batch):
                    # no more steps than the longest remaining answer needs (each step or round
                    # emits at least one token per running row); one step when a row has not yet
                    # written anything, so its first token streams out right after its prefill
                    left = max(r.config.max_new_tokens - len(r.tokens) for r in g.batch.requests)
                    fresh = any(not r.tokens for r in g.batch.requests)
                    steps = 1 if fresh else min(self.runner.steps_per_round(g.K), left)
                    self.runner.run_round(g, max(1, steps))
                    for req in self.runner.collect(g):
                        self._retire(req, Status.FINISHED, req.finish_reason)
            if self.crossvocab_runner is not None:
                for req in self.crossvocab_runner.run_round():
                    self._retire(req, Status.FINISHED, req.finish_reason)
        # every request says what is new (waiting ones: nothing); finished ones leave after saying it
        outputs = []
        for req in list(self.requests.values()):
            out = req.delta()
            if out is not None:
                outputs.append(out)
            if req.finished:
                del self.requests[req.id]
        return outputs

    # ---- internals ---------------------------------------------------------------------------

    def _retire(self, req: Request, status: Status, reason: str) -> None:
        """A request ends: leave the runner, free its pages, count it."""
        if req.finished:
            return
        if req.kind == "crossvocab":
            self.crossvocab_runner.remove(req)
        else:
            self._fold_spec_stats(req)
            self.runner.remove({req})
        self.scheduler.remove(req)
        req.status, req.finish_reason = status, reason
        self._counts["finished" if status == Status.FINISHED else "aborted"] += 1

    def _fold_spec_stats(self, req: Request) -> None:
        c = req.spec_counters
        if c:
            acc = req.row_stats
            for k in ("rounds", "drafted", "accepted"):
                acc[k] = acc.get(k, 0) + c[k]
            acc["emitted_in_rounds"] = acc.get("emitted_in_rounds", 0) + c["emitted"]
            acc["speculate"] = req.config.speculate
            acc["acceptance_rate"] = acc["accepted"] / acc["drafted"] if acc["drafted"] else 0.0
            acc["tokens_per_round"] = acc["emitted_in_rounds"] / acc["rounds"] if acc["rounds"] else 0.0
            req.spec_counters = None

    def _preempt(self, req: Request) -> None:
        if req.kind == "crossvocab":
            self.crossvocab_runner.remove(req, keep_state=True)
        elif self.scheduler.prefilled.get(req.id) is None:  # decoding: its rule state goes with it
            loc = self.runner.locate(req)
            if loc is not None:
                g, i = loc
                req.snapshot = g.batch.row_snapshot(i)
                self._fold_spec_stats(req)
                self.runner.remove({req})
        self.scheduler.preempt(req)

    def _target_pages(self, req: Request, ahead: int) -> dict[str, int]:
        """Pages per model for the request's KV up to `ahead` positions past what it has now."""
        K = req.config.speculate if req.kind == "speculative" else 0
        out = {}
        for m in req.models:
            lm = self.models[m]
            have = len(req.prompts[m]) + len(req.tokens)
            cap = len(req.prompts[m]) + req.config.max_new_tokens + K + 2
            out[m] = lm.kv.pages_for(min(have + ahead, cap))
        return out

    def _grow_running(self) -> None:
        for req in list(self.scheduler.running):
            if req.status != Status.RUNNING or req.kind == "crossvocab":
                continue
            K = req.config.speculate if req.kind == "speculative" else 0
            before = {m: len(req.pages.get(m, [])) for m in req.models}
            if not self.scheduler.grow(req, self._target_pages(req, self.runner.positions_per_round(K)),
                                       self._preempt):
                continue
            loc = self.runner.locate(req)
            if loc is not None:
                g, i = loc
                for m in req.models:
                    if len(req.pages[m]) != before[m]:
                        g.batch.set_pages(i, m, req.pages[m])

    def _first_need(self, req: Request) -> dict[str, int]:
        if req.kind == "crossvocab":
            return {m: self.models[m].kv.pages_for(len(req.crossvocab_row.tracks[m].ids) + 16) for m in req.models}
        K = req.config.speculate if req.kind == "speculative" else 0
        return self._target_pages(req, self.runner.positions_per_round(K))

    def _prefix(self, req: Request, m: str) -> list[int]:
        """What a row prefills before it joins a batch: prompt + emitted tokens, all but the last
        (the cursor's token, which the first decode step computes)."""
        return (req.prompts[m] + req.tokens)[:-1]

    def _prefix_len(self, req: Request, m: str) -> int:
        if req.kind == "crossvocab":
            return 0  # the text-level path prefills inside its own forwards
        return len(req.prompts[m]) + len(req.tokens) - 1

    def _row_init(self, req: Request) -> RowInit:
        snap = req.snapshot or {}
        req.snapshot = None
        return RowInit(ids={m: req.prompts[m] + req.tokens for m in req.models}, pages=req.pages, seed=req.seed,
                       config=req.config, stop_ids=req.stop_ids, n_out=len(req.tokens),
                       n_nudged=sum(req.from_nudger), word_state=snap.get("word_state", 0),
                       span=snap.get("span", 0))

    def _stop_ids(self, config: NudgeConfig, models: tuple[str, ...]) -> list[int]:
        """The user's stop ids, else the union of the EOS ids of the models in play and the nudger's
        end-of-turn token when its vocabulary has one (DESIGN section 1)."""
        if config.stop_token_ids is not None:
            return sorted(set(config.stop_token_ids))
        ids: set[int] = set()
        for m in models:
            ids.update(self.models[m].eos_ids)
        nudger = self.nudger
        if "nudger" in models and nudger.tokenizer is not None:
            eot = nudger.tokenizer.end_of_turn_id()
            if eot is not None:
                ids.add(eot)
        return sorted(ids)

    def _build_request(self, prompt, base_ids, nudger_ids, config, system_prompt, answer_prefix, request_id,
                       row: int | None = None) -> Request:
        """A validated Request (nothing registered yet). `row`: the row of a generate_ids batch (its
        sampler seed is that row's, and errors name it)."""
        config = NudgeConfig() if config is None else config
        if not isinstance(config, NudgeConfig):
            raise TypeError(f"config must be a NudgeConfig, got {type(config).__name__}")
        if request_id is None:
            request_id = uuid.uuid4().hex
        if not isinstance(request_id, str) or not request_id:
            raise TypeError(f"request_id must be a non-empty str, got {request_id!r}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        models = MODELS_OF[config.mode]
        for m in models:
            if getattr(self, m) is None:
                raise ValueError(f"mode={config.mode!r} needs a {m} model; the engine was built without one")
        crossvocab = config.mode == "nudging" and self.cross_vocabulary
        if config.speculate and config.mode != "nudging":
            raise ValueError(f"speculate={config.speculate} needs mode='nudging' (the nudger drafts for the base model)")
        if crossvocab:
            check_crossvocab_config(config)
        if prompt is not None:
            if base_ids is not None or nudger_ids is not None:
                raise ValueError("give either prompt (text) or base_ids / nudger_ids (token ids), not both")
            from ..prompts import build_prompts

            b, n = build_prompts(self, [prompt], config, system_prompt, answer_prefix)
            base_ids, nudger_ids = (b[0] if b else None), (n[0] if n else None)
        prompts = {"base": base_ids, "nudger": nudger_ids}
        for m in models:
            if prompts[m] is None:
                raise ValueError(f"mode={config.mode!r} needs {m}_ids (or a text prompt)")
            lm = self.models[m]
            validate_prompt(m, prompts[m], lm.spec.vocab_size, lm.spec.max_position_embeddings, config.max_new_tokens,
                            row)
        if config.granularity == "word" and config.mode == "nudging" and not crossvocab:
            if all(getattr(self, m).tokenizer is None for m in models):
                raise ValueError("granularity='word' needs a tokenizer.json (word starts come from token strings)")
        kind = "crossvocab" if crossvocab else ("speculative" if config.speculate else "plain")
        K = config.speculate
        for m in models:
            pool = self.models[m].kv
            extra = crossvocab_slack(config.max_new_tokens) if crossvocab else K + 2
            need = pool.pages_for(len(prompts[m]) + config.max_new_tokens + extra)
            if need > pool.num_pages:
                raise RequestTooLarge(
                    f"request needs up to {need} KV pages of the {m} model but its whole pool has {pool.num_pages}: "
                    f"use a shorter prompt or max_new_tokens, or a larger kv_cache_tokens")
        tok = (self.nudger.tokenizer if "nudger" in models else None) or (self.base.tokenizer if "base" in models
                                                                          else None)
        stop_ids = [] if crossvocab else self._stop_ids(config, models)
        if len(stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"{len(stop_ids)} stop ids; at most {MAX_STOP_IDS}")
        req = Request(id=request_id, config=config, arrival=next(self._arrivals), kind=kind, models=models,
                      prompts={m: list(prompts[m]) for m in models}, seed=row_seeds(config.seed, (row or 0) + 1)[row or 0],
                      stop_ids=stop_ids, tokenizer=tok)
        if crossvocab:
            self.crossvocab_runner.attach(req, crossvocab_stop_ids(self, config))
        return req

    def _run_to_completion(self, ids: list[str]) -> list[Completion]:
        """Step until these requests have finished; their Completions in order."""
        done: dict[str, Completion] = {}
        want = set(ids)
        while want - done.keys():
            for out in self.step():
                if out.finished and out.request_id in want:
                    done[out.request_id] = out.completion
        return [done[i] for i in ids]
