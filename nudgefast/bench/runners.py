"""Prompts, the step clock and the runners of `nudgefast bench`: nudgefast and the transformers
anchors, each returning one RunRecord per run."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import sys
import time
import warnings

import torch

from ..api import NudgeConfig, NudgingEngine
from ..blocks import gguf_source
from ..config import ConfigError
from ..model import Transformer
from .presets import Models, SyntheticTokenizer
from .report import REPO_ROOT


# ---- Prompts -------------------------------------------------------------------------------------
PASSAGE = (
    "Studying well is less about the number of hours spent at a desk than about how those hours are used. "
    "Attention drifts after a while, so short sessions with a clear goal tend to beat long sessions without one. "
    "A quiet place, a phone left in another room and a written list of what to finish all help. Testing yourself "
    "on the material, rather than rereading it, shows what you actually remember and what you only recognise. "
    "Sleep matters as well: memories are consolidated at night, and a tired mind learns slowly the next day. "
    "Regular breaks, a glass of water and a short walk restore focus more than a cup of coffee does. Spacing the "
    "review of a topic over several days works better than cramming it into one evening, because each return to "
    "the material strengthens it. Explaining an idea to a friend, or to an empty chair, reveals the gaps in it. "
)
QUESTIONS = ["What are three tips for staying focused while studying?", "Why does sleep help learning?",
             "How should I plan a week of revision?", "What is the benefit of testing yourself?"]
SYSTEM = "Answer the question helpfully and concisely."


def make_prompts(models: Models, batch: int, prompt_len: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(base_prompts, nudger_prompts), one row per sequence. With real tokenizers: the base prompt
    is exactly prompt_len tokens (the head of a passage, then a question, as plain text); the
    nudger gets the same passage and question in its chat template. Without: random token ids."""
    engine = models.engine
    sides = [s for s in (engine.base, engine.nudger) if s is not None]
    tok = sides[0].tokenizer
    if tok is None or isinstance(tok, SyntheticTokenizer):
        gen = torch.Generator().manual_seed(seed)
        vocab = min(s.spec.vocab_size for s in sides)
        rows = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
        return rows, [list(r) for r in rows]
    base_rows, nudger_rows = [], []
    passage = tok.encode(PASSAGE * (1 + prompt_len // 100), add_special_tokens=False)
    specials = tok.encode("", add_special_tokens=True)  # the BOS the base tokenizer adds, if any
    for r in range(batch):
        question = QUESTIONS[r % len(QUESTIONS)]
        tail = tok.encode(f"\n{question}\n", add_special_tokens=False)
        if len(tail) > prompt_len // 2:  # a very short prompt (or a tiny tokenizer): the passage alone
            question, tail = "", []
        keep = prompt_len - len(tail) - len(specials)
        head = passage[r:r + keep]  # rows start at different offsets so no two rows are identical
        base_rows.append(specials + head + tail)
        ntok = (engine.nudger or engine.base).tokenizer
        context = tok.decode(head)
        nudger_rows.append(ntok.encode(ntok.render_chat(SYSTEM, f"{context}\n\n{question}".strip(), "")
                                       if ntok.chat_template else f"{context}\n{question}\n",
                                       add_special_tokens=not ntok.chat_template))
    return base_rows, nudger_rows


# ---- Timing: a clock on the decode loop that adds no host synchronization ------------------------
class StepClock:
    """Timestamps of the decode loop's steps without extra host syncs: on the CPU perf_counter() at
    the end of each gate step, driver-model forward and CUDA-graph replay; on CUDA an event recorded
    on the stream at the same points (a few microseconds each), read after the run. Installed for
    one run on the engine's own seams: its runner's gate kernel (runner.kernels.gate), the driver
    model's forward (instance attributes) and torch.cuda.CUDAGraph.replay."""

    def __init__(self, engine: NudgingEngine):
        self.engine = engine
        self.cuda = engine.device.type == "cuda"
        self.marks = {"gate": [], "forward": [], "replay": [], "emit": []}
        self._start = None

    def restart(self) -> None:
        self._start = self._mark()

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _wrap(self, fn, kind):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            if not (self.cuda and torch.cuda.is_current_stream_capturing()):  # never inside a graph capture
                self.marks[kind].append(self._mark())
            return out
        return wrapped

    @contextlib.contextmanager
    def installed(self, driver: Transformer):
        from ..runner.lazy import LazyBatch

        kernels = self.engine.runner.kernels
        saved_gate = kernels.gate
        kernels.gate = self._wrap(saved_gate, "gate")
        saved_emit = LazyBatch._emit  # the lazy schedule has no gate step: each row's emissions are marked

        def emit(batch, row, *a):
            saved_emit(batch, row, *a)
            self.marks["emit"].append((id(row), self._mark()))
        LazyBatch._emit = emit
        # a Transformer, or a tensor-parallel ShardedModel, whose plain decode step runs its own gate
        driver.forward = self._wrap(type(driver).forward.__get__(driver), "forward")
        sharded_gate = getattr(type(driver), "decode_and_gate", None)
        if sharded_gate is not None:
            driver.decode_and_gate = self._wrap(sharded_gate.__get__(driver), "gate")
        saved_replay = torch.cuda.CUDAGraph.replay if self.cuda else None
        if self.cuda:
            torch.cuda.CUDAGraph.replay = self._wrap(saved_replay, "replay")
        self._start = self._mark()
        try:
            yield self
        finally:
            kernels.gate = saved_gate
            LazyBatch._emit = saved_emit
            del driver.forward
            if sharded_gate is not None:
                del driver.decode_and_gate
            if self.cuda:
                torch.cuda.CUDAGraph.replay = saved_replay

    def row_seconds(self) -> list[list[float]]:
        """The lazy schedule's emission marks, per row (seconds since the start of the run)."""
        rows: dict = {}
        for key, t in self.marks["emit"]:
            rows.setdefault(key, []).append(t)
        start = self._start
        if self.cuda:
            torch.cuda.synchronize()
            return [[start.elapsed_time(e) / 1e3 for e in ts] for ts in rows.values()]
        return [[t - start for t in ts] for ts in rows.values()]

    def seconds(self, kind) -> list[float]:
        """Seconds since the start of the run, for each mark of `kind`."""
        if self.cuda:
            torch.cuda.synchronize()
            return [self._start.elapsed_time(e) / 1e3 for e in self.marks[kind]]
        return [t - self._start for t in self.marks[kind]]


def percentiles(samples: list[float]) -> dict:
    if not samples:
        return {"p50": None, "p90": None, "p99": None, "n": 0}
    s = sorted(samples)

    def q(p):
        k = (len(s) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)
    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "n": len(s)}


@contextlib.contextmanager
def count_cuda_syncs(enabled: bool):
    """Counts the host synchronizations torch reports in sync-debug mode (CUDA only)."""
    box = {"count": None}
    if not enabled:
        yield box
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode("default")
    box["count"] = sum("synchroniz" in str(w.message) for w in caught)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- Runners: nudgefast and the anchors, each returning one RunRecord per run --------------------
@dataclasses.dataclass
class RunRecord:
    seconds: float
    token_ids: list[list[int]]
    from_nudger: list[list[bool]]
    finish: list[str]
    host_reads: float | None = None          # per emitted token of one sequence
    ttft: float | None = None
    latencies: list[float] | None = None     # seconds per token
    latency_source: str | None = None
    stats: list[dict] | None = None
    row_tokens: list[int] | None = None      # emitted tokens per row where they differ from token_ids
    cpu_seconds: float | None = None         # process CPU time of the run (CPU devices)
    forwards: dict | None = None             # model role -> forward calls in the run (anchors: counted)

    @property
    def tokens(self) -> int:
        return sum(self.row_tokens) if self.row_tokens is not None else sum(len(t) for t in self.token_ids)


class NudgefastRunner:
    """nudgefast on one engine (dense weights, or GGUF blocks: Models.engines)."""

    role = "ours"

    def __init__(self, models: Models, config: NudgeConfig, base_prompts, nudger_prompts, name: str = "nudgefast",
                 lazy: bool | None = None):
        self.name = name if lazy is None else f"{name}-{'lazy' if lazy else 'eager'}"
        self.lazy = lazy  # None: the engine's own schedule; else the runner's lazy switch for this runner's runs
        self.engine, self.config = models.engines[name], config
        self.weights = models.weights[name]
        self.base_prompts = base_prompts if config.mode != "nudger_only" else None
        self.nudger_prompts = nudger_prompts if config.mode != "base_only" else None
        self.crossvocab = config.mode == "nudging" and not same_vocabulary(self.engine)
        if self.crossvocab:
            from ..runner.crossvocab import check_crossvocab_config

            check_crossvocab_config(config)  # token granularity and speculation need one vocabulary
        self._generate = lambda: self.engine.generate_ids(self.base_prompts, self.nudger_prompts, config)

    def run(self, count_syncs: bool = False) -> RunRecord:
        engine, cfg = self.engine, self.config
        clock = StepClock(engine)
        driver = (engine.nudger if cfg.mode == "nudger_only" else engine.base).model
        _sync(engine.device)
        saved_lazy = engine.runner.lazy
        if self.lazy is not None:
            engine.runner.lazy = self.lazy
        try:
            with count_cuda_syncs(count_syncs) as syncs:
                with clock.installed(driver):
                    c0, t0 = time.process_time(), time.perf_counter()
                    clock.restart()  # the clock's origin after t0: a first-token time never exceeds the run's
                    outs = self._generate()
                    _sync(engine.device)
                    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        finally:
            engine.runner.lazy = saved_lazy
        rec = RunRecord(seconds, [o.token_ids for o in outs], [o.from_nudger for o in outs],
                        [o.finish_reason for o in outs], stats=[o.stats for o in outs], cpu_seconds=cpu_seconds)
        if not self.crossvocab and all("forwards" in o.stats for o in outs):  # the lazy schedule counts its forwards
            rec.forwards = {m: sum(o.stats["forwards"][m] for o in outs) for m in ("base", "nudger")}
        if self.crossvocab:  # max_new_tokens counts tokens emitted, each in its writer's vocabulary
            rec.row_tokens = [o.stats["emitted_tokens"] for o in outs]
        per_row = max(1, max(rec.row_tokens or [len(o.token_ids) for o in outs]))
        if syncs["count"] is not None:
            rec.host_reads = syncs["count"] / per_row
        elif not self.crossvocab:
            rec.host_reads = outs[0].stats.get("host_reads", 0) / per_row
        if self.crossvocab:
            rec.latency_source = "unavailable (the cross-vocabulary path has no fixed decode step)"
        else:
            self._latencies(rec, clock, outs)
        return rec

    def _latencies(self, rec: RunRecord, clock: StepClock, outs) -> None:
        gate = clock.seconds("gate")
        rows = [ts for ts in clock.row_seconds() if ts]
        if not gate and rows:
            # the lazy schedule has no shared step: position k is done when every row still running
            # has emitted its k-th token
            done = [max(ts[k] for ts in rows if k < len(ts)) for k in range(max(map(len, rows)))]
            rec.ttft = done[0]
            rec.latencies = [b - a for a, b in zip(done, done[1:])]
            rec.latency_source = "time between positions done by every row (lazy schedule)"
            return
        if not gate:
            rec.latency_source = "unavailable (no gate step observed)"
            return
        rec.ttft = gate[0]
        replay = clock.seconds("replay")
        if self.config.speculate:
            rounds = replay or [t for t in clock.seconds("forward") if t > gate[0]]
            periods = [b - a for a, b in zip([gate[0]] + rounds[:-1], rounds)]
            per_round = statistics.mean(o.stats.get("tokens_per_round", 1.0) or 1.0 for o in outs)
            rec.latencies = [p / per_round for p in periods]
            rec.latency_source = "speculative round time / mean tokens per round"
        else:
            steps = replay or gate[1:]
            rec.latencies = [b - a for a, b in zip([gate[0]] + steps[:-1], steps)]
            rec.latency_source = "decode step period" + (" (CUDA graph replays)" if replay else "")


class AnchorRunner:
    """One transformers anchor, batch 1. Every run counts the forward calls of each transformers
    model (a forward hook on the top-level module), which is what its bytes per token follow from."""

    role = "anchor"

    def __init__(self, name: str, models: Models, config: NudgeConfig, base_prompts, nudger_prompts, stop_ids,
                 word_start):
        self.name, self.models, self.config = name, models, config
        self.weights = {"format": "dense", "label": f"{models.dense_dtype} dense (transformers, model.safetensors)"}
        if name == "llamacpp":  # the GGUF file the models were converted from, in llama.cpp's own kernels
            self.weights = {"format": "gguf", "label": "GGUF file (llama.cpp; activations quantized to 8 bits)"}
        self.base_prompt, self.nudger_prompt = base_prompts[0], nudger_prompts[0]
        self.stop_ids, self.word_start = set(stop_ids), word_start

    def run(self, count_syncs: bool = False) -> RunRecord:
        anchors = load_anchors()
        cfg = self.config
        hf = self.models.load_hf() if self.name != "llamacpp" else {}  # llama.cpp: no transformers model
        device = self.models.engine.device
        _sync(device)
        forwards = dict.fromkeys(hf, 0)
        hooks = [m.register_forward_hook(lambda *_a, role=role: forwards.__setitem__(role, forwards[role] + 1))
                 for role, m in hf.items()]
        with count_cuda_syncs(count_syncs) as syncs, _removed_after(hooks):
            c0, t0 = time.process_time(), time.perf_counter()
            if self.name == "llamacpp":  # the same GGUF file, threads and prompt ids (benchmarks/anchors/llamacpp.py)
                side = "nudger" if cfg.mode == "nudger_only" else "base"
                prompt = self.nudger_prompt if side == "nudger" else self.base_prompt
                res = anchors.llamacpp.llamacpp_generate(gguf_source(getattr(self.models.engine, side).dir), prompt,
                                                         cfg, self.stop_ids, threads=torch.get_num_threads(),
                                                         from_nudger=side == "nudger")
            elif self.name == "hf_generate":
                side = "nudger" if cfg.mode == "nudger_only" else "base"
                prompt = self.nudger_prompt if side == "nudger" else self.base_prompt
                res = anchors.hf_generate(hf[side], prompt, cfg, self.stop_ids, from_nudger=side == "nudger")
            else:
                res = anchors.ANCHORS[self.name](hf["base"], hf["nudger"], self.base_prompt, self.nudger_prompt,
                                                 cfg, self.stop_ids, self.word_start)
            _sync(device)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        rec = RunRecord(seconds, [res.token_ids], [res.from_nudger], [res.finish_reason], cpu_seconds=cpu_seconds,
                        forwards={role: n for role, n in forwards.items() if n})
        n = max(1, len(res.token_ids))
        rec.host_reads = syncs["count"] / n if syncs["count"] is not None else (
            res.host_reads / n if res.host_reads is not None else None)
        if res.token_times:
            rec.ttft = res.token_times[0] - t0
            rec.latencies = [b - a for a, b in zip(res.token_times, res.token_times[1:])]
            rec.latency_source = "time between emitted tokens"
        return rec


def same_vocabulary(engine: NudgingEngine) -> bool:
    """Both models read the same ids (else nudging runs on text: nudgefast/crossvocab.py)."""
    b, n = engine.base, engine.nudger
    if b is None or n is None or b.tokenizer is None or n.tokenizer is None:
        return True
    return b.tokenizer.same_vocabulary(n.tokenizer)


def load_anchors():
    """benchmarks.anchors from the source checkout (the anchors are not part of the installed package)."""
    try:
        import benchmarks.anchors as anchors
    except ImportError:
        if not (REPO_ROOT / "benchmarks" / "anchors" / "__init__.py").is_file():
            raise ImportError("the transformers anchors live in the source checkout (benchmarks/anchors/); "
                              "run nudgefast bench from an editable install of the repository") from None
        sys.path.insert(0, str(REPO_ROOT))
        import benchmarks.anchors as anchors
    return anchors


def anchors_for(config: NudgeConfig) -> list[str]:
    if config.mode in ("base_only", "nudger_only"):
        return ["hf_generate"]
    return ["hf_nudging_token"] if config.granularity == "token" else ["hf_nudging_chunked"]


@contextlib.contextmanager
def _removed_after(hooks):
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def cpu_anchors(models: Models, config: NudgeConfig) -> list[str]:
    """["llamacpp"] where llama.cpp can decode the same thing: on the CPU, one model decoding
    (base_only, nudger_only), that model converted from a GGUF file, llama-cpp-python installed."""
    if models.engine.device.type != "cpu" or config.mode not in ("base_only", "nudger_only"):
        return []
    loaded = models.engine.nudger if config.mode == "nudger_only" else models.engine.base
    try:
        gguf_source(loaded.dir)
    except ConfigError:
        return []
    return ["llamacpp"] if load_anchors().llamacpp.available() else []


def compare_outputs(ours: RunRecord, theirs: RunRecord) -> dict:
    """Every row both records hold (an anchor runs row 0 only): tokens, provenance, finish reason.
    `first_divergence` is the first differing position of the first differing row."""
    rows = []
    for row, (a, b) in enumerate(zip(ours.token_ids, theirs.token_ids)):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        flags_equal = ours.from_nudger[row] == theirs.from_nudger[row]
        finish_equal = ours.finish[row] == theirs.finish[row]
        rows.append({"row": row, "first_divergence": first, "provenance_equal": flags_equal,
                     "finish_reason_equal": finish_equal, "tokens_compared": max(len(a), len(b)),
                     "equal": first is None and flags_equal and finish_equal})
    bad = [r for r in rows if not r["equal"]]
    head = bad[0] if bad else (rows[0] if rows else {})
    return {"equal": bool(rows) and not bad, "rows_checked": len(rows), "rows": rows,
            "first_divergence": head.get("first_divergence"), "provenance_equal": all(r["provenance_equal"] for r in rows),
            "finish_reason_equal": all(r["finish_reason_equal"] for r in rows),
            "tokens_compared": sum(r["tokens_compared"] for r in rows)}


class TokenCheck:
    """"Same tokens", accumulated over every checked run (warm-up and each timed repeat) of one
    runner against the reference run: nudgefast's warm-up on dense weights."""

    MAX_LISTED = 10

    def __init__(self, against: str):
        self.against, self.runs, self.rows, self.mismatches, self.count = against, 0, 0, [], 0

    def add(self, run: str, result: dict) -> None:
        self.runs += 1
        self.rows = max(self.rows, result["rows_checked"])
        for r in result["rows"]:
            if not r["equal"]:
                self.count += 1
                if len(self.mismatches) < self.MAX_LISTED:
                    self.mismatches.append({"run": run, **{k: v for k, v in r.items() if k != "equal"}})

    @property
    def equal(self) -> bool:
        return self.runs > 0 and self.count == 0

    def as_dict(self) -> dict:
        return {"against": self.against, "runs_checked": self.runs, "rows_checked": self.rows, "equal": self.equal,
                "mismatch_count": self.count, "mismatches": self.mismatches}
