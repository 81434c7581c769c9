"""Forwards per emitted token of the text-level path (runner/crossvocab.py) on the offline demo pair
(gemma-3-270m base, SmolLM2-135M-Instruct nudger, GGUF blocks, word level, greedy, 1 thread): each
model runs only where the rule reads it (tests/test_crossvocab.py checks the counts exactly).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/crossvocab_forwards.py
"""
import torch

import nudgefast as nf
from nudgefast.packaged import demo_pair


def main() -> None:
    torch.set_num_threads(1)
    base, nudger = demo_pair()
    engine = nf.NudgingEngine(base=base, nudger=nudger, weights="gguf", kv_cache_tokens=4096)
    questions = ["What are three tips for staying focused while studying?", "Why does sleep help learning?"]
    outs = engine.generate(questions, nf.NudgeConfig(max_new_tokens=64),
                           system_prompt="Answer the question helpfully and concisely.")
    for o in outs:
        s = o.stats
        emitted = s["emitted_tokens"]
        print({"emitted": emitted, "nudged": s["nudged_tokens"], "handovers": s["handovers"],
               "forwards": s["forwards"], "forward_tokens": s["forward_tokens"],
               "forwards_per_emitted": {m: round(v / emitted, 3) for m, v in s["forwards"].items()}})


if __name__ == "__main__":
    main()
