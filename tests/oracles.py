"""Test oracles for the two pieces of the nudging rule that come from files, written straight from
DESIGN.md section 1 and independent of the engine's code (nudgefast/tokenizer.py, engine/,
runner/crossvocab.py): a test that builds its expectations with the engine's own helpers cannot see a
mistake in them.

- word starts: a token whose vocabulary string begins with "Ġ", "▁" or " "; ids past the
  tokenizer's vocabulary are not word starts. Read from tokenizer.json as plain JSON.
- stop ids: the user's stop_token_ids if given, else the union of both models' EOS ids
  (generation_config.json, then config.json) and the nudger's end-of-turn token when its vocabulary
  has one. Across tokenizers (crossvocab_reference.py): each model's own EOS ids and end-of-turn
  token; the user's ids are the nudger's.
"""
from __future__ import annotations

import json
from pathlib import Path

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def vocabulary(model_dir) -> dict[int, str]:
    """id -> token string of tokenizer.json: the model's vocabulary and the added tokens."""
    data = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
        strings = {i: piece for i, (piece, _score) in enumerate(vocab)}
    else:
        strings = {i: s for s, i in vocab.items()}
    for added in data.get("added_tokens", []):
        strings[added["id"]] = added["content"]
    return strings


def flags_from_strings(strings: dict[int, str], size: int) -> list[bool]:
    """The word-start flag of every id in [0, size) by the definition, given id -> token string."""
    return [i in strings and strings[i][:1] in ("\u0120", "\u2581", " ") for i in range(size)]


def word_start_flags(model_dir, size: int) -> list[bool]:
    """The word-start flag of every id in [0, size), from the model directory's tokenizer.json."""
    return flags_from_strings(vocabulary(model_dir), size)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def eos_ids(model_dir) -> set[int]:
    d = Path(model_dir)
    gen = d / "generation_config.json"
    if gen.is_file():
        ids = _ids(json.loads(gen.read_text()).get("eos_token_id"))
        if ids:
            return set(ids)
    return set(_ids(json.loads((d / "config.json").read_text()).get("eos_token_id")))


def end_of_turn_id(model_dir) -> int | None:
    by_string = {s: i for i, s in vocabulary(model_dir).items()}
    for s in END_OF_TURN:
        if s in by_string:
            return by_string[s]
    return None


def eos_and_end_of_turn(model_dir) -> set[int]:
    eot = end_of_turn_id(model_dir)
    return eos_ids(model_dir) | ({eot} if eot is not None else set())


def shared_vocab_stop_ids(base_dir, nudger_dir, stop_token_ids=None) -> set[int]:
    """Stop ids of nudging with a shared vocabulary."""
    if stop_token_ids is not None:
        return set(stop_token_ids)
    return eos_ids(base_dir) | eos_and_end_of_turn(nudger_dir)
