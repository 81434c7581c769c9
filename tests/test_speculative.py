"""Speculative nudging (the nudger drafts K tokens, the base verifies K+1 positions in one forward,
the rule is replayed on the device) equals non-speculative nudging token for token, flag for flag,
finish reason for finish reason; seeded sampling too, since every candidate is keyed by its output
step."""
import dataclasses

import pytest
import torch

import nudgefast as nf
from pairs import PROMPTS_BASE, PROMPTS_NUDGER, make_pair, sampled, threshold
from tiny_models import FAMILIES, train_tokenizer

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory, tokenizer):
    return make_pair(request.param, tmp_path_factory.mktemp(f"spec-{request.param}"), tokenizer, with_hf=False)


def same(a, b):
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.from_nudger for o in a] == [o.from_nudger for o in b]
    assert [o.finish_reason for o in a] == [o.finish_reason for o in b]


@pytest.mark.parametrize("granularity", ["token", "word"])
def test_speculative_equals_sequential_greedy(pair, granularity):
    family, engine = pair[0], pair[1]
    cfg = nf.NudgeConfig(mode="nudging", threshold=threshold(family, "top_prob", granularity),
                         granularity=granularity, max_new_tokens=NEW_TOKENS)
    plain = engine.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=cfg)
    frac = sum(sum(o.from_nudger) for o in plain) / sum(len(o.from_nudger) for o in plain)
    assert 0.2 <= frac <= 0.8  # the gate flips both ways in this case
    for K in (1, 3, 4, 8):
        spec = engine.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER,
                                   config=dataclasses.replace(cfg, speculate=K))
        same(spec, plain)
        for o in spec:
            s = o.stats
            assert s["speculate"] == K
            assert 0 <= s["accepted"] <= s["drafted"] == K * s["rounds"]
            assert s["acceptance_rate"] == pytest.approx(s["accepted"] / s["drafted"])
            # each round emits at least one token, at most K + 1; the first token precedes the rounds
            assert s["rounds"] <= s["emitted_in_rounds"] <= (K + 1) * s["rounds"]
            stopped = o.finish_reason == "stop"
            assert s["emitted_in_rounds"] == len(o.token_ids) - 1 + stopped
    alone = engine.generate_ids(base_prompts=PROMPTS_BASE[2:], nudger_prompts=PROMPTS_NUDGER[2:],
                                config=dataclasses.replace(cfg, speculate=4))
    same(alone, plain[2:])


def test_speculative_sampling_is_seeded_and_equals_sequential(pair):
    engine = pair[1]
    cfg = nf.NudgeConfig(mode="nudging", **sampled(pair[0]), top_p=0.95, seed=11, max_new_tokens=16)
    plain = engine.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=cfg)
    spec = engine.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER,
                               config=dataclasses.replace(cfg, speculate=3))
    again = engine.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER,
                                config=dataclasses.replace(cfg, speculate=3))
    same(spec, again)
    same(spec, plain)
    flags = [f for o in plain for f in o.from_nudger]
    assert 0 < sum(flags) < len(flags), "one model wrote everything: the sampled gate is not exercised"


def test_speculative_first_two_tokens_have_the_sequential_distribution(tmp_path, tokenizer):
    """Two-sample chi-square (significance 0.001, fixed seeds): 2000 speculative rows and 2000
    independently seeded sequential rows; the joint law of the first two tokens must agree."""
    from scipy.stats import chi2_contingency

    _, engine, *_ = make_pair("llama", tmp_path, tokenizer, with_hf=False, kv_cache_tokens=60000)
    n = 2000
    base = dict(mode="nudging", granularity="token", threshold=0.4, temperature=1.0, top_p=1.0, max_new_tokens=2)
    spec = engine.generate_ids(base_prompts=[PROMPTS_BASE[0]] * n, nudger_prompts=[PROMPTS_NUDGER[0]] * n,
                               config=nf.NudgeConfig(**base, seed=1, speculate=2))
    plain = engine.generate_ids(base_prompts=[PROMPTS_BASE[0]] * n, nudger_prompts=[PROMPTS_NUDGER[0]] * n,
                                config=nf.NudgeConfig(**base, seed=2))
    key = lambda o: tuple(o.token_ids) + (o.finish_reason,)  # noqa: E731
    cells = sorted({key(o) for o in spec + plain})
    table = torch.zeros(2, len(cells))
    index = {c: i for i, c in enumerate(cells)}
    for row, outs in enumerate((spec, plain)):
        for o in outs:
            table[row, index[key(o)]] += 1
    dense = table.sum(0) >= 10  # pool sparse cells
    pooled = torch.cat([table[:, dense], table[:, ~dense].sum(1, keepdim=True)], 1)
    pooled = pooled[:, pooled.sum(0) > 0]
    assert pooled.shape[1] > 5
    assert chi2_contingency(pooled.numpy()).pvalue > 1e-3
