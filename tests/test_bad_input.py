"""Bad input gets a clear error naming what is wrong, and the engine stays usable afterwards."""
import json
import pickle
import shutil

import pytest

import nudgefast as nf
from tiny_models import make_tiny, train_tokenizer

PROMPT = [5, 17, 42, 99, 7]
GOOD = nf.NudgeConfig(mode="base_only", max_new_tokens=6, stop_token_ids=[])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def engine(model_dir):
    return nf.NudgingEngine(base=model_dir, kv_cache_tokens=200, page_size=8)


@pytest.fixture(scope="module")
def expected(engine):
    return engine.generate_ids(base_prompts=[PROMPT], config=GOOD)[0].token_ids


def _still_serves(engine, expected):
    free = engine.base.kv.allocator.num_free
    assert free == engine.base.kv.num_pages, "pages leaked by a failed request"
    assert engine.generate_ids(base_prompts=[PROMPT], config=GOOD)[0].token_ids == expected


def test_missing_directory_config_and_weights(tmp_path, model_dir):
    with pytest.raises(nf.ConfigError, match="does not exist"):
        nf.NudgingEngine(base=tmp_path / "nope")
    with pytest.raises(nf.ConfigError, match="no config.json"):
        nf.NudgingEngine(base=tmp_path)
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(nf.ConfigError, match="no weights"):
        nf.NudgingEngine(base=tmp_path)


def test_unknown_architecture(tmp_path, model_dir):
    shutil.copytree(model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(nf.ConfigError, match="unknown architecture.*MambaForCausalLM"):
        nf.NudgingEngine(base=tmp_path / "m")


class _Trap:
    """Unpickling this writes a marker file: proof that something was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickled_checkpoint_is_refused_never_unpickled(tmp_path, model_dir, name):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(model_dir / "config.json", d / "config.json")
    marker = tmp_path / "unpickled"
    (d / name).write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(nf.ConfigError, match="never unpickles"):
        nf.NudgingEngine(base=d)
    assert not marker.exists()


def test_tokenizer_that_does_not_match_the_model(tmp_path, model_dir):
    shutil.copytree(model_dir, tmp_path / "m")
    train_tokenizer(vocab_size=600).save(str(tmp_path / "m" / "tokenizer.json"))
    with pytest.raises(nf.ConfigError, match=r"tokenizer.json has \d+ tokens but the model has only 320 embedding rows"):
        nf.NudgingEngine(base=tmp_path / "m")


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(threshold=1.5), "threshold"),
    (dict(mode="beam"), "mode"),
    (dict(speculate=17), "speculate"),
])
def test_config_out_of_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nf.NudgeConfig(**kwargs)


@pytest.mark.parametrize("prompts, match", [
    ([[]], "empty"),
    ([PROMPT, []], "prompt 1 is empty"),
    ([[5, 100000]], "outside the model's vocabulary"),
    ([list(range(1, 255))], "exceeds the model's context of 256"),
    ([], "non-empty list"),
])
def test_bad_prompts(engine, expected, prompts, match):
    with pytest.raises(ValueError, match=match):
        engine.generate_ids(base_prompts=prompts, config=GOOD)
    _still_serves(engine, expected)


def test_request_that_cannot_fit_in_the_kv_pool(engine, expected):
    """A request larger than the whole pool is refused at once (a ValueError, and a KVPoolExhausted);
    requests that fit one at a time but not together wait for pages instead, and all finish."""
    pool_tokens = engine.base.kv.num_pages * engine.base.kv.page_size
    too_big = nf.NudgeConfig(mode="base_only", max_new_tokens=pool_tokens, stop_token_ids=[])
    for error in (nf.KVPoolExhausted, ValueError):
        with pytest.raises(error, match="whole pool"):
            engine.generate_ids(base_prompts=[PROMPT], config=too_big)
    cfg = nf.NudgeConfig(mode="base_only", max_new_tokens=pool_tokens // 2 - len(PROMPT), stop_token_ids=[])
    outs = engine.generate_ids(base_prompts=[PROMPT] * 4, config=cfg)
    assert [len(o.token_ids) for o in outs] == [cfg.max_new_tokens] * 4
    assert len({tuple(o.token_ids) for o in outs}) == 1  # greedy: waiting changes nothing
    _still_serves(engine, expected)


def test_mode_needs_its_model(engine, expected):
    with pytest.raises(ValueError, match="needs a nudger model"):
        engine.generate_ids(nudger_prompts=[PROMPT], config=nf.NudgeConfig(mode="nudger_only"))
    with pytest.raises(ValueError, match="needs a nudger model"):
        engine.generate(["hello"], nf.NudgeConfig(mode="nudging"))
    _still_serves(engine, expected)


def test_empty_question_in_text_api(engine, expected):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([" "], GOOD)
    _still_serves(engine, expected)
