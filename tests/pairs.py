"""Tiny base + nudger pairs sharing a tokenizer, one per family, tuned so the gate flips."""
from __future__ import annotations

import nudgefast as nf
from tiny_models import load_hf, make_tiny

# Per family: the logit scale (through the head or the final norm), the nudger's seed, and the
# gate thresholds per (gate, granularity), chosen so that every case mixes both sources. Word
# granularity keeps the nudger longer (until a word start), so it gets looser thresholds.
CASES = {
    "llama": (9.0, 2, {"top_prob": (0.5, 0.4), "entropy": (1.5, 2.0)}),
    "qwen2": (7.5, 2, {"top_prob": (0.5, 0.3), "entropy": (1.5, 2.0)}),
    "olmo": (9.0, 2, {"top_prob": (0.6, 0.3), "entropy": (1.0, 2.0)}),
    "olmo2": (7.5, 2, {"top_prob": (0.6, 0.4), "entropy": (1.0, 2.0)}),
    "gemma2": (8.0, 4, {"top_prob": (0.7, 0.3), "entropy": (1.0, 2.5)}),
    "gemma3": (8.0, 3, {"top_prob": (0.6, 0.3), "entropy": (1.0, 2.0)}),
}
# Sampled cases that mix both sources, per family: (granularity, temperature). With sampling, word
# granularity hands back to the base only when the nudger draws a word start; qwen2's nudger keeps
# drawing one non-word-start token at any temperature, so its sampled cases run at token granularity.
SAMPLED = {"qwen2": ("token", 0.5), "gemma2": ("word", 0.5)}
PROMPTS_BASE = [[40, 41, 42, 43, 44, 45, 46, 47, 48], [200, 17, 5], [9, 8, 7, 6, 5, 4, 3, 60, 61, 62, 63, 64, 65, 66]]
PROMPTS_NUDGER = [[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 2], [1, 200, 17, 5, 2, 1], [9, 8, 7, 6, 5, 4, 3, 60, 61]]


def threshold(family: str, gate: str, granularity: str) -> float:
    return CASES[family][2][gate][granularity == "word"]


def make_pair(family: str, root, tokenizer, with_hf: bool = True, **engine_kwargs):
    head_scale, nudger_seed, _ = CASES[family]
    base = make_tiny(family, root / "base", seed=1, tokenizer=tokenizer, head_scale=head_scale)
    nudger = make_tiny(family, root / "nudger", seed=nudger_seed, tokenizer=tokenizer, head_scale=head_scale)
    engine = nf.NudgingEngine(base=base, nudger=nudger, page_size=4, **engine_kwargs)
    hf = (load_hf(base), load_hf(nudger)) if with_hf else (None, None)
    return family, engine, hf[0], hf[1], tokenizer


def sampled(family: str) -> dict:
    """NudgeConfig fields of a sampled case that mixes both sources for this family's pair."""
    granularity, temperature = SAMPLED.get(family, ("word", 0.8))
    return dict(granularity=granularity, temperature=temperature,
                threshold=threshold(family, "top_prob", granularity))
