"""One benchmark case of `nudgefast bench`: warm-up, interleaved timed repeats with the "same tokens"
check on every run and row, the per-case summary, the speed-ups (none where tokens differ), and the
per-engine bytes-per-token bound against a measured read bandwidth."""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from ..api import NudgeConfig
from ..blocks import BlockWeight
from ..kv_cache import KVPool
from ..model import Transformer
from .presets import Models
from .runners import (AnchorRunner, NudgefastRunner, RunRecord, TokenCheck, anchors_for, compare_outputs, cpu_anchors,
                      make_prompts, percentiles)


# ---- Bytes per token and the bandwidth bound -----------------------------------------------------
def measure_read_bandwidth(device, nbytes: int | None = None, repeats: int = 15) -> dict:
    """Read bandwidth in GB/s: a float32 sum over a buffer far larger than any cache (bytes read
    over time; nothing written), with the torch thread count in force, which is the count the
    bench runs with. CUDA: 1 GiB, best of 3 batches of `repeats`; CPU: 256 MiB, best of `repeats`.
    This is the ceiling a decode step that streams its weights can reach (a float32 sum is itself
    a little compute work, so the true ceiling may sit somewhat higher)."""
    device = torch.device(device)
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (256 << 20))
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    buf.sum()  # first touch: pages faulted in, kernels loaded
    if device.type == "cuda":
        best = 0.0
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                buf.sum()
            end.record()
            end.synchronize()
            best = max(best, nbytes * repeats / (start.elapsed_time(end) / 1e3) / 1e9)
        gbps = best
    else:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf.sum()
            times.append(time.perf_counter() - t0)
        gbps = nbytes / min(times) / 1e9  # a ceiling: the best run (a busy machine only slows runs down)
    return {"gbps": gbps, "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "method": f"float32 sum over {nbytes >> 20} MiB, bytes read / time "
                      f"(best of {'3 batches of ' if device.type == 'cuda' else ''}{repeats} runs)"}


def hf_weight_bytes(model) -> int:
    """Bytes of weights one transformers forward reads: every parameter once (shared ones once),
    except an input embedding that is not also the output head (only a few rows are gathered)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen or (p is embed and (head is None or head.weight is not embed)):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


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


def kv_bytes_per_token(loaded) -> int:
    """KV bytes one cached token takes in this model (nudgefast's pool; transformers' cache in the
    same dtype holds the same)."""
    return KVPool.bytes_per_token(loaded.spec, loaded.model.dtype)


def bytes_per_token(runner, case: Case, cfg: NudgeConfig, runs: list[RunRecord], context: float,
                    hf_bytes: dict | None) -> dict:
    """Bytes read per emitted token (per sequence of the batch) by THIS engine in its decode phase:
    for each model, the forwards it runs per emitted token times (its own weight bytes + the KV
    cache it attends over at the mean context). nudgefast: every model in play once per step (per
    round when speculating: the base once, the nudger K times, over the measured tokens per round);
    anchors: the forwards counted in their runs, less the prefill. None with a reason where no
    fixed decode step exists (the cross-vocabulary path prefills re-tokenized text as it goes)."""
    engine = runner.models.engine if runner.role == "anchor" else runner.engine
    if runner.role == "ours" and getattr(runner, "crossvocab", False):
        return {"bytes": None, "note": "no bound: the cross-vocabulary path has no fixed decode step (each word is "
                                       "re-tokenized and prefilled) and its first-token time is not observed"}
    roles = {"base_only": ["base"], "nudger_only": ["nudger"], "nudging": ["base", "nudger"]}[cfg.mode]
    kv = {r: kv_bytes_per_token(getattr(engine, r)) * context for r in roles}
    if runner.role == "ours":
        weights = {r: weight_bytes(getattr(runner.engine, r).model) for r in roles}
        if cfg.speculate:
            per_round = statistics.mean(((acceptance(r) or {}).get("tokens_per_round") or 1.0) for r in runs)
            fwd = {"base": 1.0 / per_round, "nudger": cfg.speculate / per_round}
            how = f"per round: the base once, the nudger {cfg.speculate} times; {per_round:.2f} tokens per round"
        elif all(r.forwards for r in runs):  # the lazy schedule counts the forwards it runs
            fwd = {r: statistics.mean(x.forwards.get(r, 0) / max(1, x.tokens) for x in runs) for r in roles}
            how = "lazy schedule: decode forwards counted in the runs per emitted token (a catch-up chunk reads " \
                  "the weights once)"
        else:
            fwd = dict.fromkeys(roles, 1.0)
            how = "every model in play once per decode step"
    else:
        weights = {r: hf_bytes[r] for r in roles}
        decoded = [r for r in runs if r.forwards and r.tokens > 1]
        if not decoded:
            return {"bytes": None, "note": "no bound: no decode forwards observed"}
        fwd = {r: statistics.mean(max(0, x.forwards.get(r, 0) - 1) / (x.tokens - 1) for x in decoded) for r in roles}
        how = "forwards counted in the anchor's runs (prefill excluded) per emitted token"
    total = sum(fwd[r] * (weights[r] + kv[r] * case.batch) for r in roles) / case.batch
    return {"bytes": int(total), "weights_bytes": weights, "forwards_per_token": fwd,
            "kv_bytes_at_mean_context": {r: int(kv[r]) for r in roles}, "mean_context": context, "how": how}


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


def schedules(cfg: NudgeConfig, wanted: list[str] | None) -> list[bool | None]:
    """The lazy switch of each nudgefast runner of a case: None (the engine's own) unless --schedule
    asks for lazy and/or eager and the case is shared-vocabulary nudging without speculation."""
    if not wanted or cfg.mode != "nudging" or cfg.speculate:
        return [None]
    return [s == "lazy" for s in wanted]


def case_runners(models: Models, cfg: NudgeConfig, base_prompts, nudger_prompts, anchors: bool,
                 schedule: list[str] | None = None) -> list:
    """nudgefast on each of its engines (dense first: the reference every other run is checked
    against), then (at batch 1, when asked) the anchors that do the same work."""
    runners = [NudgefastRunner(models, cfg, base_prompts, nudger_prompts, name, lazy)
               for name in models.engines for lazy in schedules(cfg, schedule)]
    if anchors and len(base_prompts) == 1 and not runners[0].crossvocab:  # no transformers anchor across vocabularies
        stop_ids = models.engine.stop_ids_for(cfg)
        word_start = models.engine.word_start_for(cfg)
        runners += [AnchorRunner(n, models, cfg, base_prompts, nudger_prompts, stop_ids, word_start)
                    for n in anchors_for(cfg) + cpu_anchors(models, cfg)]
    return runners


def force_mismatch(rec: RunRecord) -> None:
    """The test hook behind --test-force-mismatch: change the last token of row 0, as a wrong
    kernel would, so the checks downstream can be seen to catch it."""
    if rec.token_ids and rec.token_ids[0]:
        rec.token_ids[0] = rec.token_ids[0][:-1] + [rec.token_ids[0][-1] + 1]


def run_case(models: Models, case: Case, args, bandwidth: dict | None, log) -> list[dict]:
    cfg = NudgeConfig(mode=case.mode, gate=args.gate, threshold=args.threshold, granularity=case.granularity,
                      speculate=case.speculate, max_new_tokens=case.new_tokens,
                      stop_token_ids=None if args.stop_at_eos else [])
    base_prompts, nudger_prompts = make_prompts(models, case.batch, case.prompt_len, args.seed)
    try:
        runners = case_runners(models, cfg, base_prompts, nudger_prompts, anchors=args.anchors,
                               schedule=getattr(args, "schedule", None))
    except ValueError as e:
        log(f"  skipped: {e}")
        return []
    ref_name = runners[0].name
    records = {r.name: [] for r in runners}
    checks = {r.name: TokenCheck(f"{ref_name} warm-up run ({runners[0].weights['label']})") for r in runners}
    warm = {}
    for r in runners:
        for _ in range(max(1, args.warmup)):
            warm[r.name] = r.run()
    reference = warm[ref_name]
    for r in runners[1:]:
        checks[r.name].add("warm-up", compare_outputs(reference, warm[r.name]))
    force = getattr(args, "test_force_mismatch", None)
    for i in range(args.repeats):
        for r in runners:  # interleaved: a noisy neighbour slows every runner alike
            rec = r.run()
            if force == r.name and i == args.repeats - 1:
                force_mismatch(rec)
            checks[r.name].add(f"timed {i + 1}", compare_outputs(reference, rec))
            records[r.name].append(rec)
    for name, chk in checks.items():
        verdict = ("same tokens" if chk.equal else
                   f"TOKENS DIFFER in {chk.count} row(s) (first: {chk.mismatches[0]})")
        log(f"  {name}: {verdict} over {chk.runs} run(s) x {chk.rows} row(s) against {ref_name}'s warm-up")
    # CUDA: one more run per runner in sync-debug mode, to count host synchronizations (the CPU
    # counts come from the code: the engine's flag reads, the anchors' reads)
    cuda = models.engine.device.type == "cuda"
    syncs = {r.name: r.run(count_syncs=True).host_reads if cuda else None for r in runners}
    hf_bytes = ({role: hf_weight_bytes(m) for role, m in models.load_hf().items()}
                if any(r.role == "anchor" for r in runners) else None)
    out = [summarize(r, case, cfg, records[r.name], syncs[r.name], checks[r.name], bandwidth, args, hf_bytes)
           for r in runners]
    by_name = {e["engine"]: e for e in out}
    ours = [r for r in runners if r.role == "ours"]
    for r in runners:
        if r.role == "anchor":
            entry = by_name[r.name]
            entry["comparisons"] = [compare_rows(by_name[o.name], entry, records[o.name], records[r.name], o, r, case,
                                                 models) for o in ours]
            # same weights first (e.g. a GGUF-reading anchor against nudgefast on GGUF blocks)
            entry["comparisons"].sort(key=lambda c: not c["same_weights"])
    return out


def compare_rows(ours: dict, theirs: dict, our_runs, their_runs, our_runner, their_runner, case: Case,
                 models: Models) -> dict:
    """One speed-up of nudgefast over an anchor, with everything that makes the two rows differ
    stated, and no figure at all unless both wrote the reference's tokens in every checked run."""
    differences = []
    if our_runner.weights["format"] != their_runner.weights["format"]:
        differences.append(f"weights: nudgefast reads {our_runner.weights['label']}, the anchor "
                           f"{their_runner.weights['label']}")
    if case.speculate:
        differences.append(f"nudgefast speculates (K={case.speculate}: the nudger drafts, the base verifies); "
                           "the anchor decodes without speculation (same tokens either way)")
    if models.description.get("same_model_both_roles") and case.mode == "nudging":
        differences.append("one model plays base and nudger (different prompts): nudged fraction and speculative "
                           "acceptance are not those of a real base/nudger pair")
    same_tokens = ours["same_tokens"] and theirs["same_tokens"]
    out = {"ours": ours["engine"], "anchor": theirs["engine"], "ours_weights": our_runner.weights["label"],
           "anchor_weights": their_runner.weights["label"],
           "same_weights": our_runner.weights["format"] == their_runner.weights["format"],
           "differences": differences, "same_tokens": same_tokens,
           "speedup_ratio_of_medians": None, "speedup_median_of_paired": None, "speedup_cpu_time": None,
           "suppressed": None}
    if not same_tokens:
        out["suppressed"] = ("tokens differ from the reference in a checked run: the engines did not do the same "
                             "work, so no speed-up is given")
        return out
    paired = [a.tokens / a.seconds / (b.tokens / b.seconds) for a, b in zip(our_runs, their_runs)]
    out.update(speedup_ratio_of_medians=ours["tokens_per_s_aggregate"] / theirs["tokens_per_s_aggregate"],
               speedup_median_of_paired=statistics.median(paired),
               speedup_cpu_time=(ours["tokens_per_cpu_s"] / theirs["tokens_per_cpu_s"]
                                 if ours["tokens_per_cpu_s"] and theirs["tokens_per_cpu_s"] else None))
    return out


def summarize(runner, case: Case, cfg: NudgeConfig, runs: list[RunRecord], cuda_syncs: float | None,
              check: TokenCheck, bandwidth: dict | None, args, hf_bytes: dict | None) -> dict:
    """One scenario entry: medians over the timed runs; latency percentiles over the pooled samples
    of every timed run."""
    name = runner.name
    device_type = runner.models.engine.device.type if runner.role == "anchor" else runner.engine.device.type
    secs = [r.seconds for r in runs]
    rates = [r.tokens / r.seconds for r in runs]
    med_rate = statistics.median(rates)
    last = runs[-1]
    flags = [f for row in last.from_nudger for f in row]
    latencies = [x for r in runs for x in (r.latencies or [])]
    ttfts = [r.ttft for r in runs if r.ttft is not None]
    host_syncs = cuda_syncs if cuda_syncs is not None else last.host_reads
    ours = runner.role == "ours"
    entry = {
        "name": f"{name}:{case.label}", "engine": name, "role": runner.role, "case": case.label, "mode": case.mode,
        "granularity": case.granularity if case.mode == "nudging" else None, "speculate": case.speculate,
        "batch": case.batch, "prompt_len": case.prompt_len, "new_tokens": case.new_tokens, "dtype": args.dtype,
        "weights_read": runner.weights["label"], "weights_format": runner.weights["format"],
        "gate": cfg.gate, "threshold": cfg.threshold, "stop_at_eos": bool(args.stop_at_eos),
        "warmup": args.warmup, "repeats": len(runs), "seconds": secs, "seconds_median": statistics.median(secs),
        "tokens": [r.tokens for r in runs],
        "tokens_per_s_aggregate": med_rate, "tokens_per_s_per_seq": med_rate / case.batch,
        # CPU devices: tokens per second of process CPU time (all threads; compare at equal --threads),
        # robust to other jobs taking turns on the cores
        "cpu_seconds": [r.cpu_seconds for r in runs] if device_type == "cpu" else None,
        "tokens_per_cpu_s": (statistics.median(r.tokens / r.cpu_seconds for r in runs)
                             if device_type == "cpu" else None),
        "ms_per_token": {k: (v * 1e3 if isinstance(v, float) else v) for k, v in percentiles(latencies).items()},
        "latency_source": last.latency_source,
        "ttft_ms": statistics.median(ttfts) * 1e3 if ttfts else None,
        "host_syncs_per_token": host_syncs,
        "host_syncs_source": ("counted: torch.cuda sync-debug warnings over the whole call (one extra run)"
                              if cuda_syncs is not None else
                              ("not counted: the cross-vocabulary path reads the candidates on the host every step"
                               if ours and host_syncs is None else
                               ("counted: engine reads of the round's results and, in the lazy schedule, of "
                                "each forward's candidates" if ours and last.forwards else
                                "counted: engine reads of the all-finished flag") if ours else
                               ("counted: host reads in the anchor loop" if host_syncs is not None else
                                "not countable on the CPU (inside transformers generate; >= 1 per token)"))),
        "nudged_fraction": sum(flags) / len(flags) if flags else 0.0,
        "acceptance": acceptance(last) if case.speculate and ours else None,
        "token_check": check.as_dict(), "same_tokens": check.equal,
        "forwards_per_run": last.forwards,
        "_latencies_ms": [x * 1e3 for x in latencies],  # for the plot; not written to the JSON
    }
    if ours:
        entry["backend"] = runner.engine.backend.kind
        entry["flag_reads"] = (last.stats[0] or {}).get("flag_reads")
    context = case.prompt_len + case.new_tokens / 2
    bpt = bytes_per_token(runner, case, cfg, runs, context, hf_bytes)
    entry["bytes_per_token"] = bpt
    entry.update(bandwidth_bound_tokens_per_s=None, decode_tokens_per_s=None, fraction_of_bound=None)
    # the decode phase of each run: after its first token (prefill excluded); an anchor whose bytes
    # per token are unknown (llama.cpp) still has a decode rate, only no bound
    decode = [(r.tokens - case.batch) / (r.seconds - r.ttft) for r in runs if r.ttft is not None]
    if decode:
        entry["decode_tokens_per_s"] = statistics.median(decode)
    if decode and bandwidth and bpt["bytes"]:
        bound = bandwidth["gbps"] * 1e9 / bpt["bytes"] * case.batch
        entry.update(bandwidth_bound_tokens_per_s=bound, fraction_of_bound=entry["decode_tokens_per_s"] / bound)
    return entry


def acceptance(rec: RunRecord) -> dict:
    st = rec.stats or []
    tot = {k: sum(s.get(k, 0) or 0 for s in st) for k in ("rounds", "drafted", "accepted", "emitted_in_rounds")}
    return {"rounds": tot["rounds"], "drafted": tot["drafted"], "accepted": tot["accepted"],
            "acceptance_rate": tot["accepted"] / tot["drafted"] if tot["drafted"] else None,
            "accepted_per_round": tot["accepted"] / tot["rounds"] if tot["rounds"] else None,
            "tokens_per_round": tot["emitted_in_rounds"] / tot["rounds"] if tot["rounds"] else None}
