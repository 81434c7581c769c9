"""Command line: `nudgefast generate | convert | bench`."""
from __future__ import annotations

import argparse
import json
import sys
import time

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


def _make_engine(args, base, nudger):
    from . import NudgingEngine

    weights = args.weights
    if weights == "auto":
        dirs = [d for d in (base, nudger) if d]
        weights = "gguf" if gguf_weights_possible(args.device, args.dtype, dirs) else "dense"
    print(f"nudgefast: weights={weights} on {args.device}", file=sys.stderr)
    return NudgingEngine(base=base, nudger=nudger, device=args.device, dtype=args.dtype, weights=weights)


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
    from . import NudgeConfig
    from .config import ConfigError

    prompts = args.prompt or [DEMO_QUESTION]
    modes = ["base_only", "nudger_only", "nudging"] if args.compare else [args.mode]
    results = {}  # mode -> (completions, tokens/s over the batch)
    try:
        base, nudger = _resolve_models(args)
        engine = _make_engine(args, base, nudger)
        for mode in modes:
            cfg = NudgeConfig(mode=mode, gate=args.gate, threshold=args.threshold, granularity=args.granularity,
                              speculate=args.speculate if mode == "nudging" else 0,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
            t0 = time.perf_counter()
            outs = engine.generate(prompts, cfg, system_prompt=args.system, answer_prefix=args.answer_prefix)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            results[mode] = (outs, sum(token_counts(o)[0] for o in outs) / elapsed)
    except (ValueError, TypeError, ConfigError) as e:
        print(f"nudgefast: error: {e}", file=sys.stderr)
        return 2
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # bench parses its own options (argparse REMAINDER drops leading --flags)
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="nudgefast", description="fast nudging: a base LLM steered by a small "
                                                                   "aligned model where it is unsure")
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="answer questions (nudging, or one of the baselines)")
    _add_generate_args(g)
    c = sub.add_parser("convert", help="GGUF file -> Hugging Face-layout model directory")
    c.add_argument("gguf")
    c.add_argument("out")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    b = sub.add_parser("bench", help="benchmark scenarios (see nudgefast/bench/)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd == "generate":
        return cmd_generate(args)
    if args.cmd == "convert":
        return cmd_convert(args)
    from .bench import main as bench_main

    return bench_main(args.rest)


if __name__ == "__main__":
    sys.exit(main())
