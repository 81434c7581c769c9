"""Nudging across tokenizers: the fast path (nudgefast/runner/crossvocab.py: paged caches, batched rows,
incremental re-tokenization from anchors) equals the readable reference
(nudgefast/crossvocab_reference.py: logits recomputed from scratch by transformers, every model's
ids a fresh encoding of the whole text at every step) in text, provenance spans, each model's ids,
emitted-token counts and finish reasons.

Tiny random models of different families with different tokenizers, trained on the same text:
byte-level BPEs ("Ġ") of different vocabulary sizes, a Gemma-style SentencePiece BPE ("▁", no
pre-tokenizer, no prefix space) and a Llama-2-style one (a "▁" prepended to the text, stripped by
the decoder). Every equality case asserts that both models wrote part of the batch's text, and
`assert_consistent` checks the invariant the design rests on: each model's ids equal a fresh
encoding of the final text.
"""
import random

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

import nudgefast as nf
from nudgefast.runner.crossvocab import WindowEncoder, crossvocab_slack, crossvocab_stop_ids, encoder_for
from nudgefast.crossvocab_reference import Party, TextCodec, reference_crossvocab
from nudgefast.engine.engine import row_seeds
from nudgefast.tokenizer import Tokenizer
from oracles import eos_and_end_of_turn, word_start_flags
from tiny_models import CORPUS, SPECIALS, load_hf, make_tiny, train_tokenizer, write_tokenizer

NEW_TOKENS = 24


def train_sentencepiece_style(vocab_size: int, prepend_space: bool):
    """A SentencePiece-style BPE: spaces spelt "▁", merges learnt within words, and at encoding time
    no pre-tokenizer (BPE over the whole text, as Gemma's tokenizer.json does). prepend_space gives
    the Llama-2 convention: a "▁" put in front of the text and stripped again by the decoder."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    prepend = [normalizers.Prepend("\u2581")] if prepend_space else []
    tok.normalizer = normalizers.Sequence(prepend + [normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + ["<unk>"], show_progress=False,
                                  initial_alphabet=sorted(set(CORPUS.replace(" ", "\u2581"))))
    tok.train_from_iterator([CORPUS] * 20, trainer)
    tok.pre_tokenizer = None
    steps = [decoders.Replace("\u2581", " "), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prepend_space else []))
    return tok


TOKENIZERS = {
    "bytelevel320": lambda: train_tokenizer(320),
    "bytelevel400": lambda: train_tokenizer(400),
    "bytelevel262": lambda: train_tokenizer(262),  # almost no merges: many tokens per word
    "gemma_style": lambda: train_sentencepiece_style(300, prepend_space=False),
    "llama2_style": lambda: train_sentencepiece_style(300, prepend_space=True),
}

# name: (base family, base tokenizer, nudger family, nudger tokenizer, base head scale, nudger head
# scale, top_prob threshold), tuned so that every case mixes both sources.
PAIRS = {
    "gemma_base_bytelevel_nudger": ("gemma3", "gemma_style", "llama", "bytelevel320", 8.0, 9.0, 0.7),
    "bytelevel_sizes": ("olmo2", "bytelevel400", "llama", "bytelevel320", 7.5, 9.0, 0.6),
    "llama2_style_nudger": ("llama", "bytelevel400", "olmo", "llama2_style", 9.0, 8.0, 0.6),
}
QUESTIONS = ["Please explain how to bake bread.", "What is six times seven?", "To be or not to be?"]


@pytest.fixture(scope="module")
def tokenizers():
    return {name: make() for name, make in TOKENIZERS.items()}


def build_pair(root, tokenizers, base_family, base_tok, nudger_family, nudger_tok, base_scale, nudger_scale,
               **engine_kwargs):
    base = make_tiny(base_family, root / "base", seed=1, tokenizer=tokenizers[base_tok], head_scale=base_scale,
                     extra_vocab=3)
    nudger = make_tiny(nudger_family, root / "nudger", seed=2, tokenizer=tokenizers[nudger_tok],
                       head_scale=nudger_scale)
    engine = nf.NudgingEngine(base=base, nudger=nudger, page_size=4, kv_cache_tokens=1024, **engine_kwargs)
    return engine, load_hf(base), load_hf(nudger)


@pytest.fixture(scope="module", params=list(PAIRS))
def pair(request, tmp_path_factory, tokenizers):
    spec = PAIRS[request.param]
    engine, hf_base, hf_nudger = build_pair(tmp_path_factory.mktemp(request.param), tokenizers, *spec[:6])
    return request.param, engine, hf_base, hf_nudger, spec[6]


def prompts_for(engine, questions):
    """Prompt ids as NudgingEngine.generate builds them (prompts.py)."""
    from nudgefast.prompts import build_prompts

    cfg = nf.NudgeConfig(mode="nudging")
    return build_prompts(engine, questions, cfg, "Answer the question.", "")


def hf_logits_fn(model):
    def fn(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1].float()
    return fn


def oracle_codec(loaded):
    """The reference's view of a model's tokenizer, with word starts by the definition
    (tests/oracles.py) rather than the engine's table."""
    codec = TextCodec(Tokenizer(loaded.dir), loaded.spec.vocab_size)
    codec.word_starts = word_start_flags(loaded.dir, loaded.spec.vocab_size)
    return codec


def run_reference(engine, hf_base, hf_nudger, config, base_prompts, nudger_prompts):
    """The reference with each model's stop ids by the definition, read from its files: the base's
    EOS ids and end-of-turn token; the nudger's the same unless the user gave stop ids."""
    base_stop = frozenset(eos_and_end_of_turn(engine.base.dir))
    nudger_stop = frozenset(config.stop_token_ids if config.stop_token_ids is not None
                            else eos_and_end_of_turn(engine.nudger.dir))
    assert (base_stop, nudger_stop) == crossvocab_stop_ids(engine, config)  # the fast path resolves the same sets
    codecs = oracle_codec(engine.base), oracle_codec(engine.nudger)
    seeds = row_seeds(config.seed, len(base_prompts)) if config.seed is not None else [0] * len(base_prompts)
    out = []
    for bp, np_, seed in zip(base_prompts, nudger_prompts, seeds):
        base = Party(codecs[0], bp, hf_logits_fn(hf_base), base_stop)
        nudger = Party(codecs[1], np_, hf_logits_fn(hf_nudger), nudger_stop)
        out.append(reference_crossvocab(base, nudger, config, seed))
    return out


def assert_same(outs, refs):
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.text == r.text
        assert o.stats["spans"] == r.spans
        assert o.stats["base_ids"] == r.base_ids
        assert o.stats["nudger_ids"] == r.nudger_ids
        assert (o.stats["emitted_tokens"], o.stats["nudged_tokens"]) == (r.emitted, r.emitted_by_nudger)
        assert o.finish_reason == r.finish_reason


def assert_consistent(engine, outs, config):
    """The invariants of a cross-vocabulary Completion."""
    base_codec, nudger_codec = encoder_for(engine.base).codec, encoder_for(engine.nudger).codec
    for o in outs:
        # each model's ids are the fresh encoding of the final text
        assert o.stats["base_ids"] == base_codec.encode(o.text)
        assert o.stats["nudger_ids"] == nudger_codec.encode(o.text)
        assert o.token_ids == o.stats["nudger_ids"] and len(o.from_nudger) == len(o.token_ids)
        # the spans tile the text and alternate sources
        spans = o.stats["spans"]
        assert [a for a, _, _ in spans] == ([0] + [b for _, b, _ in spans[:-1]] if spans else [])
        assert (spans[-1][1] if spans else 0) == len(o.text)
        assert all(a < b for a, b, _ in spans)
        assert all(x[2] != y[2] for x, y in zip(spans, spans[1:]))
        # max_new_tokens counts emitted tokens of either model
        assert o.stats["emitted_tokens"] <= config.max_new_tokens
        assert (o.finish_reason == "length") == (o.stats["emitted_tokens"] == config.max_new_tokens)


def assert_mixed(outs, low=0.15, high=0.85):
    emitted = sum(o.stats["emitted_tokens"] for o in outs)
    nudged = sum(o.stats["nudged_tokens"] for o in outs)
    assert low <= nudged / emitted <= high, f"nudged fraction {nudged / emitted:.2f}: the gate is not exercised"
    assert any(len({s[2] for s in o.stats["spans"]}) == 2 for o in outs)


def test_greedy_equals_reference_single_and_batched(pair):
    name, engine, hf_base, hf_nudger, threshold = pair
    cfg = nf.NudgeConfig(mode="nudging", threshold=threshold, max_new_tokens=NEW_TOKENS)
    base_prompts, nudger_prompts = prompts_for(engine, QUESTIONS)
    refs = run_reference(engine, hf_base, hf_nudger, cfg, base_prompts, nudger_prompts)
    batch = engine.generate_ids(base_prompts, nudger_prompts, cfg)
    assert_same(batch, refs)
    assert_consistent(engine, batch, cfg)
    assert_mixed(batch)
    for i in range(len(QUESTIONS)):  # a row alone equals the same row in the batch
        alone = engine.generate_ids([base_prompts[i]], [nudger_prompts[i]], cfg)
        assert_same(alone, [refs[i]])
    assert engine.base.kv.allocator.num_free == engine.base.kv.num_pages
    assert engine.nudger.kv.allocator.num_free == engine.nudger.kv.num_pages


def test_each_model_runs_only_where_the_rule_reads_it(pair):
    """The text-level path is lazy by construction: each forward of a row serves one candidate the
    rule reads, and a model that did not write catches up on the other's text in one chunk. So its
    forward count per model equals the logits the reference reads (it computes them only where the
    rule needs them), and the forwards of both models together stay under two per emitted token."""
    name, engine, hf_base, hf_nudger, threshold = pair
    cfg = nf.NudgeConfig(mode="nudging", threshold=threshold, max_new_tokens=NEW_TOKENS)
    base_prompts, nudger_prompts = prompts_for(engine, QUESTIONS)
    outs = engine.generate_ids(base_prompts, nudger_prompts, cfg)
    for o, bp, np_ in zip(outs, base_prompts, nudger_prompts):
        reads = {"base": 0, "nudger": 0}

        def counted(model, who):
            fn = hf_logits_fn(model)

            def wrapped(ids):
                reads[who] += 1
                return fn(ids)
            return wrapped

        base_stop = frozenset(eos_and_end_of_turn(engine.base.dir))
        nudger_stop = frozenset(eos_and_end_of_turn(engine.nudger.dir))
        ref = reference_crossvocab(Party(oracle_codec(engine.base), bp, counted(hf_base, "base"), base_stop),
                                   Party(oracle_codec(engine.nudger), np_, counted(hf_nudger, "nudger"), nudger_stop),
                                   cfg, 0)
        assert o.text == ref.text
        assert o.stats["forwards"] == reads
        assert reads["base"] + reads["nudger"] < 2 * o.stats["emitted_tokens"]


def test_seeded_sampling_equals_reference_and_repeats(pair):
    name, engine, hf_base, hf_nudger, threshold = pair
    cfg = nf.NudgeConfig(mode="nudging", threshold=threshold, temperature=0.8, top_p=0.9, seed=11,
                         max_new_tokens=16)
    base_prompts, nudger_prompts = prompts_for(engine, QUESTIONS)
    a = engine.generate_ids(base_prompts, nudger_prompts, cfg)
    b = engine.generate_ids(base_prompts, nudger_prompts, cfg)
    assert [o.text for o in a] == [o.text for o in b]
    assert_same(a, run_reference(engine, hf_base, hf_nudger, cfg, base_prompts, nudger_prompts))
    assert_consistent(engine, a, cfg)
    assert_mixed(a, 0.05, 0.95)


def test_nudger_stop_ends_the_answer(pair):
    """A stop id of the nudger's vocabulary ends the answer without entering the text; the base's
    own stop ids only hand the position over."""
    name, engine, hf_base, hf_nudger, threshold = pair
    base_prompts, nudger_prompts = prompts_for(engine, QUESTIONS)
    cfg = nf.NudgeConfig(mode="nudging", threshold=threshold, max_new_tokens=NEW_TOKENS)
    first = engine.generate_ids(base_prompts, nudger_prompts, cfg)
    # stop on the nudger's tokens of its later words: the answers must end earlier
    later = {t for o in first for t, nudged in zip(o.token_ids[1:], o.from_nudger[1:]) if nudged}
    later -= {o.token_ids[0] for o in first if o.token_ids}
    cfg = nf.NudgeConfig(mode="nudging", threshold=threshold, max_new_tokens=NEW_TOKENS, stop_token_ids=sorted(later))
    outs = engine.generate_ids(base_prompts, nudger_prompts, cfg)
    assert_same(outs, run_reference(engine, hf_base, hf_nudger, cfg, base_prompts, nudger_prompts))
    assert_consistent(engine, outs, cfg)
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert stopped and all(o.stats["emitted_tokens"] < NEW_TOKENS for o in stopped)


def test_text_api_routes_to_the_crossvocab_path(pair):
    name, engine, hf_base, hf_nudger, threshold = pair
    cfg = nf.NudgeConfig(mode="nudging", threshold=threshold, max_new_tokens=NEW_TOKENS)
    outs = engine.generate(QUESTIONS, cfg, system_prompt="Answer the question.")
    assert all(o.stats.get("crossvocab") for o in outs)
    base_prompts, nudger_prompts = prompts_for(engine, QUESTIONS)
    direct = engine.generate_ids(base_prompts, nudger_prompts, cfg)
    assert [o.text for o in outs] == [o.text for o in direct]
    # the baselines on a cross-family engine: each model alone, in its own vocabulary
    for mode, side, flag in (("base_only", engine.base, False), ("nudger_only", engine.nudger, True)):
        (o,) = engine.generate(QUESTIONS[:1], nf.NudgeConfig(mode=mode, max_new_tokens=8, stop_token_ids=[]),
                               system_prompt="Answer the question.")
        assert "crossvocab" not in o.stats and all(f is flag for f in o.from_nudger)
        assert o.text == side.tokenizer.decode(o.token_ids)


def test_rows_that_outgrow_their_pages_get_more(tmp_path, tokenizers):
    """The base's tokenizer has almost no merges, so its ids for the nudger's words outnumber the
    emitted tokens by more than the reserved slack: pages are added at word boundaries."""
    engine, hf_base, hf_nudger = build_pair(tmp_path, tokenizers, "gemma2", "bytelevel262", "llama", "bytelevel400",
                                            1.0, 9.0)
    cfg = nf.NudgeConfig(mode="nudging", threshold=0.99, max_new_tokens=NEW_TOKENS)  # the nudger writes it all
    base_prompts, nudger_prompts = prompts_for(engine, QUESTIONS[:2])
    outs = engine.generate_ids(base_prompts, nudger_prompts, cfg)
    assert_same(outs, run_reference(engine, hf_base, hf_nudger, cfg, base_prompts, nudger_prompts))
    assert_consistent(engine, outs, cfg)
    page = engine.base.kv.page_size
    reserved = [engine.base.kv.pages_for(len(p) + NEW_TOKENS + crossvocab_slack(NEW_TOKENS)) * page for p in base_prompts]
    assert any(len(p) + len(o.stats["base_ids"]) > r for p, o, r in zip(base_prompts, outs, reserved))
    assert engine.base.kv.allocator.num_free == engine.base.kv.num_pages


# ---- re-tokenization from anchors, without models ------------------------------------------------

WORDS = ["the", "The", "answer", "is", "42", "1.", "First,", "hello", "world!", "Here's", "how:", "\n", "\n\n",
         "  ", "héllo", "日本語", "<b>", "> </", "don't", "**Step", "3.14", "\t", "(", ".", ",", "\u2581", "\ufffd"]


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_window_encoding_equals_fresh_encoding(tmp_path, tokenizers, name):
    """Appending random text piece by piece and re-encoding only from the last anchor gives the
    fresh encoding of the whole text every time, with windows that stay short."""
    write_tokenizer(tmp_path, tokenizers[name])
    tok = Tokenizer(tmp_path)
    codec = TextCodec(tok, tok.vocab_size)
    enc = WindowEncoder(codec)
    assert enc.prepends_space == (name == "llama2_style")
    rng = random.Random(0)
    longest = 0
    for _ in range(60):
        text, ids, anchor_tok, anchor_char = "", [], 0, 0
        for _ in range(25):
            text += "".join(rng.choice([" ", " ", "", "\n"]) + rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
            new, starts, anchors = enc.window(text, anchor_char)
            longest = max(longest, len(text) - anchor_char)
            ids[anchor_tok:] = new
            if anchors:
                anchor_tok, anchor_char = anchor_tok + anchors[-1], starts[anchors[-1]]
            assert ids == codec.encode(text), repr(text)
    assert longest < 120  # about a word plus what was appended, never the whole text


# ---- bad input ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_pair(tmp_path_factory, tokenizers):
    engine, _, _ = build_pair(tmp_path_factory.mktemp("small"), tokenizers, "gemma3", "gemma_style", "llama",
                              "bytelevel320", 8.0, 9.0)
    return engine


def test_nudger_without_chat_template_is_refused(tmp_path, tokenizers):
    base = make_tiny("gemma3", tmp_path / "base", tokenizer=tokenizers["gemma_style"])
    nudger = make_tiny("llama", tmp_path / "nudger", tokenizer=tokenizers["bytelevel320"], chat_template=None)
    engine = nf.NudgingEngine(base=base, nudger=nudger, page_size=4, kv_cache_tokens=256)
    with pytest.raises(nf.ConfigError, match="no chat_template"):
        engine.generate(["How do I bake bread?"], nf.NudgeConfig(mode="nudging", max_new_tokens=4))
    assert engine.base.kv.allocator.num_free == engine.base.kv.num_pages
    # the base model alone needs no chat template
    (o,) = engine.generate(["How do I bake bread?"], nf.NudgeConfig(mode="base_only", max_new_tokens=4))
    assert o.finish_reason in ("stop", "length")


def test_tokenizer_that_does_not_match_its_model(tmp_path, tokenizers):
    base = make_tiny("gemma3", tmp_path / "base", tokenizer=tokenizers["gemma_style"])
    nudger = make_tiny("llama", tmp_path / "nudger", tokenizer=tokenizers["bytelevel320"])
    tokenizers["bytelevel400"].save(str(nudger / "tokenizer.json"))  # 400 tokens for 320 embedding rows
    with pytest.raises(nf.ConfigError, match=r"tokenizer.json has 400 tokens but the model has only 320"):
        nf.NudgingEngine(base=base, nudger=nudger)


@pytest.mark.parametrize("questions, kwargs, error, match", [
    ([""], {}, ValueError, "prompt 0 is empty"),
    (["ok", "   "], {}, ValueError, "prompt 1 is empty"),
    ([], {}, ValueError, "at least one prompt"),
    ([3], {}, TypeError, "prompt 0 is int"),
    (["ok"], dict(granularity="token"), ValueError, "granularity='token' needs a shared vocabulary"),
    (["ok"], dict(speculate=2), ValueError, "speculate=2 needs a shared vocabulary"),
])
def test_bad_requests(small_pair, questions, kwargs, error, match):
    with pytest.raises(error, match=match):
        small_pair.generate(questions, nf.NudgeConfig(mode="nudging", max_new_tokens=4, **kwargs))
    assert small_pair.base.kv.allocator.num_free == small_pair.base.kv.num_pages
    assert small_pair.nudger.kv.allocator.num_free == small_pair.nudger.kv.num_pages


def test_bad_prompt_ids(small_pair):
    cfg = nf.NudgeConfig(mode="nudging", max_new_tokens=4)
    with pytest.raises(ValueError, match="base_prompts has 2 rows but nudger_prompts has 1"):
        small_pair.generate_ids([[5, 6], [7]], [[5]], cfg)
    with pytest.raises(ValueError, match="nudger prompt 0 has token ids outside"):
        small_pair.generate_ids([[5, 6]], [[5, 10**6]], cfg)
