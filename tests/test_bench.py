"""`nudgefast bench` end to end on the CPU with tiny models (the CI acceptance of issue 6), the
planted random weights of the shape presets, and the RESULTS.md generator on a fixture."""
import importlib.metadata
import importlib.util
import json
import platform
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
    "name", "engine", "role", "case", "mode", "granularity", "speculate", "batch", "prompt_len", "new_tokens", "dtype",
    "weights_read", "weights_format", "gate", "threshold", "repeats", "seconds", "seconds_median",
    "tokens_per_s_aggregate", "tokens_per_s_per_seq", "ms_per_token", "latency_source", "ttft_ms",
    "host_syncs_per_token", "host_syncs_source", "nudged_fraction", "acceptance", "token_check", "same_tokens",
    "bytes_per_token", "bandwidth_bound_tokens_per_s", "decode_tokens_per_s", "fraction_of_bound",
}
COMPARISON_FIELDS = {"ours", "anchor", "ours_weights", "anchor_weights", "same_weights", "differences", "same_tokens",
                     "speedup_ratio_of_medians", "speedup_median_of_paired", "speedup_cpu_time", "suppressed"}


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


def test_result_names_its_machine_software_commit_and_command(cpu_run):
    result, argv = cpu_run
    assert result["schema"] == bench.SCHEMA
    assert result["command"].endswith("nudgefast bench " + " ".join(argv))
    assert len(result["git"]["commit"]) == 40 and isinstance(result["git"]["dirty"], bool)
    env = result["environment"]
    assert env["python"] == platform.python_version() and env["torch"] == torch.__version__
    assert env["transformers"] == importlib.metadata.version("transformers") and "triton" in env
    dev = result["device"]
    assert dev["type"] == "cpu" and dev["name"] and dev["torch"] == torch.__version__
    cpu = dev["cpu"]
    assert cpu["model_name"] and cpu["logical_cpus"] >= 1
    if Path("/proc/cpuinfo").is_file():
        assert {"vendor", "family", "model", "stepping"} <= set(cpu) and "sse2" in cpu["flags"].split()
    from nudgefast.ops import native_ops_available
    if native_ops_available():
        kernels = result["native_kernels"]
        assert kernels["block_linear"] in ("avx512", "avx2+fma", "portable") and "paged_attention" in kernels
    assert result["random_weights"] is False
    bw = result["read_bandwidth"]
    assert bw["gbps"] > 0 and bw["threads"] == 1 and "sum" in bw["method"]
    models = result["models"]
    assert models["same_model_both_roles"] is False
    for role in ("base", "nudger"):  # no absolute path of this machine, a content hash instead
        assert models[role]["name"] in ("base", "nudger") and len(models[role]["config_sha256"]) == 64
    assert "/" + str(Path.home()).strip("/") not in json.dumps(result)
    assert str(REPO) not in json.dumps(result) or str(REPO) in result["command"]
    assert result["engines"]["nudgefast"]["format"] == "dense"


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
        assert s["weights_read"] == "float32 dense" if s["role"] == "ours" else s["weights_read"].startswith(
            "float32 dense (transformers")
        chk = s["token_check"]  # every timed repeat (and the warm-up of all but the reference), every row
        assert chk["equal"] and s["same_tokens"] and chk["mismatch_count"] == 0
        assert chk["runs_checked"] == 2 + (s["engine"] != "nudgefast")
        assert chk["rows_checked"] == (s["batch"] if s["role"] == "ours" else 1)
        if s["mode"] == "base_only":
            assert s["nudged_fraction"] == 0.0
        if s["engine"] == "nudgefast":
            if s["speculate"]:
                acc = s["acceptance"]
                assert acc["rounds"] > 0 and acc["drafted"] == acc["rounds"] * s["speculate"]
                assert acc["acceptance_rate"] == pytest.approx(acc["accepted"] / acc["drafted"])
                assert 0 <= acc["accepted"] <= acc["drafted"]
                assert s["host_syncs_per_token"] < 0.5
            else:
                # one host read per round: a one-step round for the first token (so it streams right
                # after the prefill), then one round of flag_interval (16) steps for the other 11
                # (the lazy schedule of nudging also reads each forward's candidates: one read per
                # forward it counted)
                forwards = sum((s["forwards_per_run"] or {}).values())  # summed over the rows
                if s["batch"] == 1 or not forwards:
                    assert s["host_syncs_per_token"] == pytest.approx((2 + forwards) / NEW_TOKENS)
                else:  # row 0's reads
                    assert 2 / NEW_TOKENS < s["host_syncs_per_token"] <= (2 + forwards) / NEW_TOKENS
                # the clock saw every decode step of every timed run: a sample per token after the first
                assert ms["n"] == s["repeats"] * (NEW_TOKENS - 1)
                assert s["acceptance"] is None


def test_anchors_ran_their_equality_check_and_matched(cpu_run):
    result, _ = cpu_run
    anchors = [s for s in result["scenarios"] if s["role"] == "anchor"]
    assert {s["batch"] for s in anchors} == {1}  # anchors run one sequence at a time
    by_case = {s["case"]: s["engine"] for s in anchors}
    assert by_case["base_only-b1"] == "hf_generate"
    assert by_case["nudging-token-b1"] == "hf_nudging_token"
    assert by_case["nudging-word-b1"] == "hf_nudging_chunked"
    for s in anchors:
        assert s["token_check"]["against"].startswith("nudgefast warm-up run")
        assert s["same_tokens"] is True, f"{s['name']}: {s['token_check']}"
        (c,) = s["comparisons"]  # one nudgefast engine (dense) in this run
        assert set(c) == COMPARISON_FIELDS
        assert c["ours"] == "nudgefast" and c["same_weights"] and c["same_tokens"] and c["suppressed"] is None
        assert c["speedup_ratio_of_medians"] > 0 and c["speedup_cpu_time"] > 0
        assert not any(d.startswith("weights") for d in c["differences"])
        assert any("speculates" in d for d in c["differences"]) == bool(s["speculate"])
        if s["mode"] == "nudging":
            assert s["host_syncs_per_token"] >= 1.0  # counted in the loop: at least one read per token
    nudged = [s["nudged_fraction"] for s in anchors if s["mode"] == "nudging"]
    assert any(0.0 < f < 1.0 for f in nudged), "no case mixes both sources: the gate was not exercised"


def test_bytes_per_token_are_each_engines_own(cpu_run, tiny_pair):
    result, _ = cpu_run
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32)
    cfg = hf.config
    weights = 4 * (sum(p.numel() for p in hf.parameters()) - hf.model.embed_tokens.weight.numel())
    assert bench.hf_weight_bytes(hf) == weights
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    context = PROMPT_LEN + NEW_TOKENS / 2
    s = next(s for s in result["scenarios"] if s["case"] == "base_only-b2" and s["engine"] == "nudgefast")
    assert s["bytes_per_token"]["bytes"] == int((weights + kv_per_token * context * 2) / 2)
    # the anchors' bytes follow the forwards they ran: generate runs the base once per token
    a = next(s for s in result["scenarios"] if s["case"] == "base_only-b1" and s["engine"] == "hf_generate")
    assert a["forwards_per_run"] == {"base": NEW_TOKENS}
    assert a["bytes_per_token"]["forwards_per_token"] == {"base": 1.0}
    assert a["bytes_per_token"]["bytes"] == int(weights + kv_per_token * context)
    # the chunked word-level anchor skips base forwards while the nudger writes a word
    w = next(s for s in result["scenarios"] if s["case"] == "nudging-word-b1" and s["role"] == "anchor")
    fwd = w["bytes_per_token"]["forwards_per_token"]
    assert fwd["nudger"] == pytest.approx(1.0) and 0 < fwd["base"] <= 1.0
    bound = result["read_bandwidth"]["gbps"] * 1e9 / a["bytes_per_token"]["bytes"]
    assert a["bandwidth_bound_tokens_per_s"] == pytest.approx(bound)


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


def test_compare_outputs_checks_every_row():
    a = bench.RunRecord(0.1, [[1, 2], [3, 4], [5, 6]], [[False] * 2] * 3, ["length"] * 3)
    b = bench.RunRecord(0.1, [[1, 2], [3, 4], [5, 7]], [[False] * 2] * 3, ["length"] * 3)
    out = bench.compare_outputs(a, b)
    assert not out["equal"] and out["rows_checked"] == 3
    assert [r["equal"] for r in out["rows"]] == [True, True, False] and out["first_divergence"] == 1
    check = bench.TokenCheck("reference")
    check.add("timed 1", bench.compare_outputs(a, a))
    assert check.equal
    check.add("timed 2", out)
    d = check.as_dict()
    assert not d["equal"] and d["runs_checked"] == 2 and d["mismatch_count"] == 1
    assert d["mismatches"] == [{"run": "timed 2", "row": 2, "first_divergence": 1, "provenance_equal": True,
                                "finish_reason_equal": True, "tokens_compared": 2}]


def test_schedules_side_by_side(tiny_pair, tmp_path):
    """--schedule lazy,eager: both schedules of word-level nudging on one engine, the same tokens,
    and the lazy runs' bytes follow the forwards they counted (fewer than one per model per token)."""
    base, nudger = tiny_pair
    out = tmp_path / "schedules.json"
    argv = ["--base", str(base), "--nudger", str(nudger), "--mode", "base_only,nudging", "--granularity", "word",
            "--prompt-len", str(PROMPT_LEN), "--new-tokens", str(NEW_TOKENS), "--threshold", "0.5", "--repeats", "1",
            "--threads", "1", "--schedule", "lazy,eager", "--out", str(out), "--quiet"]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    by = {(s["case"], s["engine"]): s for s in result["scenarios"]}
    assert set(by) == {("base_only-b1", "nudgefast"), ("nudging-word-b1", "nudgefast-lazy"),
                       ("nudging-word-b1", "nudgefast-eager")}
    lazy, eager = by["nudging-word-b1", "nudgefast-lazy"], by["nudging-word-b1", "nudgefast-eager"]
    assert lazy["same_tokens"] and eager["same_tokens"]
    assert eager["bytes_per_token"]["forwards_per_token"] == {"base": 1.0, "nudger": 1.0}
    fwd = lazy["bytes_per_token"]["forwards_per_token"]
    assert lazy["forwards_per_run"]["base"] == fwd["base"] * NEW_TOKENS
    assert 1.0 <= fwd["base"] + fwd["nudger"] < 2.0 and lazy["bytes_per_token"]["bytes"] < eager["bytes_per_token"]["bytes"]
    assert lazy["ms_per_token"]["n"] == NEW_TOKENS - 1 and lazy["ttft_ms"] > 0


def test_forced_token_mismatch_suppresses_the_speedup_and_fails_the_command(tiny_pair, tmp_path, capsys):
    """Acceptance of issue 17: a token mismatch in one timed repeat (the test hook corrupts the
    anchor's last repeat; the warm-up and the first repeat are fine) marks the row, gives no
    speed-up, and makes the command exit non-zero unless --allow-mismatch."""
    base, nudger = tiny_pair
    out = tmp_path / "mismatch.json"
    argv = ["--base", str(base), "--nudger", str(nudger), "--mode", "base_only", "--prompt-len", str(PROMPT_LEN),
            "--new-tokens", "6", "--anchors", "--repeats", "2", "--threads", "1", "--no-bandwidth", "--quiet",
            "--test-force-mismatch", "hf_generate", "--out", str(out)]
    assert bench.main(argv) == bench.EXIT_TOKENS_DIFFER
    assert "tokens differ from the reference run in hf_generate:base_only-b1" in capsys.readouterr().err
    result = json.loads(out.read_text())
    ours, anchor = result["scenarios"]
    assert ours["same_tokens"] and not anchor["same_tokens"]
    chk = anchor["token_check"]
    assert chk["runs_checked"] == 3 and chk["mismatch_count"] == 1
    assert chk["mismatches"][0]["run"] == "timed 2" and chk["mismatches"][0]["first_divergence"] == 5
    (c,) = anchor["comparisons"]
    assert set(c) == COMPARISON_FIELDS and c["same_tokens"] is False and "tokens differ" in c["suppressed"]
    assert c["speedup_ratio_of_medians"] is None and c["speedup_median_of_paired"] is None
    assert c["speedup_cpu_time"] is None
    assert result["read_bandwidth"] is None and anchor["fraction_of_bound"] is None
    assert bench.main(argv + ["--allow-mismatch"]) == 0
    gen = _load_generator()
    text = gen.render(gen.load_results(tmp_path))
    row = next(line for line in text.splitlines() if "hf_generate" in line and "| base_only-b1" in line)
    assert "none: tokens differ" in row and "**no**" in row


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    pytest.importorskip("gguf")
    from test_gguf import TINY_TOKENS, write_tiny_gguf

    root = tmp_path_factory.mktemp("bench-gguf")
    spec = ("llama", 2, 64, 4, 2, 16, 96, len(TINY_TOKENS), True)
    write_tiny_gguf(root / "tiny.gguf", spec, tokenizer=True)
    return nf.convert_gguf(root / "tiny.gguf", root / "hf", progress=False)


def test_gguf_rows_stand_next_to_dense_rows_of_the_same_run(gguf_model, tmp_path):
    out = tmp_path / "gguf.json"
    argv = ["--base", str(gguf_model), "--nudger", str(gguf_model), "--mode", "base_only", "--prompt-len", "8",
            "--new-tokens", "6", "--anchors", "--repeats", "1", "--threads", "1", "--weights", "gguf", "--quiet",
            "--allow-mismatch", "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["models"]["same_model_both_roles"] is True
    engines = result["engines"]
    assert engines["nudgefast"]["format"] == "dense" and engines["nudgefast-gguf"]["format"] == "gguf"
    types = engines["nudgefast-gguf"]["sides"]["base"]["gguf_file_types"]
    assert {"Q8_0", "Q4_1"} <= set(types)
    rows = {s["engine"]: s for s in result["scenarios"]}
    # llama.cpp runs on the same GGUF file where llama-cpp-python is installed (never in CI)
    assert set(rows) - {"llamacpp"} == {"nudgefast", "nudgefast-gguf", "hf_generate"}
    if "llamacpp" in rows:
        assert rows["llamacpp"]["weights_format"] == "gguf" and "llama.cpp" in rows["llamacpp"]["weights_read"]
        assert rows["llamacpp"]["decode_tokens_per_s"] > 0  # a decode rate without a bytes-per-token bound
    assert rows["nudgefast-gguf"]["weights_read"].startswith("GGUF blocks (") and "Q4_1" in rows["nudgefast-gguf"][
        "weights_read"]
    # each engine's own bytes: the blocks are fewer than the dense float32 weights
    assert rows["nudgefast-gguf"]["bytes_per_token"]["bytes"] < rows["nudgefast"]["bytes_per_token"]["bytes"]
    comps = rows["hf_generate"]["comparisons"]
    assert [c["ours"] for c in comps] == ["nudgefast", "nudgefast-gguf"]  # same weights first
    dense, gguf = comps
    assert dense["same_weights"] and not gguf["same_weights"]
    assert any(d.startswith("weights: nudgefast reads GGUF blocks") for d in gguf["differences"])
    assert not any("one model plays" in d for d in gguf["differences"])  # base_only: one model runs
    for c in comps:
        assert (c["speedup_ratio_of_medians"] is None) == (not c["same_tokens"])


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


def test_plot_is_written(cpu_run, tmp_path):
    pytest.importorskip("matplotlib")  # installed by scripts/install.sh (the bench extra)
    result, _ = cpu_run
    for s in result["scenarios"]:
        s["_latencies_ms"] = [1.0, 2.0, 2.5]
    path = tmp_path / "plot.png"
    bench.write_plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_batch = dict(result, scenarios=[s for s in result["scenarios"] if s["batch"] == 1])
    bench.write_plot(one_batch, tmp_path / "bars.png")  # one batch size: bars per case
    assert (tmp_path / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_refused():
    from nudgefast.errors import UserError

    with pytest.raises(UserError, match="exactly one model source"):
        bench.parse_args(["--preset", "olmo2-7b+1b", "--base", "x"])  # two model sources
    with pytest.raises(UserError, match="unknown preset"):
        bench.parse_args(["--preset", "no-such-preset"])
    with pytest.raises(UserError, match="unknown mode"):
        bench.parse_args(["--preset", "olmo2-tiny+tiny", "--mode", "sideways"])
    with pytest.raises(UserError, match="--schedule"):
        bench.parse_args(["--preset", "olmo2-tiny+tiny", "--schedule", "lazy,sometimes"])
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


def _fixture_scenario(engine, case, tok_s, role="ours", reads="bfloat16 dense", **extra):
    s = {"name": f"{engine}:{case}", "engine": engine, "role": role, "case": case, "mode": "nudging",
         "dtype": "bfloat16", "prompt_len": 128, "new_tokens": 256, "batch": 1, "tokens_per_s_aggregate": tok_s,
         "tokens_per_s_per_seq": tok_s, "ms_per_token": {"p50": 1.0, "p90": 2.0, "p99": 3.0, "n": 255},
         "ttft_ms": 12.5, "host_syncs_per_token": 0.0625, "nudged_fraction": 0.25, "acceptance": None,
         "weights_read": reads, "same_tokens": True, "token_check": {"runs_checked": 6, "rows_checked": 1},
         "bytes_per_token": {"bytes": 15_000_000_000}, "bandwidth_bound_tokens_per_s": 300.0,
         "fraction_of_bound": 0.875}
    s.update(extra)
    return s


FIXTURE = {
    "schema": "nudgefast-bench/2", "command": "nudgefast bench --suite gpu-olmo2 --out a|b.json",
    "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True},
    "environment": {"python": "3.11.7", "torch": "2.13.0", "transformers": "4.57.0", "triton": "3.9.0"},
    "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "triton": "3.9.0",
               "torch_threads": 16},
    "native_kernels": None, "read_bandwidth": {"gbps": 2900.0, "threads": None},
    "random_weights": True, "models": {"source": "preset:olmo2-7b+1b", "same_model_both_roles": False},
    "engines": {"nudgefast": {"format": "dense", "sides": {}}},
    "scenarios": [
        _fixture_scenario("nudgefast", "nudging-word-b1", 250.0),
        _fixture_scenario("hf_nudging_chunked", "nudging-word-b1", 20.0, role="anchor",
                          reads="bfloat16 dense (transformers, model.safetensors)", fraction_of_bound=None,
                          comparisons=[{"ours": "nudgefast", "same_weights": True, "same_tokens": True,
                                        "differences": ["nudgefast speculates (K=4)"], "suppressed": None,
                                        "speedup_ratio_of_medians": 12.5, "speedup_median_of_paired": 12.25,
                                        "speedup_cpu_time": None}]),
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
    for piece in ("h100-olmo2.json", "0123456789-dirty", "bfloat16 dense (transformers", "250.0", "20.0",
                  "paired 12.25x", "| yes |", "nudgefast speculates (K=4)"):
        assert piece in speedup_row, piece
    rows = [line for line in text.splitlines() if line.startswith("| h100-olmo2.json")]
    scenario_rows = [r for r in rows if "1.0/2.0/3.0" in r]
    assert len(scenario_rows) == 2
    ours = next(r for r in scenario_rows if "| nudgefast |" in r)
    for piece in ("bfloat16 dense", "0.062", "25%", "88%", "15000", "nudging-word-b1 (bfloat16, prompt 128, 256 new)",
                  "yes (6 runs x 1 rows)"):
        assert piece in ours, piece
    run_row = next(r for r in rows if "NVIDIA H100" in r)
    for piece in ("python 3.11.7", "transformers 4.57.0", "2900.0", "`nudgefast bench --suite gpu-olmo2 --out a\\|b.json`"):
        assert piece in run_row, piece


def test_committed_results_are_current_and_clean():
    """RESULTS.md re-states benchmarks/results/ exactly, and no committed result ran on a tree with
    uncommitted changes."""
    gen = _load_generator()
    assert gen.main(["--check"]) == 0
    for name, data in gen.load_results(REPO / "benchmarks" / "results"):
        assert data["git"]["dirty"] is False, f"{name} ran on a dirty tree: re-run it or drop it"


def test_results_md_generator_refuses_other_schemas(tmp_path):
    gen = _load_generator()
    (tmp_path / "x.json").write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(ValueError, match="schema"):
        gen.load_results(tmp_path)


def test_native_kernel_isa_says_what_runs():
    """The JSON's instruction sets come from the extension's own choice: NUDGEFAST_PORTABLE_KERNELS=1
    (block_linear's portable kernel, read once per process) shows as such."""
    import os
    import subprocess

    from nudgefast.ops import native_ops_available

    if not native_ops_available():
        pytest.skip("the C++ ops are not built")
    code = "from nudgefast.bench import native_kernel_isa; print(native_kernel_isa()['block_linear'])"
    forced = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=dict(os.environ, NUDGEFAST_PORTABLE_KERNELS="1")).stdout.strip()
    assert forced == "portable"
    here = bench.native_kernel_isa()
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    if not {"NUDGEFAST_PORTABLE_KERNELS", "NUDGEFAST_BLOCK_KERNEL"} & set(os.environ):
        avx512 = all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"))
        expected = "avx512" if avx512 else "avx2+fma" if "avx2" in flags and "fma" in flags else "portable"
        assert here["block_linear"] == expected


def test_bench_with_tensor_parallelism(tiny_pair, tmp_path):
    # `nudgefast bench --tensor-parallel-size 2`: the base split across 2 processes, its decode steps
    # timed on the sharded gate (the step clock sees them), the size recorded, and no worker left after
    import multiprocessing

    base, nudger = tiny_pair
    out = tmp_path / "tp.json"
    argv = ["--base", str(base), "--nudger", str(nudger), "--mode", "base_only,nudging", "--granularity", "word",
            "--batch", "2", "--prompt-len", str(PROMPT_LEN), "--new-tokens", "6", "--threshold", "0.5",
            "--warmup", "0", "--repeats", "1", "--no-bandwidth", "--tensor-parallel-size", "2", "--out", str(out),
            "--quiet"]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["tensor_parallel_size"] == 2
    for s in result["scenarios"]:
        assert s["same_tokens"], s["name"]
        # base_only steps run the sharded gate; nudging on the CPU takes the lazy schedule (runner/lazy.py)
        want = "decode step period" if s["mode"] == "base_only" else "time between positions done by every row"
        assert s["latency_source"].startswith(want), s["latency_source"]
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("nudgefast-tp")]


def test_gguf_q8_runs_its_own_engine_beside_the_dense_one(gguf_model, tmp_path):
    """--weights gguf-q8: an engine on the GGUF blocks with 8-bit activations, named and labelled so
    (it once ran the dense engine alone)."""
    out = tmp_path / "gguf-q8.json"
    argv = ["--base", str(gguf_model), "--nudger", str(gguf_model), "--mode", "base_only", "--prompt-len", "8",
            "--new-tokens", "6", "--repeats", "1", "--threads", "1", "--weights", "gguf-q8", "--quiet",
            "--allow-mismatch", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = {s["engine"]: s for s in json.loads(out.read_text())["scenarios"]}
    assert set(rows) == {"nudgefast", "nudgefast-gguf-q8"}
    assert rows["nudgefast-gguf-q8"]["weights_format"] == "gguf"
    assert "8-bit activations (gguf-q8)" in rows["nudgefast-gguf-q8"]["weights_read"]
