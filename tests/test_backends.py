"""The CPU engine gives the same answers with the C++ ops (csrc/) forced on and forced off.

test_nudging.py holds the default CPU backend (native when built) equal to the reference; this
file holds the other backend equal to it, for every family, both granularities, greedy and
sampled, plain and speculative."""
import dataclasses

import pytest

import nudgefast as nf
from nudgefast.ops import native_ops_available
from pairs import PROMPTS_BASE, PROMPTS_NUDGER, make_pair, sampled, threshold
from tiny_models import FAMILIES, train_tokenizer

pytestmark = pytest.mark.skipif(not native_ops_available(), reason="nudgefast._C is not built")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_native_and_torch_backends_agree(family, tmp_path, tokenizer):
    _, native, *_ = make_pair(family, tmp_path, tokenizer, with_hf=False, native=True)
    torch_engine = nf.NudgingEngine(base=native.base.dir, nudger=native.nudger.dir, page_size=4, native=False)
    assert native.backend.kind == "native" and torch_engine.backend.kind == "torch"
    for granularity in ("token", "word"):
        cfg = nf.NudgeConfig(mode="nudging", granularity=granularity,
                             threshold=threshold(family, "top_prob", granularity), max_new_tokens=20)
        for variant in (cfg, dataclasses.replace(cfg, **sampled(family), top_p=0.9, seed=5),
                        dataclasses.replace(cfg, speculate=3)):
            a = native.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=variant)
            b = torch_engine.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=variant)
            flags = [f for o in a for f in o.from_nudger]
            assert 0 < sum(flags) < len(flags), (variant, "one model wrote everything")
            assert len(a) == len(b) == len(PROMPTS_BASE)
            assert [o.token_ids for o in a] == [o.token_ids for o in b]
            assert [o.from_nudger for o in a] == [o.from_nudger for o in b]
            assert [o.finish_reason for o in a] == [o.finish_reason for o in b]
