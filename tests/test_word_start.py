"""Word starts (DESIGN.md section 1): a token whose vocabulary string begins with "Ġ", "▁" or " ";
ids past the tokenizer's vocabulary (embedding padding rows) are not word starts.

The engine's table (Tokenizer.word_start_table, used by the gate, the accept kernel and the
cross-vocabulary path) is checked against literal flags written by hand for a small vocabulary,
and against tests/oracles.py (the definition applied to tokenizer.json read as plain JSON) for a
byte-level BPE and SentencePiece-style vocabularies.
"""
import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from nudgefast.crossvocab_reference import TextCodec
from nudgefast.tokenizer import Tokenizer
from oracles import word_start_flags
from test_crossvocab import train_sentencepiece_style
from tiny_models import train_tokenizer, write_tokenizer

# token string -> is it a word start, by hand
HAND = [
    ("<unk>", False), ("\u0120the", True), ("the", False), ("\u2581the", True), (" the", True), (".", False),
    (",", False), ("!", False), ("?", False), (":", False), ("\u0120", True), ("\u2581", True), ("\u0120.", True),
    ("\n", False), ("\u0120\u0120", True), ("t\u0120", False), ("-", False), ("\u2581,", True), ("42", False),
    ("\u010a", False),  # byte-level "\n"
]
PAST = 5  # embedding rows past the vocabulary


def test_hand_written_flags(tmp_path):
    vocab = {s: i for i, (s, _) in enumerate(HAND)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(["<|im_end|>"])  # an added token, id len(HAND): not a word start
    write_tokenizer(tmp_path, tok)
    table = Tokenizer(tmp_path).word_start_table(len(HAND) + 1 + PAST).tolist()
    assert table == [flag for _, flag in HAND] + [False] + [False] * PAST
    assert word_start_flags(tmp_path, len(HAND) + 1 + PAST) == table  # the oracle agrees with the hand


TOKENIZERS = {
    "bytelevel": lambda: train_tokenizer(320),
    "gemma_style": lambda: train_sentencepiece_style(300, prepend_space=False),
    "llama2_style": lambda: train_sentencepiece_style(300, prepend_space=True),
}


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_table_equals_the_definition(tmp_path, name):
    write_tokenizer(tmp_path, TOKENIZERS[name]())
    tok = Tokenizer(tmp_path)
    size = tok.vocab_size + PAST
    expected = word_start_flags(tmp_path, size)
    assert tok.word_start_table(size).tolist() == expected
    assert tok.word_start_table(size).tolist() == expected  # the cached copy too
    assert 20 < sum(expected) < tok.vocab_size - 20  # both kinds are plentiful
    # the text-level path's view: the same flags, nothing at or past the vocabulary rows, nor below 0
    codec = TextCodec(tok, size)
    assert [codec.word_start(i) for i in range(-2, size + 3)] == [False, False] + expected + [False] * 3
    # punctuation is never a word start in these vocabularies
    strings = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    for p in ".,!?:":
        if p in strings:
            assert not expected[strings[p]]
