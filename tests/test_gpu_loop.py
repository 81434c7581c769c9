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
    assert all(o.stats["host_reads"] <= reads_allowed for o in outs)
    # the whole answers equal the CPU engine's (fp32 on both): ids, provenance and finish reasons.
    # Exact only because the tiny models' decisions are far from rounding: on the GPU the forward
    # (cuBLAS, the attention kernels) sums in other orders, and the gate kernels use fast-math exp/log
    # with FMA contraction (tests/gpu_margins.py), so p_top and the logits differ from the CPU's by
    # ~1e-6 relative; one decision within that of the threshold or of a tie would fork the text. No
    # per-token tolerance can absorb a fork; if this fails, compare the first differing step's p_top
    # with the threshold (and its top-2 logit gap) before suspecting the loop.
    ref = cpu.generate_ids(base_prompts=PROMPTS_BASE, nudger_prompts=PROMPTS_NUDGER,
                           config=dataclasses.replace(cfg, speculate=0))
    assert len(outs) == len(ref) == len(PROMPTS_BASE)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert [o.from_nudger for o in outs] == [r.from_nudger for r in ref]
    assert [o.finish_reason for o in outs] == [r.finish_reason for r in ref]
    flags = [f for o in outs for f in o.from_nudger]
    assert 0 < sum(flags) < len(flags)  # both models write
