"""The request-level engine: continuous batching, per-request parameters, pages on demand,
preemption, abort, streaming -- each request's output independent of what runs beside it.

The oracle for every request is the same request run ALONE (generate_ids on an engine with a pool
large enough that nothing waits or is preempted), which the other suites hold equal to the
readable reference of the rule (test_nudging.py, test_speculative.py, test_crossvocab.py).
"""
import asyncio
import dataclasses
import random

import pytest

import nudgefast as nf
from pairs import PROMPTS_BASE, PROMPTS_NUDGER, make_pair, threshold
from tiny_models import train_tokenizer

FAMILIES_UNDER_TEST = ["llama", "gemma2"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def small_engine(family, root, tokenizer, kv_cache_tokens, max_running=8, **kw):
    """A tiny pair whose pools are small enough to force waiting and preemption. The solo engine
    runs the eager step (lazy=False), the busy one the default (on the CPU: the lazy schedule of
    runner/lazy.py), so the schedules compare the two as well."""
    _, solo, _, _, tok = make_pair(family, root, tokenizer, with_hf=False, kv_cache_tokens=4096, lazy=False)
    busy = nf.NudgingEngine(base=solo.base.dir, nudger=solo.nudger.dir, page_size=4,
                            kv_cache_tokens=kv_cache_tokens, max_running=max_running, flag_interval=4, **kw)
    return solo, busy, tok


def frequent_tokens(engine, n: int = 6) -> list[int]:
    """The tokens the pair writes most often: as extra stop ids they make "stop" endings common."""
    from collections import Counter

    outs = engine.generate_ids(PROMPTS_BASE, PROMPTS_NUDGER, nf.NudgeConfig(max_new_tokens=16, stop_token_ids=[]))
    return [t for t, _ in Counter(t for o in outs for t in o.token_ids).most_common(n)]


def random_request(rng: random.Random, family: str, tok, i: int, frequent=(17, 40, 41, 200, 9)):
    """A random config and prompt pair of the shared-vocabulary path."""
    gate = rng.choice(["top_prob", "entropy"])
    granularity = rng.choice(["token", "word"])
    mode = rng.choices(["nudging", "base_only", "nudger_only"], weights=[6, 1, 1])[0]
    sampled = rng.random() < 0.5
    speculate = rng.choice([0, 0, 2, 4]) if mode == "nudging" else 0
    stop = None
    if rng.random() < 0.4:  # frequent tokens as extra stop ids make "stop" endings common
        stop = [tok.token_to_id("<|im_end|>")] + rng.sample(list(frequent), 2)
    cfg = nf.NudgeConfig(mode=mode, gate=gate, threshold=threshold(family, gate, granularity),
                         granularity=granularity, speculate=speculate, max_new_tokens=rng.randint(1, 64),
                         temperature=0.9 if sampled else 0.0, top_p=rng.choice([1.0, 0.8]) if sampled else 1.0,
                         seed=rng.randrange(1 << 30) if sampled else None, stop_token_ids=stop)
    k = rng.randrange(len(PROMPTS_BASE))
    base = PROMPTS_BASE[k] + [rng.randrange(3, 300) for _ in range(rng.randint(0, 12))]
    nudger = PROMPTS_NUDGER[k] + [rng.randrange(3, 300) for _ in range(rng.randint(0, 12))]
    return cfg, base, nudger


def run_schedule(engine, requests, rng, abort_share=0.05):
    """Requests arrive at random steps; some are aborted midway. Returns {index: Completion or
    'abort'} and checks the pools after every step."""
    pending = list(enumerate(requests))
    ids, results, aborted = {}, {}, set()
    steps = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 3)):  # a burst of arrivals
            if pending:
                i, (cfg, b, n) = pending.pop(0)
                kw = {"base_ids": b if cfg.mode != "nudger_only" else None,
                      "nudger_ids": n if cfg.mode != "base_only" else None}
                ids[engine.add_request(config=cfg, **kw)] = i
        live = [r for r in ids if ids[r] not in results and ids[r] not in aborted]
        if live and rng.random() < abort_share:
            victim = rng.choice(live)
            engine.abort(victim)
            aborted.add(ids[victim])
        for out in engine.step():
            if out.finished:
                results[ids[out.request_id]] = out.completion if out.finish_reason != "abort" else "abort"
        usage = engine.kv_usage()
        for m, u in usage.items():
            assert 0 <= u["used"] <= u["total"]
        steps += 1
        assert steps < 5000, "the schedule did not drain"
    return results


@pytest.mark.parametrize("family", FAMILIES_UNDER_TEST)
def test_random_schedule_equals_solo_runs(family, tmp_path, tokenizer):
    rng = random.Random(1234 + len(family))
    solo, busy, tok = small_engine(family, tmp_path, tokenizer, kv_cache_tokens=160)
    frequent = frequent_tokens(solo)
    requests = [random_request(rng, family, tok, i, frequent) for i in range(32)]
    for i, (cfg, b, n) in enumerate(requests):
        if cfg.stop_token_ids is not None and cfg.max_new_tokens > 1:
            # a token this request writes after its first one becomes a stop id: it ends with "stop"
            probe = solo.generate_ids(base_prompts=[b] if cfg.mode != "nudger_only" else None,
                                      nudger_prompts=[n] if cfg.mode != "base_only" else None,
                                      config=dataclasses.replace(cfg, stop_token_ids=[]))[0]
            if len(probe.token_ids) > 1:
                stop = cfg.stop_token_ids[:1] + [probe.token_ids[rng.randrange(1, len(probe.token_ids))]]
                requests[i] = (dataclasses.replace(cfg, stop_token_ids=stop), b, n)
    results = run_schedule(busy, requests, rng)
    counts = busy.counts()
    assert counts["preempted"] > 0, "the pool was large enough that nothing was preempted"
    assert counts["aborted"] > 0 and counts["finished"] > 0
    assert all(u["used"] == 0 for u in busy.kv_usage().values())
    reasons = set()
    for i, (cfg, b, n) in enumerate(requests):
        got = results[i]
        if got == "abort":
            continue
        alone = solo.generate_ids(base_prompts=[b] if cfg.mode != "nudger_only" else None,
                                  nudger_prompts=[n] if cfg.mode != "base_only" else None, config=cfg)[0]
        assert got.token_ids == alone.token_ids, f"request {i} ({cfg})"
        assert got.from_nudger == alone.from_nudger, f"request {i} ({cfg})"
        assert got.finish_reason == alone.finish_reason, f"request {i} ({cfg})"
        reasons.add(got.finish_reason)
    assert reasons == {"stop", "length"}


def test_thousand_requests_leave_no_page_behind(tmp_path, tokenizer):
    rng = random.Random(7)
    _, busy, tok = small_engine("llama", tmp_path, tokenizer, kv_cache_tokens=256, max_running=32)
    requests = []
    for i in range(1000):
        cfg, b, n = random_request(rng, "llama", tok, i)
        requests.append((nf.NudgeConfig(**{**cfg.__dict__, "max_new_tokens": rng.randint(1, 6)}), b, n))
    results = run_schedule(busy, requests, rng, abort_share=0.3)
    assert len(results) == 1000
    assert all(u["used"] == 0 for u in busy.kv_usage().values())
    assert not busy.has_unfinished()


def test_bad_requests_raise_at_add_and_change_nothing(tmp_path, tokenizer):
    _, engine, _ = small_engine("llama", tmp_path, tokenizer, kv_cache_tokens=64)
    short = nf.NudgeConfig(max_new_tokens=4)
    good = engine.add_request(base_ids=[5, 6, 7], nudger_ids=[5, 6], config=short)
    bad = [
        (dict(base_ids=[], nudger_ids=[5]), ValueError, "empty"),
        (dict(base_ids=[5, 10**6], nudger_ids=[5]), ValueError, "vocabulary"),
        (dict(base_ids=[5], nudger_ids=["a"]), TypeError, "list of ints"),
        (dict(base_ids=[5]), ValueError, "nudger_ids"),
        (dict(prompt="hi", base_ids=[5], nudger_ids=[5]), ValueError, "not both"),
        (dict(base_ids=[5], nudger_ids=[5], config="greedy"), TypeError, "NudgeConfig"),
        (dict(base_ids=[5], nudger_ids=[5], config=nf.NudgeConfig(max_new_tokens=256)), ValueError, "context"),
        (dict(base_ids=[5], nudger_ids=[5], config=nf.NudgeConfig(max_new_tokens=200)), ValueError, "whole pool"),
        (dict(base_ids=[5], nudger_ids=[5], config=nf.NudgeConfig(mode="base_only", speculate=2, max_new_tokens=4)),
         ValueError, "speculate"),
        (dict(base_ids=[5], nudger_ids=[5], config=short, request_id=good), ValueError, "already in use"),
    ]
    for kw, error, match in bad:
        with pytest.raises(error, match=match):
            engine.add_request(**{"config": short, **kw})
    with pytest.raises(ValueError, match="unknown request id"):
        engine.abort("no-such-request")
    assert list(engine.requests) == [good]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done[good].completion is not None and len(done[good].completion.token_ids) >= 1
    assert all(u["used"] == 0 for u in engine.kv_usage().values())


def test_deltas_add_up_to_the_completion(tmp_path, tokenizer):
    """step()'s deltas (ids, provenance, text pieces) concatenate to the final Completion."""
    _, engine, _ = small_engine("llama", tmp_path, tokenizer, kv_cache_tokens=1024)
    cfgs = [nf.NudgeConfig(threshold=0.4, max_new_tokens=40, stop_token_ids=[]),
            nf.NudgeConfig(threshold=0.4, max_new_tokens=40, speculate=3, temperature=0.8, seed=5,
                           stop_token_ids=[])]
    rids = [engine.add_request(base_ids=PROMPTS_BASE[0], nudger_ids=PROMPTS_NUDGER[0], config=c) for c in cfgs]
    got = {r: {"ids": [], "src": [], "text": "", "pieces": 0} for r in rids}
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            g = got[out.request_id]
            g["ids"] += out.token_ids
            g["src"] += out.from_nudger
            g["text"] += out.text
            assert "".join(p for p, _ in out.pieces) == out.text
            g["pieces"] += len(out.pieces)
            if out.finished:
                final[out.request_id] = out.completion
    for r in rids:
        c = final[r]
        assert got[r]["ids"] == c.token_ids and got[r]["src"] == c.from_nudger
        assert got[r]["text"] == c.text == engine.nudger.tokenizer.decode(c.token_ids)
        assert got[r]["pieces"] > 1  # streamed in several deltas, not all at the end
        assert 0 < c.nudged_fraction < 1
        assert all(0 <= a < b <= len(c.text) for a, b in c.nudged_spans)


def test_async_stream_equals_completion_and_cancel_frees_pages(tmp_path, tokenizer):
    _, engine, _ = small_engine("llama", tmp_path, tokenizer, kv_cache_tokens=1024)
    aengine = nf.AsyncNudgingEngine(engine)
    cfg = nf.NudgeConfig(threshold=0.4, max_new_tokens=48, stop_token_ids=[])

    async def main():
        async def consume():
            ids, src, text, last = [], [], "", None
            async for out in aengine.stream(base_ids=PROMPTS_BASE[1], nudger_ids=PROMPTS_NUDGER[1], config=cfg):
                ids += out.token_ids
                src += out.from_nudger
                text += out.text
                last = out
            return ids, src, text, last.completion

        async def leave_early():
            n = 0
            async for _ in aengine.stream(base_ids=PROMPTS_BASE[2], nudger_ids=PROMPTS_NUDGER[2], config=cfg):
                n += 1
                if n == 2:
                    break  # the consumer goes away: its request is aborted
            return n

        with pytest.raises(ValueError, match="empty"):
            async for _ in aengine.stream(base_ids=[], nudger_ids=[5], config=cfg):
                pass
        (ids, src, text, completion), n = await asyncio.wait_for(asyncio.gather(consume(), leave_early()), 120)
        assert n == 2
        assert ids == completion.token_ids and src == completion.from_nudger and text == completion.text
        alone = await asyncio.wait_for(aengine.generate(base_ids=PROMPTS_BASE[1], nudger_ids=PROMPTS_NUDGER[1],
                                                        config=cfg), 120)
        assert alone.token_ids == completion.token_ids
        for _ in range(50):  # the abort lands at the driver's next step
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.05)
        await aengine.close()

    asyncio.run(main())
    assert not engine.has_unfinished()
    assert all(u["used"] == 0 for u in engine.kv_usage().values())
    assert engine.counts()["aborted"] >= 1


def test_crossvocab_schedule_equals_solo_runs(tmp_path):
    """The text-level path (different tokenizers) under the same pressure: arrivals, aborts,
    preemption; every finished request equals its solo run (text, spans, ids, finish reason)."""
    from test_crossvocab import PAIRS, QUESTIONS, TOKENIZERS, build_pair, prompts_for

    spec = PAIRS["bytelevel_sizes"]
    toks = {name: TOKENIZERS[name]() for name in (spec[1], spec[3])}
    solo, _, _ = build_pair(tmp_path / "solo", toks, *spec[:6])
    base_prompts, nudger_prompts = prompts_for(solo, QUESTIONS)
    # room for two requests at admission (prompt + 16) but not for both to grow: preemption
    longest = max(len(p) for p in base_prompts + nudger_prompts)
    busy = nf.NudgingEngine(base=solo.base.dir, nudger=solo.nudger.dir, page_size=4,
                            kv_cache_tokens=2 * (longest + 16) + 4, max_running=6)
    rng = random.Random(3)
    requests = []
    for i in range(12):
        k = rng.randrange(len(QUESTIONS))
        sampled = rng.random() < 0.5
        cfg = nf.NudgeConfig(threshold=spec[6], max_new_tokens=rng.randint(16, 40),
                             temperature=0.8 if sampled else 0.0, seed=rng.randrange(1000) if sampled else None)
        requests.append((cfg, base_prompts[k], nudger_prompts[k]))
    results = run_schedule(busy, requests, rng, abort_share=0.1)
    assert all(u["used"] == 0 for u in busy.kv_usage().values())
    for i, (cfg, b, n) in enumerate(requests):
        got = results[i]
        if got == "abort":
            continue
        alone = solo.generate_ids([b], [n], cfg)[0]
        assert (got.text, got.stats["spans"], got.token_ids, got.finish_reason) == \
            (alone.text, alone.stats["spans"], alone.token_ids, alone.finish_reason), f"request {i}"
        assert got.stats["base_ids"] == alone.stats["base_ids"]
    assert busy.counts()["preempted"] > 0, "the pool was large enough that nothing was preempted"
