"""The offline demo, the README's main job: gemma-3-270m (base) nudged by SmolLM2-135M-Instruct,
two families with two tokenizers ("▁" SentencePiece-style and "Ġ" byte-level), through the
command's own code path, for a short answer.

Asserts what the cross-vocabulary design promises on real models: text from both models,
provenance spans that tile the text, and each model's ids equal to a fresh encoding of the final
text. One engine for the module (the models convert once into the cache on the first run).
"""
import json
import re

import pytest

import nudgefast as nf
from nudgefast import cli
from nudgefast.runner.crossvocab import encoder_for

pytestmark = pytest.mark.slow
NEW_TOKENS = 24
QUESTION = cli.DEMO_QUESTION


@pytest.fixture(scope="module")
def engine():
    from nudgefast.packaged import demo_pair

    base, nudger = demo_pair()
    # the weights the command picks by default (--weights auto): the GGUF blocks on the CPU
    weights = "gguf" if cli.gguf_weights_possible("cpu", None, [base, nudger]) else "dense"
    return nf.NudgingEngine(base=base, nudger=nudger, kv_cache_tokens=1024, weights=weights)


@pytest.fixture(scope="module")
def answer(engine):
    """The nudged demo answer, as the command asks for it."""
    cfg = nf.NudgeConfig(mode="nudging", max_new_tokens=NEW_TOKENS)
    (o,) = engine.generate([QUESTION], cfg, system_prompt=cli.DEMO_SYSTEM)
    return o


@pytest.fixture
def cli_engine(engine, monkeypatch):
    """The command, with the module's engine instead of a second copy of both models."""
    monkeypatch.setattr(cli, "_make_engine", lambda args, base, nudger: engine)
    return engine


def test_the_pair_differs_in_tokenizer(engine):
    assert not engine.base.tokenizer.same_vocabulary(engine.nudger.tokenizer)
    assert engine.base.spec.vocab_size != engine.nudger.spec.vocab_size


def test_answer_mixes_both_models_and_keeps_both_tokenizations_faithful(engine, answer):
    o = answer
    assert o.stats["crossvocab"]
    spans = o.stats["spans"]
    assert {nudged for _, _, nudged in spans} == {True, False}, spans  # text came from both models
    assert spans[0] == (0, spans[0][1], True)  # the nudger opens the answer
    # the spans tile the text, alternate sources and are never empty
    assert [a for a, _, _ in spans] == [0] + [b for _, b, _ in spans[:-1]] and spans[-1][1] == len(o.text)
    assert all(a < b for a, b, _ in spans) and all(x[2] != y[2] for x, y in zip(spans, spans[1:]))
    # each model's ids for the text are exactly a fresh encoding of it
    assert o.stats["base_ids"] == encoder_for(engine.base).codec.encode(o.text)
    assert o.stats["nudger_ids"] == encoder_for(engine.nudger).codec.encode(o.text)
    assert o.token_ids == o.stats["nudger_ids"]
    assert len(o.from_nudger) == len(o.token_ids) and 0 < sum(o.from_nudger) < len(o.from_nudger)
    # max_new_tokens counts the tokens each writer emitted
    assert o.stats["emitted_tokens"] <= NEW_TOKENS
    assert (o.finish_reason == "length") == (o.stats["emitted_tokens"] == NEW_TOKENS)
    assert 0 < o.stats["nudged_tokens"] < o.stats["emitted_tokens"]
    assert len(o.text.split()) >= 8  # a real answer
    # re-tokenization covers each model's last word and the new text, never the whole answer again
    assert o.stats["reencoded_chars"] <= 5 * len(o.text)


def test_command_prints_the_marked_answer_and_a_summary(cli_engine, answer, capsys):
    assert cli.main(["generate", "--max-new-tokens", str(NEW_TOKENS)]) == 0
    out = capsys.readouterr().out.splitlines()
    # not a terminal: the nudger's words in [brackets]
    expected = cli.marked_text([(answer.text[a:b], nudged) for a, b, nudged in answer.stats["spans"]], color=False)
    assert "\n".join(out[:-1]) == expected
    assert expected.startswith("[")
    m = re.fullmatch(r"-- (\d+) tokens, nudged fraction (\d+\.\d)%, (\d+\.\d) tokens/s, finish: (stop|length)", out[-1])
    assert m, out[-1]
    assert int(m[1]) == answer.stats["emitted_tokens"]
    assert float(m[2]) == pytest.approx(100 * answer.stats["nudged_tokens"] / answer.stats["emitted_tokens"], abs=0.05)
    assert float(m[3]) > 0


def test_command_compare_json_gives_the_three_answers(cli_engine, answer, capsys):
    assert cli.main(["generate", "--prompt", QUESTION, "--max-new-tokens", str(NEW_TOKENS), "--compare", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["mode"] for r in lines] == ["base_only", "nudger_only", "nudging"]
    base_only, nudger_only, nudging = lines
    assert base_only["nudged_fraction"] == 0.0 and not any(base_only["from_nudger"])
    assert nudger_only["nudged_fraction"] == 1.0 and all(nudger_only["from_nudger"])
    assert nudging["text"] == answer.text and nudging["spans"] == [list(s) for s in answer.stats["spans"]]
    assert 0.0 < nudging["nudged_fraction"] < 1.0
    for r in lines:
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["finish_reason"] in ("stop", "length")
    # the baselines answer in their own vocabularies
    assert base_only["text"] == cli_engine.base.tokenizer.decode(base_only["token_ids"])
    assert nudger_only["text"] == cli_engine.nudger.tokenizer.decode(nudger_only["token_ids"])


def test_command_reports_bad_requests(cli_engine, capsys):
    assert cli.main(["generate", "--prompt", "   "]) == 2
    assert "prompt 0 is empty" in capsys.readouterr().err
    assert cli.main(["generate", "--granularity", "token", "--max-new-tokens", "2"]) == 2
    assert "granularity='token' needs a shared vocabulary" in capsys.readouterr().err


def test_command_prints_a_baseline_in_its_own_vocabulary(cli_engine, capsys):
    assert cli.main(["generate", "--mode", "base_only", "--max-new-tokens", "6"]) == 0
    text, summary = capsys.readouterr().out.rsplit("\n", 2)[:2]
    cfg = nf.NudgeConfig(mode="base_only", max_new_tokens=6)
    (o,) = cli_engine.generate([QUESTION], cfg, system_prompt=cli.DEMO_SYSTEM)
    assert text == o.text == cli_engine.base.tokenizer.decode(o.token_ids)  # no brackets: the base wrote it
    assert summary.startswith("-- 6 tokens, nudged fraction 0.0%")


def test_marked_text_marks_runs_of_the_nudger():
    pieces = [("Sure", True), ("!", True), (" Here", False), (" is", False), (" how", True), ("", False)]
    assert cli.marked_text(pieces, color=False) == "[Sure!] Here is[ how]"
    assert cli.marked_text(pieces, color=True) == "\033[32mSure!\033[0m Here is\033[32m how\033[0m"
