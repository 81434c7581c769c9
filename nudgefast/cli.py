"""Command line: `nudgefast generate | convert | bench | serve`."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import ArgumentParser, BadValue, check_device, run_command

DEMO_QUESTION = "What are three tips for staying focused while studying?"
DEMO_SYSTEM = "Answer the question helpfully and concisely."


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base model directory (default: the offline demo pair)")
    p.add_argument("--nudger", help="nudger (aligned) model directory")
    p.add_argument("--prompt", action="append", help="question (repeat for a batch)")
    p.add_argument("--system", default=DEMO_SYSTEM, help="system prompt")
    p.add_argument("--answer-prefix", default="", help="text both models continue from")
    p.add_argument("--mode", default="nudging", choices=["nudging", "base_only", "nudger_only"])
    p.add_argument("--compare", action="store_true", help="print base_only, nudger_only and nudging answers")
    p.add_argument("--gate", default="top_prob", choices=["top_prob", "entropy"])
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--granularity", default="word", choices=["word", "token"])
    p.add_argument("--speculate", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    p.add_argument("--weights", default="auto", choices=["auto", "dense", "gguf", "gguf-q8"],
                   help="gguf: on the CPU, read linear weights from the GGUF blocks the models were converted "
                        "from (same values, ~5x fewer bytes); gguf-q8: the same with activations quantized to "
                        "int8 per block (faster, inexact); auto: gguf where every model allows it")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the base model across N processes (tensor parallelism; docs/PARALLEL.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer")


def marked_text(pieces: list[tuple[str, bool]], color: bool) -> str:
    """Text with the nudger's pieces marked: green on a terminal, [brackets] otherwise (adjacent
    pieces of one source are marked as one)."""
    runs: list[list] = []
    for text, nudged in pieces:
        if runs and runs[-1][1] == nudged:
            runs[-1][0] += text
        elif text:
            runs.append([text, nudged])
    out = []
    for text, nudged in runs:
        if not nudged:
            out.append(text)
        elif color:
            out.append(f"\033[32m{text}\033[0m")
        else:
            out.append(f"[{text}]")
    return "".join(out)


def _pieces(engine, completion, mode: str) -> list[tuple[str, bool]]:
    """(text, from_nudger) runs of an answer."""
    spans = completion.stats.get("spans")
    if spans is not None:  # cross-vocabulary results carry character spans
        return [(completion.text[a:b], nudged) for a, b, nudged in spans]
    if mode != "nudging":  # one model wrote it all, in its own vocabulary
        return [(completion.text, mode == "nudger_only")]
    tok = engine.nudger.tokenizer  # shared vocabulary: either tokenizer decodes it
    ids, flags = completion.token_ids, completion.from_nudger
    cuts = [i for i in range(1, len(flags)) if flags[i] != flags[i - 1]] + [len(flags)]
    pieces, prev, start = [], "", 0
    for cut in cuts:
        text = tok.decode(ids[:cut])
        pieces.append((text[len(prev):], flags[start]))
        prev, start = text, cut
    return pieces


def _resolve_models(args):
    if args.base or args.nudger:
        return args.base, args.nudger
    from .packaged import demo_pair

    print("nudgefast: using the offline demo pair (gemma-3-270m base, SmolLM2-135M-Instruct nudger); "
          "the first run converts them", file=sys.stderr)
    return demo_pair()


def _configs(args, modes) -> dict:
    """mode -> NudgeConfig, each checked (NudgeConfig validates its own ranges)."""
    from . import NudgeConfig

    configs = {}
    for mode in modes:
        try:
            configs[mode] = NudgeConfig(mode=mode, gate=args.gate, threshold=args.threshold,
                                        granularity=args.granularity,
                                        speculate=args.speculate if mode == "nudging" else 0,
                                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                        top_p=args.top_p, seed=args.seed)
        except ValueError as e:  # the options' values, re-stated as the user error they are
            raise BadValue(f"generate: {e}".replace("NudgeConfig: ", "")) from e
    return configs


def check_generate(args, prompts, configs) -> None:
    """Everything about a generate request that can be checked without the weights: prompts,
    device, weights option, the model directories' config.json, which models the modes need and
    whether the two tokenizers share a vocabulary (token granularity and speculation need one).
    Runs before any model is located, converted or loaded."""
    from .config import load_spec

    for i, q in enumerate(prompts):
        if not q.strip():
            raise BadValue(f"generate: prompt {i} is empty")
    check_device(args.device)
    tp = getattr(args, "tensor_parallel_size", 1)
    if tp < 1:
        raise BadValue(f"--tensor-parallel-size must be >= 1, got {tp}")
    if tp > 1 and args.weights == "gguf":
        raise BadValue("--tensor-parallel-size > 1 shards dense weights: use --weights dense (or auto)")
    if args.weights == "gguf" and (args.device != "cpu" or args.dtype not in (None, "float32")):
        raise BadValue("--weights gguf reads the GGUF blocks on the CPU in float32 only (use --device cpu and no "
                       "--dtype, or --weights dense)")
    demo = not (args.base or args.nudger)
    if not demo:
        for d in (args.base, args.nudger):
            if d:
                load_spec(d)  # config.json only: a missing or unreadable directory is named here
        check_tensor_parallel(args.base, tp)
        for mode in configs:
            need = {"base_only": ["base"], "nudger_only": ["nudger"], "nudging": ["base", "nudger"]}[mode]
            missing = [f"--{n}" for n in need if not getattr(args, n)]
            if missing:
                raise BadValue(f"generate: mode {mode} needs {' and '.join(missing)} (a model directory)")
    nudging = configs.get("nudging")
    if nudging is not None and _cross_vocabulary(args, demo):
        from .runner.crossvocab import check_crossvocab_config

        try:
            check_crossvocab_config(nudging)
        except ValueError as e:
            raise BadValue(f"generate: {e}" + (" (the demo pair has two tokenizers)" if demo else "")) from e


def check_tensor_parallel(base_dir, size: int) -> None:
    """--tensor-parallel-size against the base's shapes (config.json only), before anything loads."""
    if size > 1 and base_dir:
        from .config import load_spec
        from .parallel.tensor import check_shardable

        check_shardable(load_spec(base_dir), size)


def _cross_vocabulary(args, demo: bool) -> bool:
    """Whether the two models read different token ids, from their tokenizer files alone."""
    if demo:
        return True  # gemma-3 and SmolLM2: two families, two tokenizers
    from pathlib import Path

    from .tokenizer import Tokenizer

    dirs = [Path(args.base), Path(args.nudger)]
    if not all((d / "tokenizer.json").is_file() for d in dirs):
        return False
    a, b = (Tokenizer(d) for d in dirs)
    return not a.same_vocabulary(b)


def gguf_weights_possible(device: str, dtype: str | None, dirs) -> bool:
    """Whether weights="gguf" applies: CPU, float32, the native ops built, and every model directory
    converted from a GGUF file that is still where it was."""
    from .blocks import gguf_source
    from .config import ConfigError
    from .ops import native_ops_available

    if device != "cpu" or dtype not in (None, "float32") or not native_ops_available():
        return False
    try:
        for d in dirs:
            gguf_source(d)
    except ConfigError:
        return False
    return True


def _make_engine(args, base, nudger, **engine_kwargs):
    from . import NudgingEngine

    weights = args.weights
    tp = getattr(args, "tensor_parallel_size", 1)
    if weights == "auto" and tp > 1:
        weights = "dense"
    if weights == "auto":
        dirs = [d for d in (base, nudger) if d]
        weights = "gguf" if gguf_weights_possible(args.device, args.dtype, dirs) else "dense"
    print(f"nudgefast: weights={weights} on {args.device}", file=sys.stderr)
    return NudgingEngine(base=base, nudger=nudger, device=args.device, dtype=args.dtype, weights=weights,
                         tensor_parallel_size=tp, **engine_kwargs)


def token_counts(completion) -> tuple[int, int]:
    """(tokens emitted, of which by the nudger). Cross-vocabulary answers count each writer's own
    tokens (what max_new_tokens counts there); shared-vocabulary answers count their token_ids."""
    if "emitted_tokens" in completion.stats:
        return completion.stats["emitted_tokens"], completion.stats["nudged_tokens"]
    return len(completion.token_ids), sum(completion.from_nudger)


def summary_line(completion, tokens_per_s: float) -> str:
    tokens, nudged = token_counts(completion)
    frac = nudged / tokens if tokens else 0.0
    return (f"-- {tokens} tokens, nudged fraction {frac:.1%}, {tokens_per_s:.1f} tokens/s, "
            f"finish: {completion.finish_reason}")


def cmd_generate(args) -> int:
    from .kv_cache import KVPoolExhausted

    prompts = args.prompt or [DEMO_QUESTION]
    modes = ["base_only", "nudger_only", "nudging"] if args.compare else [args.mode]
    configs = _configs(args, modes)
    check_generate(args, prompts, configs)  # before any model is located or loaded
    base, nudger = _resolve_models(args)
    engine = _make_engine(args, base, nudger)
    results = {}  # mode -> (completions, tokens/s over the batch)
    for mode, cfg in configs.items():
        t0 = time.perf_counter()
        try:
            outs = engine.generate(prompts, cfg, system_prompt=args.system, answer_prefix=args.answer_prefix)
        except KVPoolExhausted as e:
            raise BadValue(f"generate: {e} (ask for fewer --max-new-tokens or fewer prompts)") from e
        except ValueError as e:  # the engine refused the request (e.g. a prompt longer than the model's context)
            raise BadValue(f"generate: {e}") from e
        elapsed = max(time.perf_counter() - t0, 1e-9)
        results[mode] = (outs, sum(token_counts(o)[0] for o in outs) / elapsed)
    engine.close()  # tensor-parallel workers stop here, not at interpreter exit
    color = sys.stdout.isatty() and not args.json
    for i, question in enumerate(prompts):
        if len(prompts) > 1 and not args.json:
            print(f"### {question}")
        for mode in modes:
            outs, tokens_per_s = results[mode]
            o = outs[i]
            if args.json:
                tokens, nudged = token_counts(o)
                print(json.dumps({"mode": mode, "prompt": question, "text": o.text, "token_ids": o.token_ids,
                                  "from_nudger": o.from_nudger, "finish_reason": o.finish_reason,
                                  "tokens": tokens, "nudged_fraction": nudged / tokens if tokens else 0.0,
                                  "tokens_per_s": tokens_per_s, "spans": o.stats.get("spans"),
                                  "stats": {k: v for k, v in o.stats.items()
                                            if k not in ("spans", "base_ids", "nudger_ids")}}))
                continue
            if args.compare:
                print(f"=== {mode} ===")
            print(marked_text(_pieces(engine, o, mode), color))
            print(summary_line(o, tokens_per_s))
    return 0


def cmd_convert(args) -> int:
    from .gguf import convert_gguf

    out = convert_gguf(args.gguf, args.out, dtype=args.dtype)
    print(out)
    return 0


def cmd_serve(args) -> int:
    from .serve.cli import check_args, engine_kwargs, run_server

    from .config import load_spec

    try:
        check_args(args)  # before any model is located or loaded
    except (ValueError, TypeError) as e:
        raise BadValue(f"serve: {e}") from e
    check_device(args.device)
    for d in (args.base, args.nudger):
        if d:
            load_spec(d)  # config.json only: a missing or unreadable directory is named here
    check_tensor_parallel(args.base, args.tensor_parallel_size)
    engine = _make_engine(args, *_resolve_models(args), **engine_kwargs(args))
    try:
        return run_server(args, engine)
    finally:
        engine.close()  # tensor-parallel workers stop with the server, not at interpreter exit


def main(argv=None) -> int:
    """`nudgefast ...`: every subcommand runs through errors.run_command, the one place where a user
    mistake becomes `nudgefast: error: ...` and exit status 2."""
    return run_command(_main, sys.argv[1:] if argv is None else list(argv))


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:  # bench parses its own options (argparse REMAINDER drops leading --flags)
        from .bench.cli import bench_command

        return bench_command(argv[1:])
    args = build_parser().parse_args(argv)
    if args.cmd == "generate":
        return cmd_generate(args)
    if args.cmd == "serve":
        return cmd_serve(args)
    return cmd_convert(args)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="nudgefast", description="fast nudging: a base LLM steered by a small "
                                                          "aligned model where it is unsure")
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="answer questions (nudging, or one of the baselines)")
    _add_generate_args(g)
    c = sub.add_parser("convert", help="GGUF file -> Hugging Face-layout model directory")
    c.add_argument("gguf")
    c.add_argument("out")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sub.add_parser("bench", help="benchmark scenarios (nudgefast bench --help)")
    from .serve.cli import add_serve_args

    add_serve_args(sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the serve extra)"))
    return parser


if __name__ == "__main__":
    sys.exit(main())
