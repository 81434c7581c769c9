"""Scripted checkpoints: real model directories (llama layout, loaded by the engine and by
transformers like any other) whose next-token logits depend only on the LAST input token, through a
table the test writes. Every position's candidates and gate statistics are then known exactly, so a
test can put a case on a chosen branch of the rule, or exactly on the gate's threshold.

How: attention and MLP outputs are zeroed (o_proj, down_proj), so the final hidden state is the
normed embedding of the last token; each scripted token gets its own basis vector as embedding,
and the output head maps that basis vector to the scripted logits. Logits not in the table sit at
LOW (-1000): exp(-1000) is 0 in float32 and float64, so a one-entry row has top probability exactly
1 and entropy exactly 0, and a row with two equal entries has top probability exactly 1/2.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import hf_config, write_tokenizer

LOW = -1000.0


def sure(token: int) -> dict[int, float]:
    """p(token) = 1 exactly, entropy 0."""
    return {token: 0.0}


def tie(a: int, b: int) -> dict[int, float]:
    """Two tokens at probability 1/2 each (argmax: the lower id)."""
    return {a: 0.0, b: 0.0}


def unsure(token: int, *others: int) -> dict[int, float]:
    """token is the argmax, with clearly less than 0.4 of the mass (the others are close behind)."""
    row = {o: -0.1 for o in others}
    row[token] = 0.0
    return row


def make_scripted(out: Path, tokenizer, table: dict[int, dict[int, float]], *, eos_id: int,
                  chat_template: str | None = None, extra_vocab: int = 0) -> Path:
    """Write a llama checkpoint whose logits after token x are table[x] (others LOW).

    Tokens that are not keys of the table have a zero embedding, hence all-equal logits: scripts
    must not rely on them. eos_id goes into config.json and generation_config.json. extra_vocab
    adds embedding rows past the tokenizer (padding rows, as real models have).
    """
    import transformers as tf

    from tiny_models import CHAT_TEMPLATE

    vocab = tokenizer.get_vocab_size() + extra_vocab
    cfg = hf_config("llama", vocab)
    cfg.eos_token_id = eos_id
    if len(table) > cfg.hidden_size:
        raise ValueError(f"at most {cfg.hidden_size} scripted tokens, got {len(table)}")
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = eos_id
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        head = model.lm_head.weight  # [V, H]
        emb.zero_()
        # the final norm maps the basis vector e_k to c * e_k
        c = float(1.0 / torch.sqrt(torch.tensor(1.0 / cfg.hidden_size + cfg.rms_norm_eps)))
        head.fill_(LOW / c)
        for k, (x, row) in enumerate(table.items()):
            emb[x, k] = 1.0
            for j, logit in row.items():
                head[j, k] = logit / c
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out, tokenizer, CHAT_TEMPLATE if chat_template is None else chat_template)
    return out
