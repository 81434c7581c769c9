"""`nudgefast serve` through the real `openai` client (and raw HTTP for what the client cannot
send): a tiny nudging pair behind a server on a free loopback port, started here and stopped after.

Every answer the server gives is held equal to what an engine of its own (same model directories,
loaded separately) writes for the same prompts: the server must build the DESIGN.md prompts, pass
the sampling and nudging parameters through, and not lose or reorder text."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import nudgefast as nf  # noqa: E402
from nudgefast.serve.app import ServerLimits, create_app  # noqa: E402
from nudgefast.serve.background import BackgroundServer  # noqa: E402
from nudgefast.serve.metrics import parse_prometheus  # noqa: E402
from nudgefast.serve.protocol import ChoiceText  # noqa: E402

KEY = "sk-test-0123456789"
MODEL = "tiny-nudge"
SYSTEM = "Answer briefly."
QUESTIONS = ["Please explain how to bake bread.", "What is the answer to six times seven?",
             "All that glitters is", "Ask not what your country"]
THRESHOLD = 0.4  # tests/pairs.py: llama, top_prob, word granularity mixes both writers
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tiny_models import make_tiny, train_tokenizer

    root = tmp_path_factory.mktemp("serve")
    tok = train_tokenizer()
    base = make_tiny("llama", root / "base", seed=1, tokenizer=tok, head_scale=9.0)
    nudger = make_tiny("llama", root / "nudger", seed=2, tokenizer=tok, head_scale=9.0)
    return base, nudger, nf.NudgingEngine(base=base, nudger=nudger, page_size=4)  # the oracle


@pytest.fixture(scope="module")
def served(pair):
    base, nudger, ref = pair
    engine = nf.NudgingEngine(base=base, nudger=nudger, page_size=4, kv_cache_tokens=4096)
    app = create_app(engine, model_name=MODEL, api_key=KEY, limits=ServerLimits(max_body_bytes=BODY_LIMIT))
    with BackgroundServer(app) as url:
        yield url, ref
    # BackgroundServer.__exit__ stopped it: the port answers no more
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def client(url, **kw):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60, **kw)


def nudging(**kw):
    return {"nudging": {"threshold": THRESHOLD, **kw}}


def ref_chat(ref, question, max_tokens, **cfg):
    cfg.setdefault("threshold", THRESHOLD)
    return ref.generate([question], nf.NudgeConfig(max_new_tokens=max_tokens, **cfg), system_prompt=SYSTEM)[0]


def stream_chat(cl, **kw):
    text, flags, chunks = "", [], []
    for chunk in cl.chat.completions.create(stream=True, **kw):
        chunks.append(chunk)
        for ch in chunk.choices:
            if ch.delta.content:
                text += ch.delta.content
                flags.append((ch.delta.content, ch.model_extra["nudged"]))
    return text, flags, chunks


def spans_from_flags(flags) -> list[list[int]]:
    spans, pos = [], 0
    for text, nudged in flags:
        if nudged:
            if spans and spans[-1][1] == pos:
                spans[-1][1] += len(text)
            else:
                spans.append([pos, pos + len(text)])
        pos += len(text)
    return spans


# ---- the text accumulator, alone -----------------------------------------------------------------
def test_choice_text_stop_string_across_deltas_and_provenance():
    c = ChoiceText(["STOP", "xy"])
    c.add([("hello ", False), ("wor", True)], [1, 2], [False, True])
    assert "".join(t for t, _ in c.release()) == "hello "  # 3 chars held back (longest stop - 1)
    c.add([("ld ST", True)], [3], [True])
    c.add([("OP and more", False)], [4], [False])
    assert c.finished and c.finish_reason == "stop" and c.stopped_by_string
    assert c.text == "hello world "
    rest = c.release()
    assert rest == [("wor", True), ("ld ", True)] or "".join(t for t, _ in rest) == "world "
    assert c.nudged_spans == [[6, 12]]
    assert (c.tokens, c.nudged_tokens) == (4, 2)


def test_choice_text_without_stop_releases_everything_at_once():
    c = ChoiceText([])
    c.add([("a", True), ("b", True), ("c", False)], [1, 2, 3], [True, True, False])
    assert c.release() == [("ab", True), ("c", False)]
    c.add([], finished=True, finish_reason="length")
    assert c.finished and c.finish_reason == "length" and c.release() == []
    assert c.nudged_spans == [[0, 2]] and c.nudged_fraction == pytest.approx(2 / 3)


# ---- the endpoints ---------------------------------------------------------------------------------
def test_models_health_and_chat_matches_the_engine(served):
    url, ref = served
    cl = client(url)
    assert [m.id for m in cl.models.list().data] == [MODEL]
    assert httpx.get(f"{url}/health").status_code == 200  # no key needed there
    for q in QUESTIONS[:2]:
        r = cl.chat.completions.create(model=MODEL, max_tokens=24, extra_body=nudging(),
                                       messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        want = ref_chat(ref, q, 24)
        ch = r.choices[0]
        assert ch.message.content == want.text
        assert ch.finish_reason == want.finish_reason
        extra = ch.model_extra
        assert extra["nudged_fraction"] == pytest.approx(want.nudged_fraction)
        u = r.usage.model_extra
        assert r.usage.completion_tokens == len(want.token_ids)
        assert u["nudged_tokens"] == sum(want.from_nudger)
        assert u["base_prompt_tokens"] > 0 and u["nudger_prompt_tokens"] > u["base_prompt_tokens"]  # template adds
        assert r.usage.prompt_tokens == u["base_prompt_tokens"] + u["nudger_prompt_tokens"]
        for a, b in extra["nudged_spans"]:
            assert 0 <= a < b <= len(ch.message.content)


def test_completions_batch_matches_each_prompt_alone(served):
    url, ref = served
    cl = client(url)
    tok = ref.base.tokenizer
    prompts = QUESTIONS[2:]
    r = cl.completions.create(model=MODEL, prompt=prompts, max_tokens=16, extra_body=nudging())
    assert [c.index for c in r.choices] == [0, 1]
    for p, c in zip(prompts, r.choices):
        ids = tok.encode(p)
        want = ref.generate_ids([ids], [ids], nf.NudgeConfig(max_new_tokens=16, threshold=THRESHOLD))[0]
        assert c.text == want.text
        assert c.model_extra["nudged_fraction"] == pytest.approx(want.nudged_fraction)
    assert r.usage.completion_tokens == sum(
        len(ref.generate_ids([tok.encode(p)], [tok.encode(p)], nf.NudgeConfig(max_new_tokens=16, threshold=THRESHOLD))[0]
            .token_ids) for p in prompts)


def test_streaming_completions_batch_equals_non_streaming(served):
    url, _ = served
    cl = client(url)
    kw = dict(model=MODEL, prompt=QUESTIONS[:3], max_tokens=16, stop=["e t"], extra_body=nudging())
    full = cl.completions.create(**kw)
    texts, flags, finish = {}, {}, {}
    for chunk in cl.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.text:
                flags.setdefault(ch.index, []).append((ch.text, ch.model_extra["nudged"]))
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
        if chunk.usage:
            usage = chunk.usage
    for c in full.choices:
        assert texts[c.index] == c.text and finish[c.index] == c.finish_reason
        assert spans_from_flags(flags.get(c.index, [])) == c.model_extra["nudged_spans"]
    assert usage.model_dump() == full.usage.model_dump()


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95, "seed": 1234}],
                         ids=["greedy", "seeded"])
def test_streaming_chat_equals_non_streaming(served, sampling):
    url, _ = served
    cl = client(url)
    kw = dict(model=MODEL, max_tokens=32, extra_body=nudging(), **sampling,
              messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}])
    full = cl.chat.completions.create(**kw)
    text, flags, chunks = stream_chat(cl, stream_options={"include_usage": True}, **kw)
    assert text == full.choices[0].message.content and text
    # every chunk says who wrote it, and the chunks' flags give the same spans as the whole answer
    assert spans_from_flags(flags) == full.choices[0].model_extra["nudged_spans"]
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_nudging_parameters_change_what_is_written(served):
    url, _ = served
    cl = client(url)
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[1]}]
    out = {}
    for mode in ("base_only", "nudger_only", "nudging"):
        r = cl.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, extra_body=nudging(mode=mode))
        out[mode] = r.choices[0]
        out[mode + "_usage"] = r.usage
    assert out["base_only"].model_extra["nudged_spans"] == [] and out["base_only"].model_extra["nudged_fraction"] == 0
    t = out["nudger_only"].message.content
    assert out["nudger_only"].model_extra["nudged_spans"] == [[0, len(t)]]
    assert out["nudger_only"].model_extra["nudged_fraction"] == 1.0
    assert 0 < out["nudging"].model_extra["nudged_fraction"] < 1  # both wrote
    assert out["base_only"].message.content != out["nudger_only"].message.content
    assert out["base_only_usage"].model_extra["nudger_prompt_tokens"] == 0
    assert out["nudger_only_usage"].model_extra["base_prompt_tokens"] == 0
    # the gate threshold is passed through: 0 keeps the base model everywhere but the first word
    r = cl.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24,
                                   extra_body={"nudging": {"threshold": 0.0, "granularity": "token"}})
    assert r.choices[0].model_extra["nudged_fraction"] < out["nudging"].model_extra["nudged_fraction"]


def test_stop_strings_end_the_text_without_them(served):
    url, _ = served
    cl = client(url)
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    full = cl.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, extra_body=nudging())
    text = full.choices[0].message.content
    assert len(text) > 12
    stop = text[8:11]
    want = text[:text.find(stop)]
    r = cl.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, stop=[stop, "\u2603never"],
                                   extra_body=nudging())
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    for a, b in r.choices[0].model_extra["nudged_spans"]:
        assert b <= len(want)
    streamed, _, _ = stream_chat(cl, model=MODEL, messages=msgs, max_tokens=40, stop=stop, extra_body=nudging())
    assert streamed == want


def test_stop_token_ids_add_to_the_end_of_answer_ids(served):
    url, ref = served
    cl = client(url)
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    first = ref.generate([QUESTIONS[0]], nf.NudgeConfig(mode="base_only", max_new_tokens=8))[0].token_ids
    assert len(first) == 8
    r = cl.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                   extra_body={"stop_token_ids": [first[3]], "nudging": {"mode": "base_only"}})
    want = ref.base.tokenizer.decode(first[:first.index(first[3])])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"


# ---- load with disconnects -------------------------------------------------------------------------
def test_load_with_disconnects_then_nothing_left_running(served):
    url, _ = served
    specs = [dict(q=q, sampling=s) for q in QUESTIONS for s in ({"temperature": 0.0},
                                                                  {"temperature": 0.8, "seed": 7})]
    cl = client(url)

    def kw(spec):
        return dict(model=MODEL, max_tokens=20, extra_body=nudging(), **spec["sampling"],
                    messages=[{"role": "user", "content": spec["q"]}])

    alone = [cl.chat.completions.create(**kw(s)).choices[0].message.content for s in specs]

    def metrics():
        return parse_prometheus(httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text)

    aborted_before = metrics()["nudgefast_requests_aborted_total"]

    async def one(i, acl):
        spec = specs[i % len(specs)]
        leave = i % 3 == 0
        text, n = "", 0
        # a client that leaves asks for a long answer: it is surely still being written when it goes
        stream = await acl.chat.completions.create(stream=True, **{**kw(spec), **({"max_tokens": 150} if leave else {})})
        async for chunk in stream:
            n += 1
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if leave and n >= 2:
                await stream.close()  # the client goes away mid-answer
                return i, None
        return i, text

    async def run():
        acl = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i, acl) for i in range(32))), timeout=120)
        finally:
            await acl.close()

    results = asyncio.run(run())
    stayed = [(i, t) for i, t in results if t is not None]
    assert len(stayed) == 32 - len(range(0, 32, 3))
    for i, t in stayed:
        assert t == alone[i % len(specs)], f"client {i}"
    deadline = time.monotonic() + 20
    while True:  # aborted requests free their pages at the engine's next step: bounded wait
        m = metrics()
        idle = (m["nudgefast_requests_running"] == 0 and m["nudgefast_requests_pending"] == 0
                and m['nudgefast_kv_pages_used{model="base"}'] == 0
                and m['nudgefast_kv_pages_used{model="nudger"}'] == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle, m
    # every client that left was still being answered: the engine aborted each one
    assert m["nudgefast_requests_aborted_total"] - aborted_before == 32 - len(stayed)
    assert m['nudgefast_kv_pages_total{model="base"}'] > 0
    assert m["nudgefast_time_to_first_token_seconds_count"] >= len(stayed)
    assert m["nudgefast_generation_tokens_total"] > 0


# ---- bad input -------------------------------------------------------------------------------------
def _chat(**over):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 4}
    body.update(over)
    return body


BAD = {
    "malformed_json": (b'{"model": "tiny-nudge", "messages": [', 400),
    "wrong_type_messages": (_chat(messages="hello"), 422),
    "wrong_type_max_tokens": (_chat(max_tokens="5"), 422),
    "wrong_type_temperature": (_chat(temperature="hot"), 422),
    "wrong_type_nudging": (_chat(nudging=["mode"]), 422),
    "negative_max_tokens": (_chat(max_tokens=-3), 400),
    "huge_max_tokens": (_chat(max_tokens=10**12), 400),
    "negative_temperature": (_chat(temperature=-0.5), 400),
    "top_p_zero": (_chat(top_p=0), 400),
    "top_p_above_one": (_chat(top_p=1.5), 400),
    "unknown_model": (_chat(model="gpt-17"), 404),
    "unknown_nudging_mode": (_chat(nudging={"mode": "shove"}), 400),
    "unknown_nudging_key": (_chat(nudging={"strength": 3}), 400),
    "n_two": (_chat(n=2), 400),
    "empty_messages": (_chat(messages=[]), 400),
    "too_many_stops": (_chat(stop=["a", "b", "c", "d", "e"]), 400),
    "prompt_longer_than_context": (_chat(messages=[{"role": "user", "content": "the quick brown fox " * 200}]), 400),
    "body_over_limit": (_chat(messages=[{"role": "user", "content": "x" * (BODY_LIMIT + 10)}]), 413),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_openai_error_and_server_goes_on(served, case):
    url, _ = served
    body, status = BAD[case]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{url}/v1/chat/completions", content=data, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    ok = httpx.post(f"{url}/v1/chat/completions", json=_chat(), headers=headers, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_api_key_and_unknown_routes(served):
    url, _ = served
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, f"{url}{path}", headers=headers, json=_chat(), timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, path)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    r = httpx.get(f"{url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client(url).completions.create(model=MODEL, prompt="hi", temperature=-1)


def test_serve_command_refuses_bad_options(capsys):
    from nudgefast.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


# ---- client disconnects, against a slow stand-in engine (timing under control) --------------------
class SlowEngine:
    """The AsyncNudgingEngine surface, writing one character every 20 ms until max_new_tokens;
    records which requests were closed before they finished (what the real engine aborts)."""

    def __init__(self, engine):
        self.engine = self
        self._real = engine
        self.running: set[str] = set()
        self.aborted: list[str] = []

    def __getattr__(self, name):  # tokenizers and specs of the real models
        return getattr(self._real, name)

    def kv_usage(self):
        return {"base": {"used": 4 * len(self.running), "total": 64}}

    def counts(self):
        return {"running": len(self.running), "waiting": 0, "finished": 0, "aborted": len(self.aborted)}

    async def stream(self, prompt=None, config=None, *, request_id=None, **kw):
        from types import SimpleNamespace

        self.running.add(request_id)
        done = False
        try:
            for i in range(config.max_new_tokens):
                await asyncio.sleep(0.02)
                last = i == config.max_new_tokens - 1
                done = last
                yield SimpleNamespace(request_id=request_id, token_ids=[7], from_nudger=[i % 2 == 0], text="x",
                                      pieces=[("x", i % 2 == 0)], finished=last,
                                      finish_reason="length" if last else None, completion=None)
        finally:
            self.running.discard(request_id)
            if not done:
                self.aborted.append(request_id)

    def abort(self, request_id):
        if request_id not in self.running:
            raise ValueError(f"unknown request {request_id}")

    async def close(self):
        pass


def test_client_disconnect_aborts_the_request(pair):
    _, _, ref = pair
    slow = {}
    app = create_app(ref, model_name=MODEL, async_engine_factory=lambda e: slow.setdefault("e", SlowEngine(e)),
                     limits=ServerLimits(max_pending=1))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200}

    def wait_aborted(n):
        deadline = time.monotonic() + 10
        while len(slow["e"].aborted) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(slow["e"].aborted) == n and not slow["e"].running

    with BackgroundServer(app) as url:
        cl = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        stream = cl.chat.completions.create(stream=True, **body)
        got = [next(iter(stream)) for _ in range(3)]
        with pytest.raises(openai.InternalServerError) as busy:  # one request in flight is this server's limit
            cl.chat.completions.create(**body)
        assert busy.value.status_code == 503 and busy.value.body["code"] == "overloaded"
        stream.close()  # mid-answer: 200 characters take 4 s
        assert len(got) == 3 and wait_aborted(1)
        with pytest.raises(httpx.TimeoutException):  # a non-streaming client that gives up
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.3)
        assert wait_aborted(2)
        m = parse_prometheus(httpx.get(f"{url}/metrics").text)
        assert m["nudgefast_requests_pending"] == 0 and m['nudgefast_kv_pages_used{model="base"}'] == 0
        # and it goes on serving
        r = cl.chat.completions.create(**{**body, "max_tokens": 5})
        assert r.choices[0].message.content == "xxxxx" and r.choices[0].model_extra["nudged_spans"] == [
            [0, 1], [2, 3], [4, 5]]


# ---- different tokenizers (the demo pair's case): the answer is shared as text --------------------
def test_cross_vocabulary_pair_serves_text_spans_and_streams(tmp_path):
    from tiny_models import make_tiny, train_tokenizer

    base = make_tiny("olmo2", tmp_path / "base", seed=1, tokenizer=train_tokenizer(400), head_scale=7.5, extra_vocab=3)
    nudger = make_tiny("llama", tmp_path / "nudger", seed=2, tokenizer=train_tokenizer(320), head_scale=9.0)
    engine = nf.NudgingEngine(base=base, nudger=nudger, page_size=4, kv_cache_tokens=1024)
    ref = nf.NudgingEngine(base=base, nudger=nudger, page_size=4, kv_cache_tokens=1024)
    assert engine.cross_vocabulary
    with BackgroundServer(create_app(engine, model_name=MODEL)) as url:
        cl = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        kw = dict(model=MODEL, max_tokens=24, extra_body={"nudging": {"threshold": 0.6}},
                  messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}])
        r = cl.chat.completions.create(**kw)
        want = ref.generate([QUESTIONS[0]], nf.NudgeConfig(max_new_tokens=24, threshold=0.6), system_prompt=SYSTEM)[0]
        ch = r.choices[0]
        assert ch.message.content == want.text
        assert 0 < ch.model_extra["nudged_fraction"] < 1  # both wrote
        assert ch.model_extra["nudged_spans"] == [[a, b] for a, b, nudged in want.stats["spans"] if nudged]
        assert (r.usage.completion_tokens, r.usage.model_extra["nudged_tokens"]) == (
            want.stats["emitted_tokens"], want.stats["nudged_tokens"])
        text, flags, _ = stream_chat(cl, **kw)
        assert text == want.text and spans_from_flags(flags) == ch.model_extra["nudged_spans"]


def test_one_log_line_per_request(served, caplog):
    import logging

    url, _ = served
    cl = client(url)
    with caplog.at_level(logging.INFO, logger="nudgefast.serve"):
        r = cl.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        text, _, chunks = stream_chat(cl, model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        with pytest.raises(openai.BadRequestError):
            cl.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], top_p=2)
        deadline = time.monotonic() + 5  # a stream's line is written once its connection is done
        while len(caplog.records) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "nudgefast.serve"]
    assert len(lines) == 3, lines  # lines of a stream are written when it ends: in any order
    assert [ln for ln in lines if f"rid={r.id}-0 " in ln and " 200 " in ln and "finish=length" in ln]
    assert [ln for ln in lines if f"rid={chunks[0].id}-0 " in ln and " 200 " in ln]
    assert [ln for ln in lines if "POST /v1/chat/completions 400" in ln and "finish=refused" not in ln]


# ---- `nudgefast serve --tensor-parallel-size 2`: the real command in a process of its own ----------
def _children(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc)."""
    import os

    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parent_of[int(entry)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parent_of.items() if p in frontier} - found
        found |= frontier
    return found


def test_serve_command_with_tensor_parallelism(pair):
    # the base split across 2 processes behind the real `nudgefast serve`: the answers equal the one-device
    # engine's, and stopping the server (SIGINT, as Ctrl-C) ends its workers too
    import signal
    import socket
    import subprocess
    import sys

    base, nudger, ref = pair
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "import sys; from nudgefast.cli import main; sys.exit(main())", "serve", "--base",
           str(base), "--nudger", str(nudger), "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY,
           "--served-model-name", MODEL, "--tensor-parallel-size", "2", "--kv-cache-tokens", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:  # bounded: the server answers /health once the model (and its worker) is loaded
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        workers = _children(proc.pid)
        assert workers  # the tensor-parallel worker (and the spawn machinery)
        cl = client(url)
        for q, cfg in ((QUESTIONS[0], {}), (QUESTIONS[1], {"temperature": 0.8, "seed": 3})):
            r = cl.chat.completions.create(model=MODEL, max_tokens=16, extra_body=nudging(), **cfg,
                                           messages=[{"role": "system", "content": SYSTEM},
                                                     {"role": "user", "content": q}])
            want = ref_chat(ref, q, 16, **cfg)
            assert r.choices[0].message.content == want.text
            assert r.usage.completion_tokens == len(want.token_ids)
            assert r.usage.model_extra["nudged_tokens"] == sum(want.from_nudger)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stdout.read()[-3000:]
    deadline = time.monotonic() + 20  # bounded: orphaned workers would be reparented, so look them up by pid
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
