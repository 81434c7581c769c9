"""One benchmark case of `nudgefast bench`: warm-up, the anchor equality check, interleaved timed
repeats, the per-case summary, and the bytes-per-step bandwidth bound it is measured against."""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from ..api import NudgeConfig, NudgingEngine
from ..blocks import BlockWeight
from ..kv_cache import KVPool
from ..model import Transformer
from .presets import Models
from .runners import (AnchorRunner, NudgefastRunner, RunRecord, anchors_for, compare_outputs, cpu_anchors, make_prompts,
                      percentiles)


# ---- Bytes per step and the bandwidth bound ------------------------------------------------------
def measure_copy_bandwidth(device, nbytes: int | None = None, repeats: int = 20) -> float:
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written. CUDA: 1 GiB copied
    `repeats` times between two events, best of 3 batches; CPU: 256 MiB, median of `repeats`."""
    device = torch.device(device)
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        best = 0.0
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                dst.copy_(src)
            end.record()
            end.synchronize()
            best = max(best, 2 * nbytes * repeats / (start.elapsed_time(end) / 1e3) / 1e9)
        return best
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def weight_bytes(model: Transformer) -> int:
    """Bytes of weights one decode forward reads: every layer tensor, the final norm and the whole
    output head (the embedding table is only gathered, a few rows, unless it is the head)."""
    seen, total = set(), 0
    tensors = [t for layer in model.layers for t in layer.values() if isinstance(t, (torch.Tensor, BlockWeight))]
    tensors += [model.lm_head] + ([model.final_norm] if model.final_norm is not None else [])
    for t in tensors:
        if isinstance(t, BlockWeight):  # GGUF blocks: codes + scales + offsets
            key, size = t.codes.data_ptr(), t.nbytes
        else:
            key, size = t.data_ptr(), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += size
    return total


def bytes_per_step(engine: NudgingEngine, config: NudgeConfig, batch: int, context: float) -> dict:
    """Bytes one plain decode step reads: the weights of the models in play and every row's KV cache
    at the mean context length of the decode. The bandwidth bound of a case is the same for every
    engine that does its work (nudgefast, an anchor), and speculation, which reads the base model
    once per round, can exceed it. For speculative cases the bytes of one round are given too."""
    def step_bytes(loaded):
        return weight_bytes(loaded.model) + KVPool.bytes_per_token(loaded.spec, loaded.model.dtype) * context * batch

    sides = {"base_only": ["base"], "nudger_only": ["nudger"], "nudging": ["base", "nudger"]}[config.mode]
    out = {"bytes": int(sum(step_bytes(getattr(engine, s)) for s in sides)), "mean_context": context,
           "weights_bytes": {s: weight_bytes(getattr(engine, s).model) for s in sides}}
    if config.speculate:  # K draft forwards of the nudger, one verify forward of the base
        out["bytes_per_round"] = int(step_bytes(engine.base) + config.speculate * step_bytes(engine.nudger))
    return out


# ---- One case: warm up, check the anchors, time interleaved repeats, one instrumented run each ---
@dataclasses.dataclass(frozen=True)
class Case:
    mode: str
    granularity: str
    speculate: int
    batch: int
    prompt_len: int
    new_tokens: int

    @property
    def label(self) -> str:
        kind = self.mode if self.mode != "nudging" else f"nudging-{self.granularity}"
        return f"{kind}{f'-K{self.speculate}' if self.speculate else ''}-b{self.batch}"


def case_runners(models: Models, cfg: NudgeConfig, base_prompts, nudger_prompts, anchors: bool) -> list:
    """nudgefast's runner, then (at batch 1, when asked) the anchors that do the same work."""
    from ..decode import build_sides, resolve_stop_ids, word_start_table

    runners = [NudgefastRunner(models, cfg, base_prompts, nudger_prompts)]
    if anchors and len(base_prompts) == 1 and not runners[0].crossvocab:  # no transformers anchor across vocabularies
        sides = build_sides(models.engine, base_prompts, nudger_prompts, cfg)
        stop_ids = resolve_stop_ids(models.engine, cfg, sides)
        word_start = word_start_table(models.engine, sides, cfg)
        runners += [AnchorRunner(n, models, cfg, base_prompts, nudger_prompts, stop_ids, word_start)
                    for n in anchors_for(cfg) + cpu_anchors(models, cfg)]
    return runners


def run_case(models: Models, case: Case, args, bandwidth: float | None, log) -> list[dict]:
    engine = models.engine
    cfg = NudgeConfig(mode=case.mode, gate=args.gate, threshold=args.threshold, granularity=case.granularity,
                      speculate=case.speculate, max_new_tokens=case.new_tokens,
                      stop_token_ids=None if args.stop_at_eos else [])
    base_prompts, nudger_prompts = make_prompts(models, case.batch, case.prompt_len, args.seed)
    try:
        runners = case_runners(models, cfg, base_prompts, nudger_prompts, anchors=args.anchors)
    except ValueError as e:
        log(f"  skipped: {e}")
        return []
    records = {r.name: [] for r in runners}
    warm = {}
    for r in runners:
        for _ in range(max(1, args.warmup)):
            warm[r.name] = r.run()
    checks = {r.name: compare_outputs(warm["nudgefast"], warm[r.name]) for r in runners[1:]}
    for name, chk in checks.items():
        verdict = "equal" if chk["equal"] else f"DIFFERENT (first divergence at token {chk['first_divergence']})"
        log(f"  anchor check {name}: {verdict}")
    for _ in range(args.repeats):
        for r in runners:  # interleaved: a noisy neighbour slows every runner alike
            records[r.name].append(r.run())
    # CUDA: one more run per runner in sync-debug mode, to count host synchronizations (the CPU
    # counts come from the code: the engine's flag reads, the anchors' reads)
    cuda = engine.device.type == "cuda"
    syncs = {r.name: r.run(count_syncs=True).host_reads if cuda else None for r in runners}
    out = []
    for r in runners:
        out.append(summarize(r.name, case, cfg, records[r.name], syncs[r.name], checks.get(r.name),
                             engine, bandwidth, args))
    ours = out[0]
    for entry in out[1:]:
        paired = [a.tokens / a.seconds / (b.tokens / b.seconds)
                  for a, b in zip(records["nudgefast"], records[entry["engine"]])]
        entry["comparison"] = {
            "ours": "nudgefast", "equal_work": entry["anchor_check"]["equal"],
            "speedup_ratio_of_medians": ours["tokens_per_s_aggregate"] / entry["tokens_per_s_aggregate"],
            "speedup_median_of_paired": statistics.median(paired),
            "speedup_cpu_time": (ours["tokens_per_cpu_s"] / entry["tokens_per_cpu_s"]
                                 if ours["tokens_per_cpu_s"] else None)}
    return out


def summarize(name: str, case: Case, cfg: NudgeConfig, runs: list[RunRecord], cuda_syncs: float | None, check,
              engine, bandwidth, args) -> dict:
    """One scenario entry: medians over the timed runs; latency percentiles over the pooled samples
    of every timed run."""
    secs = [r.seconds for r in runs]
    rates = [r.tokens / r.seconds for r in runs]
    med_rate = statistics.median(rates)
    last = runs[-1]
    flags = [f for row in last.from_nudger for f in row]
    latencies = [x for r in runs for x in (r.latencies or [])]
    ttfts = [r.ttft for r in runs if r.ttft is not None]
    host_syncs = cuda_syncs if cuda_syncs is not None else last.host_reads
    entry = {
        "name": f"{name}:{case.label}", "engine": name, "case": case.label, "mode": case.mode,
        "granularity": case.granularity if case.mode == "nudging" else None, "speculate": case.speculate,
        "batch": case.batch, "prompt_len": case.prompt_len, "new_tokens": case.new_tokens, "dtype": args.dtype,
        "gate": cfg.gate, "threshold": cfg.threshold, "stop_at_eos": bool(args.stop_at_eos),
        "warmup": args.warmup, "repeats": len(runs), "seconds": secs, "seconds_median": statistics.median(secs),
        "tokens": [r.tokens for r in runs],
        "tokens_per_s_aggregate": med_rate, "tokens_per_s_per_seq": med_rate / case.batch,
        # CPU devices: tokens per second of process CPU time (all threads; compare at equal --threads),
        # robust to other jobs taking turns on the cores
        "cpu_seconds": [r.cpu_seconds for r in runs] if engine.device.type == "cpu" else None,
        "tokens_per_cpu_s": (statistics.median(r.tokens / r.cpu_seconds for r in runs)
                             if engine.device.type == "cpu" else None),
        "ms_per_token": {k: (v * 1e3 if isinstance(v, float) else v) for k, v in percentiles(latencies).items()},
        "latency_source": last.latency_source,
        "ttft_ms": statistics.median(ttfts) * 1e3 if ttfts else None,
        "host_syncs_per_token": host_syncs,
        "host_syncs_source": ("counted: torch.cuda sync-debug warnings over the whole call (one extra run)"
                              if cuda_syncs is not None else
                              ("not counted: the cross-vocabulary path reads the candidates on the host every step"
                               if name == "nudgefast" and host_syncs is None else
                               "counted: engine reads of the all-finished flag" if name == "nudgefast" else
                               ("counted: host reads in the anchor loop" if host_syncs is not None else
                                "not countable on the CPU (inside transformers generate; >= 1 per token)"))),
        "nudged_fraction": sum(flags) / len(flags) if flags else 0.0,
        "acceptance": acceptance(last) if case.speculate and name == "nudgefast" else None,
        "anchor_check": check,
        "_latencies_ms": [x * 1e3 for x in latencies],  # for the plot; not written to the JSON
    }
    if name == "nudgefast":
        entry["backend"] = engine.backend.kind
        entry["flag_reads"] = (last.stats[0] or {}).get("flag_reads")
    context = case.prompt_len + case.new_tokens / 2
    bps = bytes_per_step(engine, cfg, case.batch, context)
    entry["bytes_per_step"] = bps
    if bandwidth:
        bound = bandwidth * 1e9 / bps["bytes"] * case.batch
        # the decode phase of each run: after its first token (prefill excluded)
        decode_rate = statistics.median((r.tokens - case.batch) / (r.seconds - (r.ttft or 0.0)) for r in runs)
        entry.update({"bandwidth_bound_tokens_per_s": bound, "decode_tokens_per_s": decode_rate,
                      "fraction_of_bound": decode_rate / bound})
    return entry


def acceptance(rec: RunRecord) -> dict:
    st = rec.stats or []
    tot = {k: sum(s.get(k, 0) or 0 for s in st) for k in ("rounds", "drafted", "accepted", "emitted_in_rounds")}
    return {"rounds": tot["rounds"], "drafted": tot["drafted"], "accepted": tot["accepted"],
            "acceptance_rate": tot["accepted"] / tot["drafted"] if tot["drafted"] else None,
            "accepted_per_round": tot["accepted"] / tot["rounds"] if tot["rounds"] else None,
            "tokens_per_round": tot["emitted_in_rounds"] / tot["rounds"] if tot["rounds"] else None}
