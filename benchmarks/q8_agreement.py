"""How often weights="gguf-q8" (activations quantized to int8 per block) writes the tokens of the exact
weights="gguf" path, greedy, base-only, on the real offline models.

    .venv/bin/python benchmarks/q8_agreement.py [--new-tokens 128] [--out benchmarks/results/kernels/q8-agreement.json]

Prompts: the `nudgefast bench` passage and first question (about 128 tokens), and the first
--chat-prompts bench questions in the model's chat template. Reported per model and prompt: the common prefix (tokens equal from
the start) and the share of equal positions. Greedy decoding amplifies one flipped argmax into a
different continuation, so the common prefix is the figure that matters.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chat-prompts", type=int, default=2, help="how many of the bench QUESTIONS to ask in chat form")
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import nudgefast as nf
    from nudgefast.bench.report import device_info, git_info
    from nudgefast.bench.runners import PASSAGE, QUESTIONS, SYSTEM
    from nudgefast.packaged import packaged_model_dir

    rows = []
    for name in ("smollm2-135m-instruct", "gemma-3-270m"):
        d = packaged_model_dir(name)
        engines = {w: nf.NudgingEngine(base=d, weights=w, kv_cache_tokens=1024) for w in ("gguf", "gguf-q8")}
        tok = engines["gguf"].base.tokenizer
        prompts = {"passage": tok.encode(PASSAGE * 2, add_special_tokens=True)[:112] +
                   tok.encode(f"\n{QUESTIONS[0]}\n", add_special_tokens=False)}
        if tok.chat_template:
            for i, q in enumerate(QUESTIONS[:args.chat_prompts]):
                prompts[f"chat{i}"] = tok.encode(tok.render_chat(SYSTEM, q, ""), add_special_tokens=False)
        cfg = nf.NudgeConfig(mode="base_only", max_new_tokens=args.new_tokens, stop_token_ids=[])
        for label, ids in prompts.items():
            outs = {w: e.generate_ids([ids], None, cfg)[0].token_ids for w, e in engines.items()}
            a, b = outs["gguf"], outs["gguf-q8"]
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            rows.append({"model": name, "prompt": label, "prompt_tokens": len(ids), "tokens": len(a),
                         "common_prefix": first, "equal_positions": sum(x == y for x, y in zip(a, b)) / max(1, len(a))})
            print(f"{name:24} {label:8} common prefix {first:4}/{len(a)}  equal positions {rows[-1]['equal_positions']:.0%}",
                  flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": "benchmarks/q8_agreement.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "git": git_info(), "device": device_info("cpu"), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
