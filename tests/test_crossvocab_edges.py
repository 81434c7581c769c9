"""Cross-vocabulary edges on scripted checkpoints (tests/scripted_models.py), expectations written
by hand from docs/ALGORITHM.md ("Different tokenizers"): a base candidate whose text is empty (an
embedding row past the base tokenizer's vocabulary) never agrees with the nudger, so an unconfident
base does not take over with it; the reference (crossvocab_reference.py, word starts and stop ids
from tests/oracles.py) and the fast path (crossvocab.py) both give the literal answer."""
import pytest

import nudgefast as nf
from nudgefast.crossvocab_reference import agrees, reference_crossvocab
from scripted_models import make_scripted, sure, unsure
from test_rule_edges import cross_party
from tiny_models import load_hf, train_tokenizer

PAD_ROWS = 3


@pytest.fixture(scope="module")
def padding_script(tmp_path_factory):
    """Byte-level BPEs of 320 (nudger) and 400 (base, plus 3 padding rows: ids 400-402) tokens.
      t0 NUDGE: the nudger writes " the"                                       (span 1)
      t1 the nudger's " not" starts a word: the base reads " the" and is NOT confident; its
         candidate is the padding id 401, whose text is "": no agreement -> the nudger writes " not"
      t2 the nudger's " be" starts a word: the base reads " the not", is sure of " to" -> BASE
      t3 BASE: the base is sure of its EOS S = " two", a stop id -> the nudger reads " the not to"
         and writes its <|im_end|>: "stop".
    """
    root = tmp_path_factory.mktemp("padding-script")
    tn, tb = train_tokenizer(320), train_tokenizer(400)
    words = ("the", "not", "be", "to", "two", "a")
    n = {w: tn.token_to_id("\u0120" + w) for w in words}
    b = {w: tb.token_to_id("\u0120" + w) for w in words}
    pad = tb.get_vocab_size() + 1
    pn, pb, en, S = tn.token_to_id("Q"), tb.token_to_id("Q"), tn.token_to_id("<|im_end|>"), b["two"]
    nudger_table = {pn: sure(n["the"]), n["the"]: sure(n["not"]), n["not"]: sure(n["be"]), n["to"]: sure(en),
                    n["be"]: sure(en)}
    base_table = {pb: sure(b["be"]), b["the"]: unsure(pad, b["a"], b["be"], b["two"]), b["not"]: sure(b["to"]),
                  b["to"]: sure(S), b["two"]: sure(b["to"]), pad: sure(b["to"])}
    base_dir = make_scripted(root / "base", tb, base_table, eos_id=S, extra_vocab=PAD_ROWS)
    # the nudger's EOS is <|endoftext|>: its <|im_end|> ends the answer as its end-of-turn token
    nudger_dir = make_scripted(root / "nudger", tn, nudger_table, eos_id=tn.token_to_id("<|endoftext|>"))
    engine = nf.NudgingEngine(base=base_dir, nudger=nudger_dir, page_size=4, kv_cache_tokens=256)
    assert engine.cross_vocabulary and engine.base.spec.vocab_size == tb.get_vocab_size() + PAD_ROWS
    hf = (load_hf(base_dir), load_hf(nudger_dir))
    return engine, cross_party(base_dir, hf[0], [pb]), cross_party(nudger_dir, hf[1], [pn]), [[pb]], [[pn]], pad


def test_an_empty_base_text_never_agrees(padding_script):
    engine, base, nudger, base_prompts, nudger_prompts, pad = padding_script
    assert base.codec.token_text(pad) == "" and not agrees("", " not")
    cfg = nf.NudgeConfig(mode="nudging", threshold=0.4, max_new_tokens=8)
    expected = (" the not to", [(0, 8, True), (8, 11, False)], "stop", 3, 2)
    r = reference_crossvocab(base, nudger, cfg, 0)
    assert (r.text, r.spans, r.finish_reason, r.emitted, r.emitted_by_nudger) == expected
    (o,) = engine.generate_ids(base_prompts=base_prompts, nudger_prompts=nudger_prompts, config=cfg)
    s = o.stats
    assert (o.text, s["spans"], o.finish_reason, s["emitted_tokens"], s["nudged_tokens"]) == expected
