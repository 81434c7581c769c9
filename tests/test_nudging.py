"""Nudging with a shared vocabulary: the engine (paged caches, batched, device state, fused gate
step) equals the readable reference of DESIGN.md section 1 token for token and flag for flag.

The reference gets its logits from transformers (an independent implementation), recomputed
from scratch at every position. Every case asserts that it mixes sources (nudged fraction between
20% and 80%), so none can pass by letting one model write everything.
"""
import pytest
import torch

import nudgefast as nf
from nudgefast.engine.engine import row_seeds
from nudgefast.reference import reference_generate
from oracles import shared_vocab_stop_ids, word_start_flags
from pairs import PROMPTS_BASE, PROMPTS_NUDGER, make_pair, sampled, threshold
from tiny_models import FAMILIES, train_tokenizer

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory, tokenizer):
    return make_pair(request.param, tmp_path_factory.mktemp(f"pair-{request.param}"), tokenizer)


def hf_logits_fn(model):
    def fn(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1].float()
    return fn


def run_reference(pair, config, base_prompts, nudger_prompts):
    """The reference with stop ids and word starts by their definitions, read from the model files
    (tests/oracles.py), not from the engine."""
    family, engine, hf_base, hf_nudger, tok = pair
    if config.mode == "nudging":
        stop_ids = shared_vocab_stop_ids(engine.base.dir, engine.nudger.dir, config.stop_token_ids)
    else:  # one model alone: its own stop ids
        assert config.stop_token_ids is not None
        stop_ids = set(config.stop_token_ids)
    flags = word_start_flags(engine.nudger.dir, engine.nudger.spec.vocab_size)
    seeds = row_seeds(config.seed, len(base_prompts)) if config.seed is not None else [0] * len(base_prompts)
    return [reference_generate(hf_logits_fn(hf_base), hf_logits_fn(hf_nudger), bp, np_, config, stop_ids,
                               lambda i: 0 <= i < len(flags) and flags[i], seed)
            for bp, np_, seed in zip(base_prompts, nudger_prompts, seeds)]


def assert_same(outs, refs):
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.token_ids == r.token_ids
        assert o.from_nudger == r.from_nudger
        assert o.finish_reason == r.finish_reason


def assert_mixed(outs, low=0.2, high=0.8):
    flags = [f for o in outs for f in o.from_nudger]
    frac = sum(flags) / len(flags)
    assert low <= frac <= high, f"nudged fraction {frac:.2f}: this case does not exercise the gate"


@pytest.mark.parametrize("granularity", ["token", "word"])
@pytest.mark.parametrize("gate", ["top_prob", "entropy"])
def test_engine_equals_reference_greedy(pair, gate, granularity):
    cfg = nf.NudgeConfig(mode="nudging", gate=gate, threshold=threshold(pair[0], gate, granularity),
                         granularity=granularity,
                         max_new_tokens=NEW_TOKENS)
    engine = pair[1]
    refs = run_reference(pair, cfg, PROMPTS_BASE, PROMPTS_NUDGER)
    batch = engine.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=cfg)
    assert_same(batch, refs)
    assert_mixed(batch)
    for i in range(len(PROMPTS_BASE)):  # a row alone equals the same row in the batch
        alone = engine.generate_ids(base_prompts=[PROMPTS_BASE[i]], nudger_prompts=[PROMPTS_NUDGER[i]], config=cfg)
        assert_same(alone, [refs[i]])


def test_baselines_flag_every_token(pair):
    engine = pair[1]
    for mode, flag in (("base_only", False), ("nudger_only", True)):
        cfg = nf.NudgeConfig(mode=mode, max_new_tokens=8, stop_token_ids=[])
        outs = engine.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=cfg)
        refs = run_reference(pair, cfg, PROMPTS_BASE, PROMPTS_NUDGER)
        assert_same(outs, refs)
        assert all(f is flag for o in outs for f in o.from_nudger)


def test_seeded_sampling_equals_reference_and_repeats(pair):
    engine = pair[1]
    cfg = nf.NudgeConfig(mode="nudging", **sampled(pair[0]), top_p=0.9, seed=7, max_new_tokens=12)
    a = engine.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=cfg)
    b = engine.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=cfg)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert_same(a, run_reference(pair, cfg, PROMPTS_BASE, PROMPTS_NUDGER))
    assert_mixed(a, 0.05, 0.95)  # both models write: the sampled gate is exercised


def test_token_level_sampler_matches_the_exact_distribution(tmp_path, tokenizer):
    """Chi-square goodness of fit (fixed seed, significance 0.001): the first token of a sampled
    token-level nudging run, over 3000 independently seeded rows, against the distribution the rule
    implies: confident -> b unless b is a stop id, then n; not confident -> n."""
    from scipy.stats import chisquare

    from nudgefast.kernels.sample import nucleus_mask_ref

    family, engine, hf_base, hf_nudger, _ = make_pair("llama", tmp_path, tokenizer, kv_cache_tokens=60000)
    T, top_p, n_rows = 3.0, 0.95, 3000  # a hot sampler: many tokens in play
    lb = hf_logits_fn(hf_base)(PROMPTS_BASE[0]).double()
    ln = hf_logits_fn(hf_nudger)(PROMPTS_NUDGER[0]).double()

    def sampling_dist(logits):
        scaled = logits / T
        keep = nucleus_mask_ref(scaled.float()[None], top_p)[0]
        return torch.softmax(scaled.masked_fill(~keep, float("-inf")), -1)

    pb, pn = sampling_dist(lb), sampling_dist(ln)
    stop = torch.topk(pb, 3).indices.tolist()  # stop ids the base likes: the mixture matters
    p_top = torch.softmax(lb, -1).max().item()
    assert p_top >= 0.2  # so the rule takes the confident branch below
    cfg = nf.NudgeConfig(mode="nudging", granularity="token", threshold=0.2, temperature=T, top_p=top_p,
                         seed=123, max_new_tokens=1, stop_token_ids=stop)
    expected = pb.clone()
    expected[stop] = 0.0
    expected += pn * pb[stop].sum()
    outs = engine.generate_ids(base_prompts=[PROMPTS_BASE[0]] * n_rows, nudger_prompts=[PROMPTS_NUDGER[0]] * n_rows,
                               config=cfg)
    V = expected.shape[0]
    counts = torch.zeros(V + 1, dtype=torch.float64)  # last cell: the row stopped (nudger drew a stop id)
    for o in outs:
        counts[o.token_ids[0] if o.token_ids else V] += 1
    probs = torch.cat([expected, expected[stop].sum()[None]])
    probs[stop] = 0.0
    probs = probs / probs.sum()
    exp_counts = probs * n_rows
    big = exp_counts >= 5  # pool the sparse cells into one
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([exp_counts[big], exp_counts[~big].sum()[None]])
    assert counts[~(probs > 0)].sum() == 0, "sampled a token the rule gives probability 0"
    assert len(obs) > 10
    assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3
