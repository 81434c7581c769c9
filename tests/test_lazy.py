"""The lazy schedule of shared-vocabulary nudging (nudgefast/runner/lazy.py): each model runs only
where the rule reads its logits, and a model that skipped positions catches up in one multi-token
forward. It must write exactly what the eager step (both forwards + the fused gate at every
position) writes: greedy and seeded, every family, both gates and granularities, stop ids,
max_new_tokens, mixed batches, preemption and aborts while a model has a backlog.

test_nudging.py holds the default engine (lazy on the CPU) equal to nudgefast/reference.py; here the
eager engine (lazy=False) is the oracle, and the forward counts are checked against the positions
where the rule of DESIGN.md section 1 reads each model, derived independently from transformers'
logits.
"""
import dataclasses

import pytest
import torch

import nudgefast as nf
from nudgefast.engine.engine import row_seeds
from nudgefast.reference import base_statistics, candidate, is_confident
from oracles import shared_vocab_stop_ids, word_start_flags
from pairs import PROMPTS_BASE, PROMPTS_NUDGER, make_pair, sampled, threshold
from tiny_models import FAMILIES, train_tokenizer

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def twin_engines(family, root, tokenizer, with_hf=False, **kw):
    """(lazy engine, eager engine) over the same tiny pair, and the transformers twins."""
    _, lazy, hf_base, hf_nudger, _ = make_pair(family, root, tokenizer, with_hf=with_hf, lazy=True, **kw)
    eager = nf.NudgingEngine(base=lazy.base.dir, nudger=lazy.nudger.dir, page_size=4, lazy=False, **kw)
    return lazy, eager, hf_base, hf_nudger


def assert_same(a, b):
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.from_nudger for o in a] == [o.from_nudger for o in b]
    assert [o.finish_reason for o in a] == [o.finish_reason for o in b]


def configs(family):
    """Greedy: each gate with each granularity once; seeded sampling (test_nudging.py runs every
    combination against the reference on the default, lazy, engine)."""
    return [nf.NudgeConfig(mode="nudging", gate="top_prob", threshold=threshold(family, "top_prob", "word"),
                           granularity="word", max_new_tokens=NEW_TOKENS),
            nf.NudgeConfig(mode="nudging", gate="entropy", threshold=threshold(family, "entropy", "token"),
                           granularity="token", max_new_tokens=NEW_TOKENS),
            nf.NudgeConfig(mode="nudging", **sampled(family), top_p=0.9, seed=7, max_new_tokens=16)]


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_equals_eager_every_family(family, tmp_path, tokenizer):
    lazy, eager, _, _ = twin_engines(family, tmp_path, tokenizer)
    assert lazy.runner.lazy and not eager.runner.lazy
    saved = 0
    for cfg in configs(family):
        a = lazy.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=cfg)
        b = eager.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=cfg)
        assert_same(a, b)
        for o in a:
            fwd, emitted = o.stats["forwards"], len(o.token_ids) + (o.finish_reason == "stop")
            # every position reads at least one model, and no model twice
            assert max(fwd.values()) <= emitted <= fwd["base"] + fwd["nudger"]
            saved += 2 * emitted - fwd["base"] - fwd["nudger"]
        assert "forwards" not in b[0].stats  # the eager step runs both models at every position
    assert saved > 0
    for m in ("base", "nudger"):
        assert lazy.kv_usage()[m]["used"] == 0


@pytest.mark.parametrize("granularity", ["word", "token"])
def test_stop_ids_and_lengths(granularity, tmp_path, tokenizer):
    """Stop ids the pair writes: row 0's first token (the nudger opens every word-level answer, so
    that row stops at once in word granularity) and tokens from the middle of the answers, which the
    base may also want to write (a base stop hands the position to the nudger); a short
    max_new_tokens."""
    family = "olmo2"
    lazy, eager, _, _ = twin_engines(family, tmp_path, tokenizer)
    greedy = nf.NudgeConfig(mode="nudging", threshold=threshold(family, "top_prob", granularity),
                            granularity=granularity, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    probe = eager.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=greedy)
    stops = sorted({probe[0].token_ids[0]} | {o.token_ids[len(o.token_ids) // 2] for o in probe})
    reasons = set()
    for cfg in (dataclasses.replace(greedy, stop_token_ids=stops), dataclasses.replace(greedy, max_new_tokens=3)):
        a = lazy.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=cfg)
        assert_same(a, eager.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=cfg))
        reasons |= {o.finish_reason for o in a}
    assert reasons == {"stop", "length"}


def rule_reads(hf_base, hf_nudger, base_prompt, nudger_prompt, out, cfg, stop_ids, word_start, seed):
    """The positions where DESIGN.md section 1 reads each model, for an answer `out` (a Completion):
    (reads per model, last position read per model). Mode and span at position t follow from the
    provenance of the tokens before it: BASE after a base token; in NUDGE, span = the nudger tokens
    since the last base token."""
    def logits(model, ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1].float()

    T, top_p = cfg.temperature, cfg.top_p
    positions = len(out.token_ids) + (out.finish_reason == "stop")  # a stop id is read, not written
    reads, last = {"base": 0, "nudger": 0}, {"base": -1, "nudger": -1}
    for t in range(positions):
        y = out.token_ids[:t]
        flags = out.from_nudger[:t]
        in_base = t > 0 and not flags[-1]
        span = 0
        while span < len(flags) and flags[len(flags) - 1 - span]:
            span += 1
        lb = logits(hf_base, base_prompt + y)
        b = candidate(lb, seed, t, 0, T, top_p)
        confident = is_confident(*base_statistics(lb), cfg.gate, cfg.threshold)
        n = candidate(logits(hf_nudger, nudger_prompt + y), seed, t, 1, T, top_p)
        if cfg.granularity == "token" or in_base:
            need = ["base"] + ([] if confident and b not in stop_ids else ["nudger"])
        else:
            need = ["nudger"] + (["base"] if span >= 1 and word_start(n) else [])
        for m in need:
            reads[m] += 1
            last[m] = t
    return reads, last


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_forwards_are_the_reads_of_the_rule(family, tmp_path, tokenizer):
    """Each model runs exactly once per position where the rule reads its logits, and computes the
    KV of every position up to its last read exactly once (its chunks tile them)."""
    lazy, _, hf_base, hf_nudger = twin_engines(family, tmp_path, tokenizer, with_hf=True)
    flags = word_start_flags(lazy.nudger.dir, lazy.nudger.spec.vocab_size)
    cases = [nf.NudgeConfig(mode="nudging", threshold=threshold(family, "top_prob", gr), granularity=gr,
                            max_new_tokens=NEW_TOKENS) for gr in ("word", "token")]
    cases.append(nf.NudgeConfig(mode="nudging", **sampled(family), top_p=0.9, seed=3, max_new_tokens=16))
    for cfg in cases:
        outs = lazy.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=cfg)
        stop_ids = shared_vocab_stop_ids(lazy.base.dir, lazy.nudger.dir, cfg.stop_token_ids)
        seeds = row_seeds(cfg.seed, len(outs)) if cfg.seed is not None else [0] * len(outs)
        for o, bp, np_, seed in zip(outs, PROMPTS_BASE, PROMPTS_NUDGER, seeds):
            reads, last = rule_reads(hf_base, hf_nudger, bp, np_, o, cfg, stop_ids,
                                     lambda i: 0 <= i < len(flags) and flags[i], seed)
            assert o.stats["forwards"] == reads, cfg
            assert o.stats["forward_tokens"] == {m: last[m] + 1 for m in reads}, cfg


def test_mixed_batch_equals_rows_alone(tmp_path, tokenizer):
    """Rows in different states and with different parameters share each forward; each writes what
    it writes alone on the eager engine."""
    family = "llama"
    lazy, eager, _, _ = twin_engines(family, tmp_path, tokenizer)
    cfgs = configs(family) + [nf.NudgeConfig(mode="nudging", threshold=0.3, granularity="word", max_new_tokens=5),
                              nf.NudgeConfig(mode="base_only", max_new_tokens=9, stop_token_ids=[]),
                              nf.NudgeConfig(mode="nudging", speculate=2, threshold=0.4, max_new_tokens=12)]
    rows = [(cfg, PROMPTS_BASE[i % 3], PROMPTS_NUDGER[i % 3]) for i, cfg in enumerate(cfgs)]
    ids = [lazy.add_request(base_ids=b, nudger_ids=n if c.mode != "base_only" else None, config=c)
           for c, b, n in rows]
    done = {}
    while lazy.has_unfinished():
        for out in lazy.step():
            if out.finished:
                done[out.request_id] = out.completion
    for rid, (c, b, n) in zip(ids, rows):
        alone = eager.generate_ids(base_prompts=[b], nudger_prompts=[n] if c.mode != "base_only" else None,
                                   config=c)
        assert_same([done[rid]], alone)


def _row_with_base_backlog(engine, cfg, max_steps=40):
    """Step a single word-level request until its base model lags behind (a backlog of tokens it
    has not read); returns the request."""
    rid = engine.add_request(base_ids=PROMPTS_BASE[0], nudger_ids=PROMPTS_NUDGER[0], config=cfg)
    req = engine.requests[rid]
    for _ in range(max_steps):
        engine.step()
        loc = engine.runner.locate(req)
        if loc is not None:
            row = loc[0].batch.rows[loc[1]]
            if len(row.ids["base"]) - row.cached["base"] >= 2:
                return req
    raise AssertionError("the base never lagged: this case does not exercise a backlog")


def test_preemption_and_abort_with_a_backlog(tmp_path, tokenizer):
    family = "gemma2"  # its word-level nudger writes long stretches: the base lags
    lazy, eager, _, _ = twin_engines(family, tmp_path, tokenizer, flag_interval=2)
    cfg = nf.NudgeConfig(mode="nudging", threshold=threshold(family, "top_prob", "word"), granularity="word",
                         max_new_tokens=NEW_TOKENS)
    (alone,) = eager.generate_ids(base_prompts=[PROMPTS_BASE[0]], nudger_prompts=[PROMPTS_NUDGER[0]], config=cfg)
    req = _row_with_base_backlog(lazy, cfg)
    lazy._preempt(req)  # as the scheduler does when a pool runs short: pages freed, requeued
    assert req.preemptions == 1 and not req.pages
    done = lazy._run_to_completion([req.id])[0]
    assert_same([done], [alone])
    req = _row_with_base_backlog(lazy, cfg)
    lazy.abort(req.id)
    lazy.step()
    assert all(u["used"] == 0 for u in lazy.kv_usage().values())
    again = lazy.generate_ids(base_prompts=[PROMPTS_BASE[0]], nudger_prompts=[PROMPTS_NUDGER[0]], config=cfg)
    assert_same(again, [alone])


def test_the_switch(tmp_path, tokenizer, monkeypatch):
    lazy, eager, _, _ = twin_engines("llama", tmp_path, tokenizer)
    dirs = dict(base=lazy.base.dir, nudger=lazy.nudger.dir, page_size=4)
    monkeypatch.delenv("NUDGEFAST_LAZY", raising=False)
    assert nf.NudgingEngine(**dirs).runner.lazy  # on by default on the CPU
    monkeypatch.setenv("NUDGEFAST_LAZY", "0")
    assert not nf.NudgingEngine(**dirs).runner.lazy
    assert nf.NudgingEngine(**dirs, lazy=True).runner.lazy  # the argument wins
    monkeypatch.setenv("NUDGEFAST_LAZY", "yes")
    with pytest.raises(ValueError, match="NUDGEFAST_LAZY"):
        nf.NudgingEngine(**dirs)
    monkeypatch.delenv("NUDGEFAST_LAZY")
    with pytest.raises(ValueError, match="lazy"):
        nf.NudgingEngine(**dirs, lazy="on")
    # only nudging with speculate=0 is lazy; the other groups keep the device step
    cfg = nf.NudgeConfig(mode="nudging", speculate=2, max_new_tokens=4)
    lazy.generate_ids(base_prompts=PROMPTS_BASE[:1], nudger_prompts=PROMPTS_NUDGER[:1], config=cfg)
    lazy.generate_ids(base_prompts=PROMPTS_BASE[:1], nudger_prompts=PROMPTS_NUDGER[:1],
                      config=nf.NudgeConfig(max_new_tokens=4))
    assert {key: g.lazy for key, g in lazy.runner.groups.items()} == {("nudging", 2): False, ("nudging", 0): True}


@pytest.mark.slow
def test_real_pair_lazy_equals_eager():
    """SmolLM2-135M-Instruct as base (plain prompt) and nudger (chat prompt), GGUF blocks, word level,
    greedy and seeded: the lazy schedule writes the eager tokens."""
    from nudgefast import packaged
    from nudgefast.errors import BadPath, MissingPackage

    try:
        model_dir = packaged.packaged_model_dir(packaged.SMOLLM2)
    except (MissingPackage, BadPath) as e:
        pytest.skip(f"the offline real model is not installed: {e}")
    weights = "gguf" if _native() else "dense"
    engines = {lazy: nf.NudgingEngine(base=model_dir, nudger=model_dir, weights=weights, lazy=lazy,
                                      kv_cache_tokens=4096) for lazy in (True, False)}
    questions = ["What are three tips for staying focused while studying?", "Why does sleep help learning?"]
    for cfg in (nf.NudgeConfig(max_new_tokens=48, stop_token_ids=[]),
                nf.NudgeConfig(max_new_tokens=32, temperature=0.7, top_p=0.9, seed=5),
                nf.NudgeConfig(granularity="token", max_new_tokens=32)):
        outs = {lazy: e.generate(questions, cfg, system_prompt="Answer helpfully.") for lazy, e in engines.items()}
        assert_same(outs[True], outs[False])
        assert 0 < sum(f for o in outs[True] for f in o.from_nudger) < sum(len(o.token_ids) for o in outs[True])
        fwd = [o.stats["forwards"] for o in outs[True]]
        assert sum(f["base"] + f["nudger"] for f in fwd) < 2 * sum(len(o.token_ids) for o in outs[True])


def _native() -> bool:
    from nudgefast.ops import native_ops_available

    return native_ops_available()
