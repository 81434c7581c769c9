"""The edges of the nudging rule, end to end, on scripted checkpoints (scripted_models.py: the
logits after each token are a table, so every position's candidates, top probability and entropy
are known exactly).

Each case is written by hand from DESIGN.md section 1: the expected tokens, provenance and finish
reason are literals, and every implementation must produce them: the readable reference
(nudgefast/reference.py, logits from transformers), the engine on the CPU with the C++ gate step and
with the torch reference step, and speculative decoding (the accept kernel's reference replaying the
rule). Stop ids and word starts are not given to the reference from the engine: they come from
the model files through tests/oracles.py, by the rule's definitions; the engine resolves its own.

Every stop-id case shows that its stop id is what decides the branch: the same script with that id
no longer a stop id gives another answer. Threshold cases sit exactly on the threshold, where `>=`
and `>` (or `<=` and `<`) differ, next to a case just past it.
"""
import dataclasses
import math

import pytest
import torch

import nudgefast as nf
from nudgefast.ops import native_ops_available
from nudgefast.reference import base_statistics, reference_generate
from oracles import eos_and_end_of_turn, shared_vocab_stop_ids, word_start_flags
from scripted_models import make_scripted, sure, tie, unsure
from tiny_models import load_hf, train_tokenizer

BACKENDS = [pytest.param(False, id="torch-step"),
            pytest.param(True, id="native-step", marks=pytest.mark.skipif(not native_ops_available(),
                                                                          reason="nudgefast._C is not built"))]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


class Ids:
    """Token ids of the tiny vocabulary, picked by their strings."""

    def __init__(self, tok):
        vocab = tok.get_vocab()
        words = sorted(i for s, i in vocab.items() if s.startswith("\u0120") and len(s) > 2)
        plain = sorted(i for s, i in vocab.items() if s.isalpha() and len(s) > 1)
        self.ws = words[:12]       # word starts ("Ġthe", ...)
        self.plain = plain[:12]    # not word starts ("he", ...)
        self.period = vocab["."]   # punctuation: not a word start
        self.im_end = vocab["<|im_end|>"]
        self.endoftext = vocab["<|endoftext|>"]


@pytest.fixture(scope="module")
def ids(tok):
    return Ids(tok)


def hf_logits_fn(model):
    def fn(seq):
        with torch.no_grad():
            return model(torch.tensor([seq])).logits[0, -1].float()
    return fn


class Scripted:
    """A base and a nudger from two tables, the engines over them, and the reference."""

    def __init__(self, root, tok, base_table, nudger_table, base_eos, nudger_eos):
        self.base_dir = make_scripted(root / "base", tok, base_table, eos_id=base_eos)
        self.nudger_dir = make_scripted(root / "nudger", tok, nudger_table, eos_id=nudger_eos)
        self.hf = (load_hf(self.base_dir), load_hf(self.nudger_dir))
        self.engines = {}
        self.refs = {}

    def engine(self, native: bool, lazy: bool | None = None):
        if (native, lazy) not in self.engines:
            self.engines[native, lazy] = nf.NudgingEngine(base=self.base_dir, nudger=self.nudger_dir, page_size=4,
                                                          kv_cache_tokens=256, native=native, lazy=lazy)
        return self.engines[native, lazy]

    def reference(self, prompts, cfg):
        key = (repr(prompts), repr(cfg))  # the reference is slow (transformers from scratch): once per case
        if key not in self.refs:
            self.refs[key] = self._reference(prompts, cfg)
        return self.refs[key]

    def _reference(self, prompts, cfg):
        stop = shared_vocab_stop_ids(self.base_dir, self.nudger_dir, cfg.stop_token_ids)
        flags = word_start_flags(self.nudger_dir, 10**6)
        return [reference_generate(hf_logits_fn(self.hf[0]), hf_logits_fn(self.hf[1]), p, p, cfg, stop,
                                   lambda i: flags[i], 0) for p in prompts]

    def run(self, prompts, cfg, native: bool, lazy: bool | None = None):
        return self.engine(native, lazy).generate_ids(base_prompts=prompts, nudger_prompts=prompts, config=cfg)


def outcome(o):
    return list(o.token_ids), [bool(f) for f in o.from_nudger], o.finish_reason


def check_all(scripted, prompts, cfg, expected, native):
    """The reference, the engine (plain: the lazy schedule and the eager gate step; speculative) all
    give `expected` (one tuple per row)."""
    assert [outcome(r) for r in scripted.reference(prompts, cfg)] == expected, "reference"
    for lazy in (True, False):
        assert [outcome(o) for o in scripted.run(prompts, cfg, native, lazy)] == expected, f"engine, lazy={lazy}"
    if cfg.temperature == 0:
        for K in (1, 3):
            spec = scripted.run(prompts, dataclasses.replace(cfg, speculate=K), native)
            assert [outcome(o) for o in spec] == expected, f"speculate={K}"


# ---- stops at every place the rule reads them, word granularity ---------------------------------

@pytest.fixture(scope="module")
def word_script(tmp_path_factory, tok, ids):
    """One answer that walks through every word-level place where stop ids matter.

    S (the base's EOS id, a word start) is a stop id by the rule's definition (the union of both
    models' EOS ids and the nudger's end-of-turn token <|im_end|> = E).
      t0 NUDGE, span 0: n = W1                          -> emit W1 (nudger), span 1
      t1 NUDGE, span 1: n = W2 word start, confident, b = S is a stop
                                                        -> hand-back REFUSED, emit W2, span 2
      t2 NUDGE, span 2: n = W3 word start, confident, b = B1 -> BASE, emit B1
      t3 BASE: confident, b = S is a stop                -> NUDGE, emit C (nudger), span 1
      t4 NUDGE, span 1: n = "." (not a word start), confident b = B2 -> emit "." , span 2
      t5 NUDGE: n = E                                    -> E is a stop: the answer ends, "stop"
    """
    W1, W2, W3, B1, B2, X, S = ids.ws[:7]
    C, = ids.plain[:1]
    D, E, P = ids.period, ids.im_end, ids.plain[1]
    base = {P: sure(X), W1: sure(S), W2: sure(B1), B1: sure(S), C: sure(B2), D: sure(B2), S: sure(B1)}
    nudger = {P: sure(W1), W1: sure(W2), W2: sure(W3), B1: sure(C), C: sure(D), D: sure(E), S: sure(C)}
    scripted = Scripted(tmp_path_factory.mktemp("word-script"), tok, base, nudger, base_eos=S, nudger_eos=E)
    expected = [([W1, W2, B1, C, D], [True, True, False, True, True], "stop")]
    return scripted, [[P]], expected, S, E


@pytest.mark.parametrize("native", BACKENDS)
@pytest.mark.parametrize("gate, threshold", [("top_prob", 0.4), ("top_prob", 1.0), ("entropy", 0.0),
                                             ("entropy", 0.5)])
def test_word_level_stops_and_word_starts(word_script, gate, threshold, native):
    """Every base row of the script is sure (p = 1, H = 0), so the same answer holds for thresholds
    anywhere up to p = 1 / down to H = 0, those two included."""
    scripted, prompts, expected, S, E = word_script
    cfg = nf.NudgeConfig(mode="nudging", granularity="word", gate=gate, threshold=threshold, max_new_tokens=8)
    check_all(scripted, prompts, cfg, expected, native)


def test_word_script_hinges_on_its_stop_ids(word_script, ids):
    """The branches above are reached because of the stop ids: without S as a stop id the base takes
    over at t1 and writes S; with only S (E no stop id) the nudger writes E and goes on."""
    scripted, prompts, expected, S, E = word_script
    cfg = nf.NudgeConfig(mode="nudging", granularity="word", max_new_tokens=8)
    (without_s,) = scripted.reference(prompts, dataclasses.replace(cfg, stop_token_ids=[E]))
    assert without_s.token_ids[:2] == [expected[0][0][0], S] and without_s.from_nudger[1] is False
    (without_e,) = scripted.reference(prompts, dataclasses.replace(cfg, stop_token_ids=[S]))
    assert without_e.token_ids[:6] == expected[0][0] + [E]
    # the defaults are the rule's: the base's EOS id counts although only the nudger has <|im_end|>
    assert shared_vocab_stop_ids(scripted.base_dir, scripted.nudger_dir) == {S, E}
    # ... and the engine resolves the same set on its own
    (o,) = scripted.run(prompts, dataclasses.replace(cfg, stop_token_ids=[E]), native=False)
    assert outcome(o)[0] == without_s.token_ids


@pytest.fixture(scope="module")
def agree_script(tmp_path_factory, tok, ids):
    """Word granularity, the base unsure where it matters (p < 0.4, H > 1 nat), no stop reached:
      t0 NUDGE, span 0: n = W1                                -> emit W1 (nudger), span 1
      t1 NUDGE, span 1: n = W2 word start, base NOT confident but b == n = W2
                                                              -> BASE, emit W2 (provenance: base)
      t2 BASE: not confident                                  -> NUDGE, emit n = W3, span = 1
      t3 NUDGE, span 1 (the span after a hand-over is 1, not 0): n = W4 word start, confident b = B2
                                                              -> BASE, emit B2
    """
    W1, W2, W3, W4, B1, B2, X = ids.ws[:7]
    P, Y = ids.plain[:2]
    base = {P: sure(X), W1: unsure(W2, B1, B2, X), W2: unsure(B1, B2, X, Y), W3: sure(B2), B2: sure(X)}
    nudger = {P: sure(W1), W1: sure(W2), W2: sure(W3), W3: sure(W4), B2: sure(W1)}
    scripted = Scripted(tmp_path_factory.mktemp("agree-script"), tok, base, nudger, base_eos=ids.im_end,
                        nudger_eos=ids.im_end)
    return scripted, [[P]], [([W1, W2, W3, B2], [True, False, True, False], "length")]


@pytest.mark.parametrize("native", BACKENDS)
@pytest.mark.parametrize("gate, threshold", [("top_prob", 0.4), ("entropy", 1.0)])
def test_word_level_agreement_and_span(agree_script, gate, threshold, native):
    scripted, prompts, expected = agree_script
    cfg = nf.NudgeConfig(mode="nudging", granularity="word", gate=gate, threshold=threshold, max_new_tokens=4)
    check_all(scripted, prompts, cfg, expected, native)


# ---- stops at the token level -------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_script(tmp_path_factory, tok, ids):
    """Token granularity. Stop ids by the definition: S (the base's EOS), <|endoftext|> (the
    nudger's EOS) and E = <|im_end|>, a stop id only as the nudger's end-of-turn token:
      t0 confident, b = S is a stop   -> emit n = A (nudger)
      t1 confident, b = B1            -> emit B1 (base)
      t2 not confident (p < 0.4)      -> emit n = E: a stop, the answer ends
    """
    A, B1, B2, B3, P = ids.plain[2:7]
    S, E = ids.ws[7], ids.im_end
    base = {P: sure(S), A: sure(B1), B1: unsure(B2, B3, A, P), S: sure(B1)}
    nudger = {P: sure(A), A: sure(B2), B1: sure(E), S: sure(A)}
    scripted = Scripted(tmp_path_factory.mktemp("token-script"), tok, base, nudger, base_eos=S,
                        nudger_eos=ids.endoftext)
    expected = [([A, B1], [True, False], "stop")]
    return scripted, [[P]], expected, S, E


@pytest.mark.parametrize("native", BACKENDS)
def test_token_level_stops(token_script, native):
    scripted, prompts, expected, S, E = token_script
    cfg = nf.NudgeConfig(mode="nudging", granularity="token", threshold=0.4, max_new_tokens=8)
    assert shared_vocab_stop_ids(scripted.base_dir, scripted.nudger_dir) == {S, 0, E}
    check_all(scripted, prompts, cfg, expected, native)
    # without S as a stop id the base's S is emitted at t0
    (r,) = scripted.reference(prompts, dataclasses.replace(cfg, stop_token_ids=[E]))
    assert r.token_ids[0] == S and r.from_nudger[0] is False


def test_baselines_end_on_an_emitted_stop(token_script, ids):
    """One model alone ends on its stop id too: the base writes S at once; the nudger writes A, then
    B2, made a stop id here."""
    scripted, prompts, _, S, E = token_script
    A, B2 = ids.plain[2], ids.plain[4]
    for mode, stop, expected in (("base_only", [S], ([], [], "stop")),
                                 ("nudger_only", [B2], ([A], [True], "stop")),
                                 ("nudger_only", [E], ([A, B2], [True, True], "length"))):
        cfg = nf.NudgeConfig(mode=mode, max_new_tokens=2, stop_token_ids=stop)
        assert [outcome(r) for r in scripted.reference(prompts, cfg)] == [expected]
        assert [outcome(o) for o in scripted.run(prompts, cfg, native=False)] == [expected]


# ---- exactly on the threshold -------------------------------------------------------------------

@pytest.fixture(scope="module")
def threshold_script(tmp_path_factory, tok, ids):
    """Token granularity, one token per row. Row 0: the base ties X1 and X2 (p = 1/2 exactly,
    H = ln 2); row 1: the base is sure of X3 (p = 1, H = 0). The nudger always says A."""
    X1, X2, X3, A, Q1, Q2 = ids.plain[:6]
    base = {Q1: tie(X1, X2), Q2: sure(X3)}
    nudger = {Q1: sure(A), Q2: sure(A)}
    scripted = Scripted(tmp_path_factory.mktemp("threshold-script"), tok, base, nudger, base_eos=ids.im_end,
                        nudger_eos=ids.im_end)
    return scripted, [[Q1], [Q2]], (min(X1, X2), X3, A)


def f32_after(x, toward):
    """The float32 next to float32(x) toward `toward`: the engine compares in float32 (threshold
    included), the reference in float64; a float32 value is the same number in both."""
    return torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(toward, dtype=torch.float32)).item()


@pytest.mark.parametrize("native", BACKENDS)
@pytest.mark.parametrize("gate, threshold, confident", [
    ("top_prob", 0.5, (True, True)),               # p = 1/2 on the threshold: confident
    ("top_prob", f32_after(0.5, 1.0), (False, True)),
    ("top_prob", 1.0, (False, True)),              # p = 1 on the threshold
    ("entropy", 0.0, (False, True)),               # H = 0 on the threshold
    ("entropy", math.log(2), (True, True)),        # H = ln 2 on the threshold
    ("entropy", f32_after(math.log(2), 0.0), (False, True)),
])
def test_gate_exactly_on_the_threshold(threshold_script, gate, threshold, confident, native):
    scripted, prompts, (x_tie, x_sure, a) = threshold_script
    cfg = nf.NudgeConfig(mode="nudging", granularity="token", gate=gate, threshold=threshold, max_new_tokens=1,
                         stop_token_ids=[])
    expected = [([x if c else a], [not c], "length") for x, c in zip((x_tie, x_sure), confident)]
    check_all(scripted, prompts, cfg, expected, native)


def test_threshold_script_statistics_are_exact(threshold_script):
    """The premise of the threshold cases: the reference's statistics are exactly 1/2, ln 2, 1, 0."""
    scripted, prompts, _ = threshold_script
    lb = [hf_logits_fn(scripted.hf[0])(p) for p in prompts]
    assert base_statistics(lb[0]) == (0.5, math.log(2))
    assert base_statistics(lb[1]) == (1.0, 0.0)




def test_speculation_when_a_row_ends_at_its_first_token(threshold_script):
    """A row that stops at its first token after a one-token prompt, beside a row that goes on: the
    speculative rounds must carry the finished row along (it once broke the draft's attention)."""
    scripted, prompts, (x_tie, x_sure, a) = threshold_script
    cfg = nf.NudgeConfig(mode="nudging", granularity="token", threshold=1.0, max_new_tokens=3, stop_token_ids=[a])
    # row 0: the tie is not confident at threshold 1, the nudger's A is a stop id; row 1: X3, then
    # tokens no script covers (all logits equal: both models' argmax is id 0; not confident)
    expected = [([], [], "stop"), ([x_sure, 0, 0], [False, True, True], "length")]
    check_all(scripted, prompts, cfg, expected, native=False)


# ---- the base's stop ids across tokenizers ------------------------------------------------------

def cross_party(model_dir, hf, prompt):
    from nudgefast.crossvocab_reference import Party, TextCodec
    from nudgefast.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    codec = TextCodec(tok, tok.vocab_size)
    codec.word_starts = word_start_flags(model_dir, tok.vocab_size)  # the definition, not the engine's table
    return Party(codec, prompt, hf_logits_fn(hf), frozenset(eos_and_end_of_turn(model_dir)))


@pytest.fixture(scope="module")
def cross_script(tmp_path_factory):
    """Different tokenizers (byte-level BPEs of 320 and 400 tokens): the text is shared word by word.
    The base's stop ids by definition: its EOS id S = " two" (config.json) and its <|im_end|>.
      t0 NUDGE: the nudger writes " the"                                   (span 1)
      t1 the nudger's next token " not" starts a word: the base reads " the" and is sure of S,
         a base stop id -> hand-back REFUSED, the nudger writes " not"     (span 2)
      t2 the nudger's " be" starts a word: the base reads " the not", is sure of " to" -> BASE
      t3 BASE: the base is sure of S: a base stop id at a word boundary -> the nudger reads
         " the not to" and writes its <|im_end|>: the answer ends, "stop".
    """
    root = tmp_path_factory.mktemp("cross-script")
    tn, tb = train_tokenizer(320), train_tokenizer(400)
    n = {w: tn.token_to_id("\u0120" + w) for w in ("the", "not", "be", "to", "two")}
    b = {w: tb.token_to_id("\u0120" + w) for w in ("the", "not", "be", "to", "two")}
    assert None not in n.values() and None not in b.values()
    pn, pb, en, S = tn.token_to_id("Q"), tb.token_to_id("Q"), tn.token_to_id("<|im_end|>"), b["two"]
    nudger_table = {pn: sure(n["the"]), n["the"]: sure(n["not"]), n["not"]: sure(n["be"]), n["to"]: sure(en),
                    n["be"]: sure(en), n["two"]: sure(en)}
    base_table = {pb: sure(b["be"]), b["the"]: sure(S), b["not"]: sure(b["to"]), b["to"]: sure(S),
                  b["two"]: sure(b["to"]), b["be"]: sure(b["to"])}
    base_dir = make_scripted(root / "base", tb, base_table, eos_id=S)
    nudger_dir = make_scripted(root / "nudger", tn, nudger_table, eos_id=en)
    engine = nf.NudgingEngine(base=base_dir, nudger=nudger_dir, page_size=4, kv_cache_tokens=256)
    assert engine.cross_vocabulary
    hf = (load_hf(base_dir), load_hf(nudger_dir))
    return engine, cross_party(base_dir, hf[0], [pb]), cross_party(nudger_dir, hf[1], [pn]), [[pb]], [[pn]], S


def test_base_stop_ids_across_tokenizers(cross_script):
    from nudgefast.crossvocab_reference import reference_crossvocab

    engine, base, nudger, base_prompts, nudger_prompts, S = cross_script
    cfg = nf.NudgeConfig(mode="nudging", max_new_tokens=8)
    assert base.stop_ids == {S, engine.base.tokenizer.tok.token_to_id("<|im_end|>")}
    expected = (" the not to", [(0, 8, True), (8, 11, False)], "stop", 3, 2)
    r = reference_crossvocab(base, nudger, cfg, 0)
    assert (r.text, r.spans, r.finish_reason, r.emitted, r.emitted_by_nudger) == expected
    (o,) = engine.generate_ids(base_prompts=base_prompts, nudger_prompts=nudger_prompts, config=cfg)
    s = o.stats
    assert (o.text, s["spans"], o.finish_reason, s["emitted_tokens"], s["nudged_tokens"]) == expected
    # S decides both branches: were it no base stop id, the base would take over at t1 and write it
    import dataclasses as dc
    r2 = reference_crossvocab(dc.replace(base, stop_ids=base.stop_ids - {S}), nudger, cfg, 0)
    assert r2.text.startswith(" the two")
