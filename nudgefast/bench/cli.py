"""`nudgefast bench` command line: named suites, options, model building and the JSON result."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from ..errors import ArgumentParser, BadValue, MissingPackage, check_device, run_command
from .cases import Case, measure_read_bandwidth, run_case
from .presets import PRESETS, Models, dir_models, preset_models
from .report import ENV_KEYS, device_info, environment_info, format_table, git_info, native_kernel_isa, write_plot

SCHEMA = "nudgefast-bench/2"
EXIT_TOKENS_DIFFER = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ---- named suites (the scenario sets of issue 6 and issues 2/3) ----------------------------------
SUITES = {
    "gpu-olmo2": dict(preset="olmo2-7b+1b", device="cuda", dtype="bfloat16", prompt_len=128, new_tokens=256,
                      batch=[1, 8, 32], anchors=True,
                      cases=[("base_only", "word", 0), ("nudging", "token", 0), ("nudging", "word", 0),
                             ("nudging", "word", 4)]),
    "gpu-llama2": dict(preset="llama2-13b+7b", device="cuda", dtype="bfloat16", prompt_len=128, new_tokens=256,
                       batch=[1, 8, 32], anchors=False,
                       cases=[("base_only", "word", 0), ("nudging", "token", 0), ("nudging", "word", 0),
                              ("nudging", "word", 4)]),
    "cpu-smollm2": dict(packaged="smollm2-135m-instruct", device="cpu", dtype="float32", prompt_len=128,
                        new_tokens=128, batch=[1], anchors=True,
                        cases=[("base_only", "word", 0), ("nudging", "token", 0), ("nudging", "word", 0),
                               ("nudging", "word", 4)]),
}


# ---- CLI -----------------------------------------------------------------------------------------
def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv):
    p = ArgumentParser(prog="nudgefast bench", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("models (one of)")
    src.add_argument("--suite", choices=sorted(SUITES), help="a named scenario set (sets the options below)")
    src.add_argument("--preset", help=f"random planted weights at real shapes: {', '.join(sorted(PRESETS))}")
    src.add_argument("--base", help="base model directory")
    src.add_argument("--nudger", help="nudger model directory")
    src.add_argument("--packaged", help="a packaged model used as both base (plain prompt) and nudger (chat prompt)")
    src.add_argument("--demo-pair", action="store_true", help="the offline cross-family pair: gemma-3-270m base, "
                     "SmolLM2-135M-Instruct nudger (nudging runs on text: word granularity, no speculation)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--mode", type=_csv(str), default=None, help="comma list of base_only, nudger_only, nudging")
    p.add_argument("--granularity", type=_csv(str), default=["word"], help="comma list of token, word")
    p.add_argument("--speculate", type=_csv(int), default=[0], help="comma list of K (0 = none); nudging only")
    p.add_argument("--batch", type=_csv(int), default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--gate", default="top_prob", choices=["top_prob", "entropy"])
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (default: always new-tokens tokens)")
    p.add_argument("--anchors", action="store_true", default=None, help="run the transformers anchors at batch 1")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--native", choices=["auto", "on", "off"], default="auto", help="the C++ CPU ops")
    p.add_argument("--weights", choices=["dense", "gguf", "gguf-q8"], default="dense",
                   help="gguf: also run nudgefast with its CPU linears on the quantized blocks of the models' GGUF "
                        "files (engine nudgefast-gguf), beside nudgefast on the dense weights; gguf-q8: the same "
                        "blocks with int8 activations (inexact, opt-in); the transformers anchors read the dense "
                        "conversion")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the base model across N processes (tensor parallelism; docs/PARALLEL.md); model "
                        "directories only (--base/--nudger, --packaged, --demo-pair), dense weights")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="exit 0 even when a run's tokens differ from the reference (the speed-ups stay suppressed)")
    p.add_argument("--test-force-mismatch", metavar="ENGINE", help=argparse.SUPPRESS)  # test hook: corrupt a run
    p.add_argument("--schedule", type=_csv(str), default=None,
                   help="comma list of lazy, eager: the schedules of shared-vocabulary nudging (speculate=0) to run "
                        "side by side on each engine (default: the engine's own, lazy on the CPU)")
    p.add_argument("--flag-interval", type=int, default=16)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the copy-bandwidth measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    suite = SUITES.get(args.suite, {})
    for key in ("preset", "packaged", "device", "dtype", "batch", "prompt_len", "new_tokens", "anchors"):
        if getattr(args, key) is None and key in suite:
            setattr(args, key, suite[key])
    args.device = args.device or "cpu"
    args.batch = args.batch or [1]
    args.prompt_len = args.prompt_len or 128
    args.new_tokens = args.new_tokens or 128
    args.anchors = bool(args.anchors)
    sources = [bool(args.preset), bool(args.base or args.nudger), bool(args.packaged), args.demo_pair]
    if sum(sources) != 1:
        p.error("give exactly one model source: --suite, --preset, --base/--nudger, --packaged or --demo-pair")
    if args.preset and args.preset not in PRESETS:
        p.error(f"unknown preset {args.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    if args.suite:
        args.cases = [Case(m, g, k, b, args.prompt_len, args.new_tokens)
                      for b in args.batch for (m, g, k) in suite["cases"]]
    else:
        modes = args.mode or ["base_only", "nudging"]
        bad = [m for m in modes if m not in ("base_only", "nudger_only", "nudging")]
        if bad:
            p.error(f"unknown mode(s) {bad}")
        if any(g not in ("token", "word") for g in args.granularity):
            p.error(f"granularity must be token or word, got {args.granularity}")
        cases = []
        for b in args.batch:
            for m in modes:
                combos = [(g, k) for g in args.granularity for k in args.speculate] if m == "nudging" else [("word", 0)]
                cases += [Case(m, g, k, b, args.prompt_len, args.new_tokens) for g, k in combos]
        args.cases = list(dict.fromkeys(cases))
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.schedule is not None and (not args.schedule or any(x not in ("lazy", "eager") for x in args.schedule)):
        p.error(f"--schedule takes lazy and/or eager, got {args.schedule}")
    for flag, values in (("--batch", args.batch), ("--prompt-len", [args.prompt_len]),
                         ("--new-tokens", [args.new_tokens]), ("--threads", [args.threads or 1])):
        if any(v < 1 for v in values):
            p.error(f"{flag} must be >= 1, got {values if len(values) > 1 else values[0]}")
    if args.weights != "dense" and args.preset:
        p.error("--weights gguf needs models converted from GGUF files, not a random-weight preset")
    if args.tensor_parallel_size < 1:
        p.error(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    if args.tensor_parallel_size > 1 and args.preset:
        p.error("--tensor-parallel-size > 1 loads each rank's shard from a model directory, not a random-weight "
                "preset (use --base/--nudger, --packaged or --demo-pair)")
    if args.tensor_parallel_size > 1 and args.weights != "dense":
        p.error("--tensor-parallel-size > 1 shards dense weights: drop --weights gguf")
    check_config(args)
    return args


def check_config(args) -> None:
    """What can be checked before any model is located, converted or loaded: every case's
    configuration, the device, the model directories' config.json, the packaged name, what the
    cross-family demo pair cannot do, and the optional packages the options need."""
    import importlib.util

    from ..api import NudgeConfig

    for c in args.cases:
        try:
            NudgeConfig(mode=c.mode, gate=args.gate, threshold=args.threshold, granularity=c.granularity,
                        speculate=c.speculate, max_new_tokens=c.new_tokens)
        except ValueError as e:
            raise BadValue(f"nudgefast bench: {e}".replace("NudgeConfig: ", "")) from e
    check_device(args.device)
    if args.weights != "dense" and torch.device(args.device).type != "cpu":
        raise BadValue("nudgefast bench: --weights gguf reads the GGUF blocks on the CPU only (use --device cpu)")
    if args.packaged:
        from ..packaged import _GGUF_PATHS

        if args.packaged not in _GGUF_PATHS:
            raise BadValue(f"nudgefast bench: unknown packaged model {args.packaged!r}; choose one of "
                           f"{', '.join(sorted(_GGUF_PATHS))}")
    if args.base or args.nudger:
        from ..config import load_spec

        for d in (args.base, args.nudger):
            if d:
                load_spec(d)  # config.json only
        if args.tensor_parallel_size > 1 and args.base:
            from ..parallel.tensor import check_shardable

            check_shardable(load_spec(args.base), args.tensor_parallel_size)
    if args.demo_pair:
        bad = sorted({c.label for c in args.cases if c.mode == "nudging" and (c.granularity == "token" or c.speculate)})
        if bad:
            raise BadValue(f"nudgefast bench: the demo pair has two tokenizers, so nudging runs on words without "
                           f"speculation; drop the cases {', '.join(bad)} (--granularity word --speculate 0)")
    needs = [("transformers", "--anchors", args.anchors), ("matplotlib", "--plot", bool(args.plot))]
    for module, flag, wanted in needs:
        if wanted and importlib.util.find_spec(module) is None:
            raise MissingPackage(f"nudgefast bench {flag} needs {module}: pip install {module} "
                                 "(scripts/install.sh installs it)")


def build_models(args) -> Models:
    dtype = DTYPES[args.dtype] if args.dtype else None
    # per row: prompt, output, speculation slack and (real tokenizers: the cross-vocabulary path may
    # run) re-tokenization slack
    def slack(c):
        return max(c.speculate + 2, 16) if args.preset else max(c.speculate + 2, 16, c.new_tokens // 2)
    need = max(c.batch * (c.prompt_len + c.new_tokens + slack(c)) for c in args.cases)
    kw = dict(native={"auto": None, "on": True, "off": False}[args.native], flag_interval=args.flag_interval,
              cuda_graphs=not args.no_cuda_graphs)
    kv_tokens = need + 128 * max(c.batch for c in args.cases)  # page rounding, chat-template overhead
    if args.preset:
        return preset_models(args.preset, args.device, dtype or torch.bfloat16, kv_tokens, args.seed, **kw)
    kw["weights"] = args.weights  # dense always; gguf (gguf-q8) adds the nudgefast-gguf (-gguf-q8) engine
    if args.tensor_parallel_size > 1:  # the base split across processes (the nudger stays whole)
        kw["tensor_parallel_size"] = args.tensor_parallel_size
    if args.packaged:
        from ..packaged import packaged_model_dir

        d = packaged_model_dir(args.packaged)
        models = dir_models(d, d, args.device, dtype, kv_tokens, **kw)
        models.description["note"] = (f"{args.packaged} serves as both base (plain-text prompt) and nudger (chat "
                                      "prompt): a shared-vocabulary pair from one offline model")
        return models
    if args.demo_pair:
        from ..packaged import demo_pair

        base_dir, nudger_dir = demo_pair()
        models = dir_models(base_dir, nudger_dir, args.device, dtype, kv_tokens, **kw)
        models.description["note"] = "cross-family pair: gemma-3-270m base, SmolLM2-135M-Instruct nudger"
        return models
    return dir_models(args.base, args.nudger, args.device, dtype, kv_tokens, **kw)


def main(argv=None) -> int:
    """`nudgefast bench` (also `python -m nudgefast.bench`): user errors as one line, status 2."""
    return run_command(bench_command, list(sys.argv[1:] if argv is None else argv))


def bench_command(argv) -> int:
    argv = list(argv)
    if argv[:1] == ["--"]:  # `nudgefast bench -- --preset ...` (cli.py hands over everything after "bench")
        argv = argv[1:]
    if "--serve" in argv:  # continuous against static batching (bench/serve.py)
        from .serve import main as serve_main

        return serve_main(argv)
    args = parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, log)
    finally:
        torch.set_num_threads(threads)


def _run(args, argv, log) -> int:
    t_start = time.perf_counter()
    git_start = git_info()  # the code that runs is the code at the start
    models = build_models(args)
    try:
        return _run_on(models, args, argv, log, t_start, git_start)
    finally:
        for engine in models.engines.values():
            engine.close()  # tensor-parallel workers stop with the run


def _run_on(models, args, argv, log, t_start, git_start) -> int:
    args.dtype = args.dtype or models.dense_dtype
    bandwidth = None if args.no_bandwidth else measure_read_bandwidth(args.device)
    if bandwidth:
        log(f"read bandwidth on {args.device} with {bandwidth['threads']} thread(s): {bandwidth['gbps']:.1f} GB/s")
    scenarios = []
    for case in args.cases:
        log(f"case {case.label}: prompt {case.prompt_len}, {case.new_tokens} new tokens")
        scenarios += run_case(models, case, args, bandwidth, log)
    result = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ENV_KEYS if k in os.environ)
                   + (" " if any(k in os.environ for k in ENV_KEYS) else "") + "nudgefast bench " + shlex.join(argv),
        "git": git_start, "environment": environment_info(), "device": device_info(args.device),
        "native_kernels": native_kernel_isa() if torch.device(args.device).type == "cpu" else None,
        "random_weights": models.random_weights, "models": models.description,
        "engines": {name: w for name, w in models.weights.items()},
        # > 1: the base runs split across this many processes; its weight bytes (and the bound) are rank 0's shard
        "tensor_parallel_size": args.tensor_parallel_size,
        "read_bandwidth": bandwidth,
        "bound_note": "bound = read bandwidth / bytes the engine reads per emitted token in its decode phase (its own "
                      "weight format, the forwards it runs per token, its KV cache at the mean context); "
                      "fraction = decode-phase tokens/s (after the first token) over it",
        "wall_seconds": time.perf_counter() - t_start, "scenarios": scenarios,
    }
    git_end = git_info()
    if git_end != git_start:  # someone committed or edited during the run: say so
        result["git_at_end"] = git_end
    print(format_table(scenarios))
    if args.plot:
        write_plot(result, Path(args.plot))
        log(f"plot written to {args.plot}")
    for s in scenarios:
        for key in [k for k in s if k.startswith("_")]:
            del s[key]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        log(f"results written to {args.out}")
    differ = [s["name"] for s in scenarios if not s["same_tokens"]]
    if differ:
        print(f"nudgefast bench: tokens differ from the reference run in {', '.join(differ)}: no speed-up is given "
              f"for them{' (--allow-mismatch: exit 0)' if args.allow_mismatch else ''}", file=sys.stderr)
        return 0 if args.allow_mismatch else EXIT_TOKENS_DIFFER
    return 0


if __name__ == "__main__":
    sys.exit(main())
