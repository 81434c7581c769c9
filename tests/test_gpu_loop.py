"""On CUDA: the decode loop and the speculative loop replay CUDA graphs and make no host
synchronisation between two reads of the all-finished flag (torch's sync debug mode set to
"error" around everything in between), and they produce the CPU engine's answers."""
import dataclasses

import pytest
import torch

import nudgefast as nf
from pairs import PROMPTS_BASE, PROMPTS_NUDGER, make_pair, threshold
from tiny_models import train_tokenizer

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    tok = train_tokenizer()
    root = tmp_path_factory.mktemp("gpu")
    _, cpu, *_ = make_pair("llama", root, tok, with_hf=False)
    gpu = nf.NudgingEngine(base=cpu.base.dir, nudger=cpu.nudger.dir, device="cuda", page_size=4,
                           flag_interval=256, sync_debug=True)
    return cpu, gpu


@pytest.mark.parametrize("speculate", [0, 4])
@pytest.mark.parametrize("granularity", ["token", "word"])
def test_256_steps_without_host_sync(pairs, granularity, speculate):
    cpu, gpu = pairs
    cfg = nf.NudgeConfig(mode="nudging", granularity=granularity, threshold=threshold("llama", "top_prob", granularity),
                         max_new_tokens=257, stop_token_ids=[], speculate=speculate)
    outs = gpu.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER, config=cfg)
    assert all(len(o.token_ids) == 257 for o in outs)
    reads_allowed = 1 if speculate == 0 else -(-256 // (256 // (speculate + 1)))
    assert all(o.stats["host_reads"] <= reads_allowed for o in outs)
    # the whole answers equal the CPU engine's (fp32 on both; the tiny models' logits are far from
    # ties): ids, provenance and finish reasons
    ref = cpu.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER,
                           config=dataclasses.replace(cfg, speculate=0))
    assert len(outs) == len(ref) == len(PROMPTS_BASE)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert [o.from_nudger for o in outs] == [r.from_nudger for r in ref]
    assert [o.finish_reason for o in outs] == [r.finish_reason for r in ref]
    flags = [f for o in outs for f in o.from_nudger]
    assert 0 < sum(flags) < len(flags)  # both models write
