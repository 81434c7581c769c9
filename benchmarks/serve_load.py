"""Load benchmark of `nudgefast serve`: a bounded set of concurrent streaming chat clients against a
server on loopback, then the same requests through the engine driven in-process; prints and writes
requests/s, tokens/s, TTFT and inter-token latency p50/p99 for both, and the HTTP overhead.

    # against a server you started (only the HTTP side is measured):
    python benchmarks/serve_load.py --server http://127.0.0.1:8000 [--api-key KEY]
    # start one here (a subprocess on a free loopback port), then the in-process run, one after the other:
    python benchmarks/serve_load.py [--base DIR --nudger DIR] [--clients 8 --requests 32 --max-tokens 32]

Without models the offline demo pair is used (as `nudgefast serve` does). Everything is bounded: a
fixed number of requests, each with max_tokens, and a wall-clock limit on the whole run. The two
runs use the same questions, sampling and nudging parameters, one after the other on one machine,
so their ratio is the figure to read (absolute numbers depend on the machine and its load).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ["What are three tips for staying focused while studying?", "How do I bake bread at home?",
             "Explain why the sky is blue in two sentences.", "What is 17 times 24? Show the steps.",
             "Give me a short packing list for a weekend hike.", "What makes a good cup of coffee?",
             "Why do cats purr?", "Name three uses of a paperclip."]
SYSTEM = "Answer the question helpfully and concisely."
# The server sends one chunk per writer's piece of an engine output, so one output can be several
# chunks read back to back: chunks closer than this count as one output for the inter-token latency.
BURST_S = 0.001


def percentile(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def summarize(name, results, wall):
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"name": name, "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": tokens / wall, "completion_tokens": tokens,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99),
            "mean_ttft_ms": 1e3 * statistics.fmean(ttft) if ttft else float("nan")}


def requests(args):
    return [{"question": QUESTIONS[i % len(QUESTIONS)], "seed": i} for i in range(args.requests)]


# ---- HTTP side -------------------------------------------------------------------------------------
async def http_run(args, url):
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    todo = requests(args)
    results = []

    async def one(client, req):
        body = {"model": args.model, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": req["seed"],
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": req["question"]}],
                "nudging": {"mode": args.mode}}
        t0 = time.perf_counter()
        first, last, gaps, tokens = None, None, [], 0
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    elif now - last >= BURST_S:  # chunks of one engine output (one per writer) arrive together
                        gaps.append(now - last)
                    last = now
        results.append({"ttft": None if first is None else first - t0, "gaps": gaps, "tokens": tokens})

    async def worker(client):
        while todo:
            await one(client, todo.pop())

    async with httpx.AsyncClient(timeout=args.timeout, limits=httpx.Limits(max_connections=args.clients)) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(args.clients))), args.timeout)
        return summarize("http", results, time.perf_counter() - t0)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nudgefast.cli", "serve", "--port", str(port), "--served-model-name", args.model]
    if args.base:
        cmd += ["--base", args.base, "--nudger", args.nudger]
    cmd += ["--weights", args.weights, "--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
    for opt in ("flag_interval", "max_running"):
        if getattr(args, opt) is not None:
            cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    # the server logs a line per request: to a file, never a pipe nobody reads (a full pipe blocks it)
    log = tempfile.NamedTemporaryFile("w+", prefix="serve_load-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                proc.log_path = log.name
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise RuntimeError("the server did not start in time")


# ---- in-process side -------------------------------------------------------------------------------
async def inproc_run(args, engine):
    import nudgefast as nf
    from nudgefast.serve.app import default_async_engine

    aengine = default_async_engine(engine)
    todo = requests(args)
    results = []

    async def one(req):
        cfg = nf.NudgeConfig(mode=args.mode, max_new_tokens=args.max_tokens, temperature=args.temperature,
                             seed=req["seed"])
        t0 = time.perf_counter()
        first, last, gaps, tokens = None, None, [], 0
        async for out in aengine.stream(req["question"], cfg, system_prompt=SYSTEM):
            tokens += len(out.token_ids)
            if out.text:
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
            if out.finished and out.completion is not None and "emitted_tokens" in out.completion.stats:
                tokens = out.completion.stats["emitted_tokens"]
        results.append({"ttft": None if first is None else first - t0, "gaps": gaps, "tokens": tokens})

    async def worker():
        while todo:
            await one(todo.pop())

    try:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.clients))), args.timeout)
        return summarize("in-process", results, time.perf_counter() - t0)
    finally:
        await aengine.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", help="URL of a running server (then only the HTTP side is measured)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default="nudgefast", help="the served model name")
    p.add_argument("--base")
    p.add_argument("--nudger")
    p.add_argument("--weights", default="auto", choices=["auto", "dense", "gguf"])
    p.add_argument("--flag-interval", type=int, default=None, help="engine decode steps per round (both sides)")
    p.add_argument("--max-running", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--mode", default="nudging", choices=["nudging", "base_only", "nudger_only"])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=900.0, help="wall-clock bound of each run, seconds")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if bool(args.base) != bool(args.nudger):
        p.error("give both --base and --nudger, or neither (the demo pair)")
    if not 1 <= args.clients <= 256 or not 1 <= args.requests <= 10000:
        p.error("--clients in [1, 256] and --requests in [1, 10000]")
    figures = []
    if args.server:
        figures.append(asyncio.run(http_run(args, args.server.rstrip("/"))))
    else:
        proc, url = start_server(args)
        try:
            asyncio.run(http_run(args, f"{url}"))  # warm-up pass (first-use conversions, allocator)
            cpu0 = process_cpu_s(proc.pid)
            figures.append(asyncio.run(http_run(args, url)))
            figures[-1]["cpu_s"] = process_cpu_s(proc.pid) - cpu0  # the server process, all threads
        finally:
            proc.terminate()
            proc.wait(30)
            os.unlink(proc.log_path)
        from nudgefast.cli import _make_engine, _resolve_models

        from nudgefast.serve.cli import engine_kwargs

        args.kv_cache_tokens = None
        engine = _make_engine(args, *_resolve_models(args), **engine_kwargs(args))
        asyncio.run(inproc_run(args, engine))  # warm-up
        cpu0 = time.process_time()
        figures.append(asyncio.run(inproc_run(args, engine)))
        figures[-1]["cpu_s"] = time.process_time() - cpu0
    for f in figures:
        cpu = f" engine-side CPU {f['cpu_s'] / f['requests'] * 1e3:.1f} ms/request" if "cpu_s" in f else ""
        print(f"{f['name']:>10}: {f['requests_per_s']:.2f} req/s, {f['tokens_per_s']:.1f} tok/s, "
              f"TTFT p50 {f['ttft_p50_ms']:.0f} ms p99 {f['ttft_p99_ms']:.0f} ms, "
              f"ITL p50 {f['itl_p50_ms']:.1f} ms p99 {f['itl_p99_ms']:.1f} ms ({f['requests']} requests){cpu}")
    report = {"config": {k: v for k, v in vars(args).items() if k != "api_key"}, "figures": figures,
              "cpu_count": os.cpu_count()}
    if len(figures) == 2:
        report["http_over_inprocess_throughput"] = figures[0]["requests_per_s"] / figures[1]["requests_per_s"]
        report["server_cpu_over_inprocess_cpu"] = figures[0]["cpu_s"] / figures[1]["cpu_s"]
        print(f"HTTP / in-process throughput: {report['http_over_inprocess_throughput']:.3f}; CPU time of the "
              f"server process / of the in-process run: {report['server_cpu_over_inprocess_cpu']:.3f} (the "
              "server's own cost, less sensitive to the machine's load than wall-clock throughput)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
