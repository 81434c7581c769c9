"""`nudgefast bench` end to end on the CPU with tiny models (the CI acceptance of issue 6), the
planted random weights of the shape presets, and the RESULTS.md generator on a fixture."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import nudgefast as nf
from nudgefast import bench
from nudgefast.config import spec_from_config
from tiny_models import make_tiny, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
HAS_SPECULATIVE = importlib.util.find_spec("nudgefast.speculative") is not None
PROMPT_LEN, NEW_TOKENS = 12, 12
SCENARIO_FIELDS = {
    "name", "engine", "case", "mode", "granularity", "speculate", "batch", "prompt_len", "new_tokens", "dtype",
    "gate", "threshold", "repeats", "seconds", "seconds_median", "tokens_per_s_aggregate", "tokens_per_s_per_seq",
    "ms_per_token", "latency_source", "ttft_ms", "host_syncs_per_token", "host_syncs_source", "nudged_fraction",
    "acceptance", "anchor_check", "bytes_per_step", "bandwidth_bound_tokens_per_s", "decode_tokens_per_s",
    "fraction_of_bound",
}


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-pair")
    tok = train_tokenizer()
    # the llama pair of test_nudging.py: logits scaled so the gate mixes both sources
    base = make_tiny("llama", root / "base", seed=1, tokenizer=tok, head_scale=9.0)
    nudger = make_tiny("llama", root / "nudger", seed=2, tokenizer=tok, head_scale=9.0)
    return base, nudger


@pytest.fixture(scope="module")
def cpu_run(tiny_pair, tmp_path_factory):
    base, nudger = tiny_pair
    out = tmp_path_factory.mktemp("bench-out") / "cpu-tiny.json"
    argv = ["--base", str(base), "--nudger", str(nudger), "--mode", "base_only,nudging", "--granularity", "token,word",
            "--speculate", "0,2" if HAS_SPECULATIVE else "0", "--batch", "1,2", "--prompt-len", str(PROMPT_LEN),
            "--new-tokens", str(NEW_TOKENS), "--threshold", "0.5", "--anchors", "--warmup", "1", "--repeats", "2",
            "--threads", "1", "--out", str(out), "--quiet"]
    assert bench.main(argv) == 0
    return json.loads(out.read_text()), argv


def test_result_names_its_machine_commit_and_command(cpu_run):
    result, argv = cpu_run
    assert result["schema"] == bench.SCHEMA
    assert result["command"].endswith("nudgefast bench " + " ".join(argv))
    assert len(result["git"]["commit"]) == 40 and isinstance(result["git"]["dirty"], bool)
    dev = result["device"]
    assert dev["type"] == "cpu" and dev["name"] and dev["torch"] == torch.__version__ and "triton" in dev
    assert result["random_weights"] is False
    assert result["copy_bandwidth_gbps"] > 0


def test_every_scenario_has_every_figure(cpu_run):
    result, _ = cpu_run
    scenarios = result["scenarios"]
    cases = {s["case"] for s in scenarios}
    expected = {"base_only-b1", "nudging-token-b1", "nudging-word-b1", "base_only-b2", "nudging-token-b2",
                "nudging-word-b2"}
    if HAS_SPECULATIVE:
        expected |= {"nudging-token-K2-b1", "nudging-word-K2-b1", "nudging-token-K2-b2", "nudging-word-K2-b2"}
    assert cases == expected
    for s in scenarios:
        missing = SCENARIO_FIELDS - set(s)
        assert not missing, f"{s['name']} lacks {missing}"
        assert not any(k.startswith("_") for k in s)
        assert s["repeats"] == 2 and len(s["seconds"]) == 2
        assert s["tokens_per_s_aggregate"] > 0
        assert s["tokens_per_s_per_seq"] == pytest.approx(s["tokens_per_s_aggregate"] / s["batch"])
        ms = s["ms_per_token"]
        assert 0 < ms["p50"] <= ms["p90"] <= ms["p99"]
        assert s["ttft_ms"] > 0
        if s["mode"] == "nudging":  # the pair and threshold are chosen so that both models write
            assert 0.0 < s["nudged_fraction"] < 1.0
        assert s["bandwidth_bound_tokens_per_s"] > 0 and s["fraction_of_bound"] > 0
        assert len(s["cpu_seconds"]) == 2 and s["tokens_per_cpu_s"] > 0
        if s["mode"] == "base_only":
            assert s["nudged_fraction"] == 0.0
        if s["engine"] == "nudgefast":
            assert s["anchor_check"] is None
            if s["speculate"]:
                acc = s["acceptance"]
                assert acc["rounds"] > 0 and acc["drafted"] == acc["rounds"] * s["speculate"]
                assert acc["acceptance_rate"] == pytest.approx(acc["accepted"] / acc["drafted"])
                assert 0 <= acc["accepted"] <= acc["drafted"]
                assert s["host_syncs_per_token"] < 0.5
            else:
                # one flag read per flag_interval (16) steps: once for 12 tokens
                assert s["host_syncs_per_token"] == pytest.approx(1 / NEW_TOKENS)
                # the clock saw every decode step of every timed run: a sample per token after the first
                assert ms["n"] == s["repeats"] * (NEW_TOKENS - 1)
                assert s["acceptance"] is None


def test_anchors_ran_their_equality_check_and_matched(cpu_run):
    result, _ = cpu_run
    anchors = [s for s in result["scenarios"] if s["engine"] != "nudgefast"]
    assert {s["batch"] for s in anchors} == {1}  # anchors run one sequence at a time
    by_case = {s["case"]: s["engine"] for s in anchors}
    assert by_case["base_only-b1"] == "hf_generate"
    assert by_case["nudging-token-b1"] == "hf_nudging_token"
    assert by_case["nudging-word-b1"] == "hf_nudging_chunked"
    for s in anchors:
        chk = s["anchor_check"]
        assert chk["ran"] is True and chk["against"] == "nudgefast"
        assert chk["equal"] is True, f"{s['name']}: {chk}"
        assert chk["tokens_compared"] == NEW_TOKENS
        assert s["comparison"]["equal_work"] is True and s["comparison"]["speedup_ratio_of_medians"] > 0
        assert s["comparison"]["speedup_cpu_time"] > 0
        if s["mode"] == "nudging":
            assert s["host_syncs_per_token"] >= 1.0  # counted in the loop: at least one read per token
    nudged = [s["nudged_fraction"] for s in anchors if s["mode"] == "nudging"]
    assert any(0.0 < f < 1.0 for f in nudged), "no case mixes both sources: the gate was not exercised"


def test_bytes_per_step_counts_weights_and_kv(cpu_run, tiny_pair):
    result, _ = cpu_run
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32)
    cfg = hf.config
    weights = 4 * (sum(p.numel() for p in hf.parameters()) - hf.model.embed_tokens.weight.numel())
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    s = next(s for s in result["scenarios"] if s["case"] == "base_only-b2" and s["engine"] == "nudgefast")
    context = PROMPT_LEN + NEW_TOKENS / 2
    assert s["bytes_per_step"]["bytes"] == int(weights + kv_per_token * context * 2)


def test_compare_outputs_reports_the_first_divergence():
    rec = lambda ids, flags, finish="length": bench.RunRecord(0.1, [ids], [flags], [finish])  # noqa: E731
    same = bench.compare_outputs(rec([1, 2, 3], [True, False, False]), rec([1, 2, 3], [True, False, False]))
    assert same["equal"] and same["first_divergence"] is None
    diff = bench.compare_outputs(rec([1, 2, 3], [True, False, False]), rec([1, 5, 3], [True, False, False]))
    assert not diff["equal"] and diff["first_divergence"] == 1
    short = bench.compare_outputs(rec([1, 2, 3], [True] * 3), rec([1, 2], [True] * 2, "stop"))
    assert not short["equal"] and short["first_divergence"] == 2
    flags = bench.compare_outputs(rec([1, 2], [True, False]), rec([1, 2], [True, True]))
    assert not flags["equal"] and not flags["provenance_equal"]


@pytest.mark.parametrize("preset,dtype", [("olmo2-tiny+tiny", torch.bfloat16), ("llama-tiny+tiny", torch.float32)])
def test_planted_preset_follows_its_map_and_matches_transformers(preset, dtype):
    """Random planted weights: greedy decoding follows the planted next-token map, the transformers
    twin (sharing the same tensors) writes the same tokens, and the gate mixes both sources."""
    models = bench.preset_models(preset, "cpu", dtype, kv_cache_tokens=512)
    engine = models.engine
    prompt = torch.randint(0, engine.base.spec.vocab_size, (10,), generator=torch.Generator().manual_seed(3)).tolist()
    cfg = nf.NudgeConfig(mode="base_only", max_new_tokens=24, stop_token_ids=[])
    out = engine.generate_ids([prompt], None, cfg)[0]
    planted = bench.planted_next_map(engine.base.spec.vocab_size, 0)
    chain = [prompt[-1]] + out.token_ids
    assert all(int(planted[a]) == b for a, b in zip(chain, chain[1:]))
    anchors = bench.load_anchors()
    hf = models.load_hf()
    ref = anchors.hf_generate(hf["base"], prompt, cfg, set())
    assert ref.token_ids == out.token_ids
    word = nf.NudgeConfig(mode="nudging", granularity="word", max_new_tokens=40, stop_token_ids=[])
    mixed = engine.generate_ids([prompt], [prompt], word)[0]
    assert 0.1 < mixed.nudged_fraction < 0.9
    # a synthetic tokenizer has no token strings: its random word-start table is the definition here
    table = engine.nudger.tokenizer.word_start_table(engine.nudger.spec.vocab_size)
    ref = anchors.nudging_loop_chunked(hf["base"], hf["nudger"], prompt, prompt, word, set(), table)
    assert (ref.token_ids, ref.from_nudger) == (mixed.token_ids, mixed.from_nudger)


def test_plot_is_written_when_matplotlib_is_installed(cpu_run, tmp_path):
    result, _ = cpu_run
    for s in result["scenarios"]:
        s["_latencies_ms"] = [1.0, 2.0, 2.5]
    path = tmp_path / "plot.png"
    written = bench.write_plot(result, path)
    assert written == (importlib.util.find_spec("matplotlib") is not None)
    assert path.is_file() == written
    if written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "olmo2-7b+1b", "--base", "x"])  # two model sources
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "no-such-preset"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "olmo2-tiny+tiny", "--mode", "sideways"])
    with pytest.raises(ValueError, match="untied"):
        spec = spec_from_config(dict(bench.SHAPES["llama-tiny"], tie_word_embeddings=True))
        bench.planted_weights(spec, 0, "cpu", torch.float32, torch.arange(spec.vocab_size))


# ---- benchmarks/make_results_md.py ---------------------------------------------------------------
def _load_generator():
    spec = importlib.util.spec_from_file_location("make_results_md", REPO / "benchmarks" / "make_results_md.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_results_md"] = module
    spec.loader.exec_module(module)
    return module


def _fixture_scenario(engine, case, tok_s, **extra):
    s = {"name": f"{engine}:{case}", "engine": engine, "case": case, "mode": "nudging", "dtype": "bfloat16",
         "prompt_len": 128, "new_tokens": 256, "batch": 1, "tokens_per_s_aggregate": tok_s,
         "tokens_per_s_per_seq": tok_s, "ms_per_token": {"p50": 1.0, "p90": 2.0, "p99": 3.0, "n": 255},
         "ttft_ms": 12.5, "host_syncs_per_token": 0.0625, "nudged_fraction": 0.25, "acceptance": None,
         "fraction_of_bound": 0.875, "anchor_check": None}
    s.update(extra)
    return s


FIXTURE = {
    "schema": "nudgefast-bench/1", "command": "nudgefast bench --suite gpu-olmo2 --out a|b.json",
    "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True},
    "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "triton": "3.9.0",
               "torch_threads": 16},
    "random_weights": True, "copy_bandwidth_gbps": 2900.0, "models": {"source": "preset:olmo2-7b+1b"},
    "scenarios": [
        _fixture_scenario("nudgefast", "nudging-word-b1", 250.0),
        _fixture_scenario("hf_nudging_chunked", "nudging-word-b1", 20.0, fraction_of_bound=None,
                          anchor_check={"ran": True, "equal": True},
                          comparison={"equal_work": True, "speedup_ratio_of_medians": 12.5,
                                      "speedup_median_of_paired": 12.25, "speedup_cpu_time": None}),
    ],
}


def test_results_md_generator_on_a_fixture(tmp_path):
    gen = _load_generator()
    results = tmp_path / "results"
    results.mkdir()
    (results / "h100-olmo2.json").write_text(json.dumps(FIXTURE))
    out = tmp_path / "RESULTS.md"
    assert gen.main(["--results", str(results), "--out", str(out), "--check"]) == 1  # not written yet
    assert gen.main(["--results", str(results), "--out", str(out)]) == 0
    assert gen.main(["--results", str(results), "--out", str(out), "--check"]) == 0
    text = out.read_text()
    speedup_row = next(line for line in text.splitlines() if "hf_nudging_chunked" in line and "12.50x" in line)
    for piece in ("h100-olmo2.json", "NVIDIA H100 80GB HBM3", "0123456789-dirty", "| yes |", "250.0", "20.0",
                  "12.25x", "`nudgefast bench --suite gpu-olmo2 --out a\\|b.json`"):
        assert piece in speedup_row, piece
    rows = [line for line in text.splitlines() if line.startswith("| h100-olmo2.json") and "ms" not in line]
    scenario_rows = [r for r in rows if "1.0/2.0/3.0" in r]
    assert len(scenario_rows) == 2
    ours = next(r for r in scenario_rows if "| nudgefast |" in r)
    for piece in ("12.5", "0.062", "25%", "88%", "nudging-word-b1 (bfloat16, prompt 128, 256 new)"):
        assert piece in ours, piece


def test_results_md_generator_refuses_other_schemas(tmp_path):
    gen = _load_generator()
    (tmp_path / "x.json").write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(ValueError, match="schema"):
        gen.load_results(tmp_path)
