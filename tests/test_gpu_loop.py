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
    # float32 on purpose (a float32 checkpoint would default to bf16 on CUDA): compared with the CPU below
    gpu = nf.NudgingEngine(base=cpu.base.dir, nudger=cpu.nudger.dir, device="cuda", dtype="float32", page_size=4,
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
    assert all(o.stats["flag_reads"] <= reads_allowed for o in outs)
    # the first 24 tokens agree with the CPU engine (fp32 on both; later tokens may drift by rounding)
    ref = cpu.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER,
                           config=dataclasses.replace(cfg, max_new_tokens=24, speculate=0))
    assert [o.token_ids[:24] for o in outs] == [r.token_ids for r in ref]
