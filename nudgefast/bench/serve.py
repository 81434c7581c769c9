"""`nudgefast bench --serve`: continuous batching against closed static batches, same requests,
same arrival times, same engine.

N requests with mixed prompt and output lengths arrive as a Poisson process (seeded). Two
schedules serve them on one engine, one after the other (both warm):
- continuous: every step admits whatever has arrived (add_request / step), as a server does;
- static: closed batches, as `generate` serves a list: when the engine is idle, every request that
  has arrived forms the next batch, and nothing joins until that batch has finished.
Reported per schedule: throughput (tokens/s over the makespan), TTFT and inter-token latency
p50/p99 (a request's first token time minus its arrival; the gaps between its deltas divided by
the tokens in each delta; on the text-level path, whose ids come at the end, per streamed text
chunk), and every request's tokens, which must be equal between the schedules
(the engine's batch invariance) or no ratio is reported.

    nudgefast bench --serve --demo-pair --requests 24 --rate 2 --out benchmarks/results/cpu-serve-demo.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from ..params import NudgeConfig
from .runners import percentiles


def make_requests(engine, n: int, seed: int, prompt_range, new_range, speculate: int = 0) -> list[dict]:
    """Questions of random length (words from a fixed list), random output lengths."""
    rng = random.Random(seed)
    words = ("the answer explains how water boils when heated at sea level and why mountains change "
             "the temperature because air pressure drops with height so molecules escape sooner").split()
    reqs = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(*prompt_range)))
        cfg = NudgeConfig(max_new_tokens=rng.randint(*new_range), stop_token_ids=[], speculate=speculate,
                          granularity="word")
        reqs.append({"prompt": f"Explain briefly: {q}?", "config": cfg})
    return reqs


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def serve(engine, requests: list[dict], arrivals: list[float], static: bool) -> dict:
    """Run the schedule in real time; returns per-request timings and tokens."""
    t0 = time.perf_counter()
    pending = list(range(len(requests)))
    rid_of, first, last, gaps, tokens = {}, {}, {}, [], {}
    done = 0
    while done < len(requests):
        now = time.perf_counter() - t0
        idle = not engine.has_unfinished()
        if not static or idle:
            while pending and arrivals[pending[0]] <= now:
                i = pending.pop(0)
                r = requests[i]
                rid_of[engine.add_request(r["prompt"], config=r["config"])] = i
        if not engine.has_unfinished():
            if pending:  # nothing to do until the next arrival
                time.sleep(max(0.0, arrivals[pending[0]] - (time.perf_counter() - t0)))
            continue
        outs = engine.step()
        now = time.perf_counter() - t0
        for out in outs:
            i = rid_of[out.request_id]
            # the text-level path (two tokenizers) streams text and gives its ids at the end: there a
            # streamed text chunk counts as one unit of output for the latencies
            n = len(out.token_ids) if out.token_ids and not out.finished else (1 if out.text else 0)
            if n:
                if i not in first:
                    first[i] = now
                else:
                    gaps.extend([(now - last[i]) / n] * n)
                last[i] = now
            if out.finished:
                tokens[i] = out.completion.token_ids if out.completion else []
                done += 1
    makespan = time.perf_counter() - t0
    total = sum(len(t) for t in tokens.values())
    return {"makespan_s": makespan, "tokens": total, "tokens_per_s": total / makespan,
            "ttft_s": percentiles([first[i] - arrivals[i] for i in first]), "itl_s": percentiles(gaps),
            "outputs": [tokens[i] for i in range(len(requests))]}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="nudgefast bench --serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", action="store_true", required=True)
    p.add_argument("--demo-pair", action="store_true", help="the offline pair (default when no models are given)")
    p.add_argument("--base")
    p.add_argument("--nudger")
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", choices=["dense", "gguf"], default="dense")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--prompt-words", type=int, nargs=2, default=(4, 40))
    p.add_argument("--new-tokens", type=int, nargs=2, default=(8, 64))
    p.add_argument("--speculate", type=int, default=0)
    p.add_argument("--max-running", type=int, default=32)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="split the base model across N processes")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    return p.parse_args(argv)


def main(argv) -> int:
    import torch

    import nudgefast as nf

    args = parse_args(argv)
    if args.requests < 1 or args.rate <= 0:
        raise SystemExit("nudgefast bench --serve: --requests must be >= 1 and --rate > 0")
    if args.tensor_parallel_size < 1 or (args.tensor_parallel_size > 1 and args.weights != "dense"):
        raise SystemExit(f"nudgefast bench --serve: --tensor-parallel-size {args.tensor_parallel_size} must be >= 1 "
                         "(and > 1 shards dense weights only)")
    if args.threads:
        torch.set_num_threads(args.threads)
    base, nudger = args.base, args.nudger
    if not (base or nudger):
        from ..packaged import demo_pair

        base, nudger = demo_pair()
    engine = nf.NudgingEngine(base=base, nudger=nudger, device=args.device, weights=args.weights,
                              max_running=args.max_running, tensor_parallel_size=args.tensor_parallel_size)
    try:
        return _serve_both(engine, args, argv, base, nudger)
    finally:
        engine.close()  # tensor-parallel workers stop with the run


def _serve_both(engine, args, argv, base, nudger) -> int:
    import torch

    from .report import device_info, git_info

    reqs = make_requests(engine, args.requests, args.seed, args.prompt_words, args.new_tokens, args.speculate)
    arrivals = arrival_times(args.requests, args.rate, args.seed)
    engine.generate(reqs[0]["prompt"], reqs[0]["config"])  # warm-up
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    results = {}
    for name, static in (("continuous", False), ("static", True)):
        log(f"serving {args.requests} requests at {args.rate}/s: {name} batching ...")
        results[name] = serve(engine, reqs, arrivals, static)
    same = results["continuous"]["outputs"] == results["static"]["outputs"]
    c, s = results["continuous"], results["static"]
    summary = {"same_tokens": same,
               "throughput_ratio": c["tokens_per_s"] / s["tokens_per_s"] if same else None,
               "itl_p99_ratio": (c["itl_s"]["p99"] / s["itl_s"]["p99"]
                                 if same and c["itl_s"]["p99"] and s["itl_s"]["p99"] else None)}
    def ms(x):
        return "-" if x is None else f"{x * 1e3:.0f}ms"

    for name, r in results.items():
        log(f"  {name:10s} {r['tokens_per_s']:7.1f} tok/s  TTFT p50 {ms(r['ttft_s']['p50'])} p99 "
            f"{ms(r['ttft_s']['p99'])}  ITL p50 {ms(r['itl_s']['p50'])} p99 {ms(r['itl_s']['p99'])}")
    log(f"  same tokens: {same}; continuous / static throughput: {summary['throughput_ratio']}")
    doc = {"schema": "nudgefast-bench-serve/1", "command": "nudgefast bench " + " ".join(argv),
           "git": git_info(), "device": device_info(engine.device), "threads": torch.get_num_threads(),
           # folder names, not machine paths (a converted model's folder name carries its content hash)
           "models": {"base": Path(str(base)).name, "nudger": Path(str(nudger)).name}, "requests": args.requests, "rate": args.rate,
           "tensor_parallel_size": args.tensor_parallel_size, "summary": summary,
           "results": {k: {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in results.items()}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    print(json.dumps(summary))
    return 0 if same else 1
