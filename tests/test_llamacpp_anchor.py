"""The llama.cpp benchmark anchor (benchmarks/anchors/llamacpp.py) without llama.cpp installed.

Expectations re-stated: the anchor feeds the prompt ids as given, decodes greedily (the argmax of
the logits after the last fed token) for max_new_tokens tokens, stops at a stop id (dropped), times
every emitted token, loads one model per (file, threads, context) and says clearly when
llama-cpp-python is missing; nudgefast bench adds it only to CPU base-only / nudger-only cases of
models converted from GGUF, and only where it is installed. A fake llama_cpp module stands in for
the real one (an optional extra that builds llama.cpp from source).
"""
import sys
import types

import numpy as np
import torch
import pytest

import nudgefast as nf
from benchmarks.anchors import llamacpp

VOCAB = 11


class FakeLlama:
    """What the anchor uses of llama_cpp.Llama. Its logits after token t peak at (3 t + 1) % VOCAB,
    so greedy decoding is a known sequence; it records every eval call."""
    made = []

    def __init__(self, model_path, n_threads, n_threads_batch, n_ctx, **kw):
        self.args = dict(model_path=model_path, n_threads=n_threads, n_threads_batch=n_threads_batch, n_ctx=n_ctx)
        self.n_tokens = 0
        self.fed = []
        FakeLlama.made.append(self)

    def n_vocab(self):
        return VOCAB

    def reset(self):
        self.n_tokens = 0
        self.fed = []

    @property
    def ctx(self):
        return self

    def eval(self, tokens):
        self.fed.append(list(tokens))
        self.n_tokens += len(tokens)
        self.logits = np.zeros(VOCAB, dtype=np.float32)  # llama.cpp's buffer: the last token's logits
        self.logits[(3 * tokens[-1] + 1) % VOCAB] = 1.0


def fake_get_logits_ith(ctx, i):
    assert i == -1
    return np.ctypeslib.as_ctypes(ctx.logits)


@pytest.fixture
def fake_llama(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama,
                                                                        llama_get_logits_ith=fake_get_logits_ith))
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    monkeypatch.setattr(llamacpp, "_MODELS", {})
    FakeLlama.made = []
    return FakeLlama


def greedy(start, n):
    out, t = [], start
    for _ in range(n):
        t = (3 * t + 1) % VOCAB
        out.append(t)
    return out


def test_anchor_decodes_greedily_from_the_prompt_ids(fake_llama):
    cfg = nf.NudgeConfig(mode="base_only", max_new_tokens=6, stop_token_ids=[])
    res = llamacpp.llamacpp_generate("m.gguf", [5, 2, 7], cfg, set(), threads=2)
    assert res.token_ids == greedy(7, 6) and res.finish_reason == "length"
    assert res.from_nudger == [False] * 6 and len(res.token_times) == 6
    llm = fake_llama.made[0]
    assert llm.fed[0] == [5, 2, 7] and all(len(f) == 1 for f in llm.fed[1:])  # prefill, then one per token
    assert len(llm.fed) == 6  # no forward after the last token
    assert llm.args["n_threads"] == llm.args["n_threads_batch"] == 2 and llm.args["n_ctx"] >= 3 + 6
    again = llamacpp.llamacpp_generate("m.gguf", [5, 2, 7], cfg, set(), threads=2)
    assert again.token_ids == res.token_ids and len(fake_llama.made) == 1  # loaded once, reset between runs
    llamacpp.llamacpp_generate("m.gguf", [5, 2, 7], cfg, set(), threads=1)
    assert len(fake_llama.made) == 2  # another thread count is another model


def test_anchor_stops_at_a_stop_id_and_checks_its_input(fake_llama):
    seq = greedy(7, 6)
    cfg = nf.NudgeConfig(mode="base_only", max_new_tokens=6, stop_token_ids=[])
    res = llamacpp.llamacpp_generate("m.gguf", [7], cfg, {seq[3]}, threads=1, from_nudger=True)
    assert res.token_ids == seq[:3] and res.finish_reason == "stop" and res.from_nudger == [True] * 3
    with pytest.raises(ValueError, match="outside the GGUF vocabulary"):
        llamacpp.llamacpp_generate("m.gguf", [VOCAB], cfg, set(), threads=1)
    with pytest.raises(ValueError, match="greedily"):
        llamacpp.llamacpp_generate("m.gguf", [1], nf.NudgeConfig(mode="base_only", temperature=0.7), set(), threads=1)


def test_missing_llama_cpp_is_explained(monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    monkeypatch.setattr(llamacpp, "_MODELS", {})
    with pytest.raises(ImportError, match=r"pip install -e \.\[llamacpp\]"):
        llamacpp.llamacpp_generate("m.gguf", [1], nf.NudgeConfig(mode="base_only"), set(), threads=1)


def test_agreement_counts_the_common_prefix_and_equal_positions():
    assert llamacpp.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == {"common_prefix": 2, "equal_positions": 0.75, "tokens": 4}
    assert llamacpp.agreement([1, 2], [1, 2, 3])["common_prefix"] == 2
    assert llamacpp.agreement([], []) == {"common_prefix": 0, "equal_positions": 0.0, "tokens": 0}


def test_bench_adds_llama_cpp_only_where_it_can_decode_the_same_thing(monkeypatch, tmp_path):
    from nudgefast.bench import runners

    gguf_dir = tmp_path / "converted"
    engine = types.SimpleNamespace(device=types.SimpleNamespace(type="cpu"),
                                   base=types.SimpleNamespace(dir=gguf_dir), nudger=types.SimpleNamespace(dir=tmp_path))
    models = types.SimpleNamespace(engine=engine)
    monkeypatch.setattr(runners, "gguf_source", lambda d: d if d == gguf_dir else
                        (_ for _ in ()).throw(nf.config.ConfigError("not converted")))
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    base_only = nf.NudgeConfig(mode="base_only")
    assert runners.cpu_anchors(models, base_only) == ["llamacpp"]
    assert runners.cpu_anchors(models, nf.NudgeConfig(mode="nudger_only")) == []  # the nudger is not from GGUF
    assert runners.cpu_anchors(models, nf.NudgeConfig(mode="nudging")) == []  # llama.cpp does not nudge
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    assert runners.cpu_anchors(models, base_only) == []
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    engine.device = types.SimpleNamespace(type="cuda")
    assert runners.cpu_anchors(models, base_only) == []


def test_bench_runs_the_llama_cpp_anchor_and_records_its_tokens(fake_llama, monkeypatch, tmp_path):
    """The bench's AnchorRunner on the llama.cpp anchor: no transformers model is loaded, and the
    record carries llama.cpp's tokens and per-token latencies (it once crashed counting forwards)."""
    from nudgefast.bench import runners

    engine = types.SimpleNamespace(device=torch.device("cpu"), base=types.SimpleNamespace(dir=tmp_path))
    models = types.SimpleNamespace(engine=engine, dense_dtype="float32",
                                   load_hf=lambda: pytest.fail("llama.cpp needs no transformers model"))
    monkeypatch.setattr(runners, "gguf_source", lambda d: tmp_path / "m.gguf")
    cfg = nf.NudgeConfig(mode="base_only", max_new_tokens=5, stop_token_ids=[])
    rec = runners.AnchorRunner("llamacpp", models, cfg, [[5, 2, 7]], [[1]], [], None).run()
    assert rec.token_ids == [greedy(7, 5)] and rec.finish == ["length"]
    assert rec.forwards == {} and len(rec.latencies) == 4
