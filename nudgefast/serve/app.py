"""The FastAPI application: OpenAI-compatible endpoints over the request-level engine.

One AsyncNudgingEngine (created on the server's event loop at start-up) serves every request; each
choice of a request is one engine request, streamed as RequestOutput deltas. The server adds what
the OpenAI API has and the engine does not: stop strings (matched on the text, then the engine
request is aborted), the wire format, limits, API keys, metrics and one log line per request.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import Metrics
from .protocol import (SSE_DONE, APIError, ChoiceText, bad, chat_chunk, chat_response, completion_chunk,
                       completion_response, new_id, parse_common, parse_json_body, parse_messages, parse_prompts,
                       provenance, sse, usage)

log = logging.getLogger("nudgefast.serve")
KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclasses.dataclass
class ServerLimits:
    max_body_bytes: int = 1 << 20       # 413 past this
    max_pending: int = 256              # generation choices in flight at once; 503 past this
    default_max_tokens: int | None = None  # None: the engine's NudgeConfig default (capped by the context)


def default_async_engine(engine):
    import nudgefast as nf

    return nf.AsyncNudgingEngine(engine)


class ServerState:
    def __init__(self, engine, model_name: str, api_key: str | None, limits: ServerLimits, async_engine_factory):
        import nudgefast as nf

        self.engine = engine
        self.model_name = model_name
        self.api_key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.limits = limits
        self.factory = async_engine_factory or default_async_engine
        self.aengine = None
        self.metrics = Metrics()
        self.pending = 0
        self.closing = False
        self.defaults = nf.NudgeConfig()
        self.created = int(time.time())

    # ---- the engine's side -----------------------------------------------------------------
    def counts(self) -> dict:
        return self.aengine.engine.counts() if self.aengine is not None else {}

    def kv_usage(self) -> dict:
        return self.aengine.engine.kv_usage() if self.aengine is not None else {}

    def context_len(self) -> int:
        return min(m.spec.max_position_embeddings for m in (self.engine.base, self.engine.nudger) if m is not None)

    def authorized(self, scope) -> bool:
        if self.api_key_digest is None:
            return True
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                scheme, _, key = v.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    # equal-length digests: the comparison time says nothing about the key
                    return hmac.compare_digest(hashlib.sha256(key.strip().encode()).digest(), self.api_key_digest)
        return False


# ---- building engine requests -----------------------------------------------------------------
@dataclasses.dataclass
class EngineRequest:
    base_ids: list[int] | None
    nudger_ids: list[int] | None
    config: object
    stop: list[str]


def _sides(mode: str) -> tuple[str, ...]:
    return {"nudging": ("base", "nudger"), "base_only": ("base",), "nudger_only": ("nudger",)}[mode]


def build_config(st: ServerState, params):
    import nudgefast as nf

    kw = dict(params.nudging)
    try:
        cfg = nf.NudgeConfig(**kw, temperature=params.temperature, top_p=params.top_p, seed=params.seed)
    except ValueError as e:
        key = next((k for k in kw if k in str(e)), None)
        raise bad(str(e), param=f"nudging.{key}" if key else None) from None
    for side in _sides(cfg.mode):
        m = getattr(st.engine, side)
        if m is None:
            raise bad(f"nudging mode {cfg.mode!r} needs a {side} model; this server has none", param="nudging.mode")
        if m.tokenizer is None:
            raise bad(f"the {side} model has no tokenizer.json: this server cannot take text", param="nudging.mode")
    if params.stop_token_ids:
        # OpenAI's stop_token_ids add to the end-of-answer ids of DESIGN.md section 1 (the engine's
        # own, for this mode); they never replace them.
        try:
            cfg = dataclasses.replace(cfg, stop_token_ids=sorted(set(st.engine.stop_ids_for(cfg))
                                                                 | set(params.stop_token_ids)))
        except ValueError as e:
            raise bad(str(e), param="stop_token_ids") from None
    return cfg


def fit_to_context(st: ServerState, cfg, params, ids: dict, prompt_param: str) -> object:
    """max_new_tokens: the request's max_tokens if prompt + it fits every model's context (400
    otherwise), else the default capped by the room the prompts leave."""
    room = None
    for side, p in ids.items():
        ctx = getattr(st.engine, side).spec.max_position_embeddings
        if len(p) >= ctx:
            raise bad(f"the prompt is {len(p)} tokens for the {side} model, whose context is {ctx} tokens",
                      param=prompt_param, code="context_length_exceeded")
        room = ctx - len(p) if room is None else min(room, ctx - len(p))
    if params.max_tokens is not None:
        if params.max_tokens > room:
            raise bad(f"max_tokens={params.max_tokens} does not fit: the prompt leaves room for {room} tokens "
                      f"in the context", param="max_tokens", code="context_length_exceeded")
        n = params.max_tokens
    else:
        n = min(st.limits.default_max_tokens or st.defaults.max_new_tokens, room)
    return dataclasses.replace(cfg, max_new_tokens=n)


def chat_request(st: ServerState, body: dict, params) -> EngineRequest:
    from ..config import ConfigError
    from ..prompts import build_prompts

    system, question, prefix = parse_messages(body)
    cfg = build_config(st, params)
    try:
        b, n = build_prompts(st.engine, [question], cfg, system, prefix)
    except (ValueError, TypeError, ConfigError) as e:
        raise bad(str(e), param="messages") from None
    ids = {k: v[0] for k, v in (("base", b), ("nudger", n)) if v is not None}
    cfg = fit_to_context(st, cfg, params, ids, "messages")
    return EngineRequest(ids.get("base"), ids.get("nudger"), cfg, params.stop)


def completion_requests(st: ServerState, body: dict, params) -> list[EngineRequest]:
    """/v1/completions continues the prompt text as it is (no chat template), in each model's
    own tokenization (its BOS rule applied)."""
    prompts = parse_prompts(body)
    cfg = build_config(st, params)
    out = []
    for p in prompts:
        ids = {s: getattr(st.engine, s).tokenizer.encode(p) for s in _sides(cfg.mode)}
        c = fit_to_context(st, cfg, params, ids, "prompt")
        out.append(EngineRequest(ids.get("base"), ids.get("nudger"), c, params.stop))
    return out


# ---- one engine request, consumed ---------------------------------------------------------------
class EngineRun:
    """One choice: the engine request, its text (stop strings, provenance) and its timing."""

    def __init__(self, st: ServerState, rid: str, req: EngineRequest, t_arrival: float):
        self.st, self.rid, self.req = st, rid, req
        self.choice = ChoiceText(req.stop)
        self.t_arrival = t_arrival
        self.t_first = self.t_last = None
        self.engine_done = False  # the engine reported finished (nothing to abort)
        self.closed = False
        self.gen = None
        self.started = False  # the engine took the request (start() returned)
        self.prompt_tokens = {"base": len(req.base_ids or ()), "nudger": len(req.nudger_ids or ())}

    @property
    def done(self) -> bool:
        return self.choice.finished

    async def start(self) -> None:
        """Submit, and wait for the first output: a request the engine refuses raises here."""
        from ..config import ConfigError
        from ..kv_cache import KVPoolExhausted

        self.gen = self.st.aengine.stream(base_ids=self.req.base_ids, nudger_ids=self.req.nudger_ids,
                                          config=self.req.config, request_id=self.rid)
        try:
            await self.step()
        except (ValueError, TypeError, ConfigError) as e:  # RequestTooLarge (larger than the whole pool) too
            raise bad(str(e)) from None
        except KVPoolExhausted as e:
            raise APIError(503, str(e), code="kv_cache_full") from None
        self.started = True
        m = self.st.metrics
        for k, v in self.prompt_tokens.items():
            m.prompt_tokens[k] += v

    async def step(self) -> None:
        try:
            out = await self.gen.__anext__()
        except StopAsyncIteration:
            self.engine_done = True
            if not self.choice.finished:
                self.choice.add([], finished=True, finish_reason="abort")
            return
        now = time.perf_counter()
        m = self.st.metrics
        if out.token_ids:
            if self.t_first is None:
                self.t_first = now
                m.ttft.observe(now - self.t_arrival)
            else:
                m.itl.observe(now - self.t_last)
            self.t_last = now
            m.generation_tokens += len(out.token_ids)
            m.nudged_tokens += sum(bool(f) for f in out.from_nudger)
        if out.finished:
            self.engine_done = True
        self.choice.add(out.pieces, out.token_ids, out.from_nudger, out.finished, out.finish_reason)
        if out.finished and out.completion is not None and not self.choice.stopped_by_string:
            stats = getattr(out.completion, "stats", {}) or {}
            if "emitted_tokens" in stats:  # cross-vocabulary: each writer's own tokens
                self.choice.tokens, self.choice.nudged_tokens = stats["emitted_tokens"], stats["nudged_tokens"]

    def abort_now(self) -> None:
        """Abort the engine request now, from a worker thread: it is started without awaiting, so it
        also happens inside a cancelled task (a client that left), and the event loop does not wait
        for the engine's lock while a step runs."""
        if self.closed:
            return
        self.closed = True
        if self.gen is not None and not self.engine_done:
            abort, rid = self.st.aengine.abort, self.rid

            def call():
                try:
                    abort(rid)
                except (ValueError, KeyError):
                    pass  # it finished meanwhile
                except Exception:  # noqa: BLE001 -- a failing abort must not take the server down
                    log.exception("abort of %s failed", rid)

            asyncio.get_running_loop().run_in_executor(None, call)

    async def close(self) -> None:
        self.abort_now()
        if self.gen is not None:
            gen, self.gen = self.gen, None
            try:
                await gen.aclose()
            except Exception:  # noqa: BLE001 -- closing a finished or aborted stream
                pass

    def log_fields(self) -> dict:
        ttft = f"{(self.t_first - self.t_arrival) * 1e3:.0f}ms" if self.t_first else "-"
        return {"rid": self.rid, "mode": self.req.config.mode, "prompt": f"{self.prompt_tokens['base']}+"
                f"{self.prompt_tokens['nudger']}", "completion": self.choice.tokens,
                "nudged": self.choice.nudged_tokens,
                "finish": self.choice.finish_reason or ("aborted" if self.started else "refused"), "ttft": ttft}


async def until_disconnect(request: Request, aw):
    """Run `aw`, cancelled if the client goes away first (then raise ClientGone)."""
    task = asyncio.ensure_future(aw)

    async def watch():
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001
        pass
    raise ClientGone()


class ClientGone(Exception):
    pass


class _Stream(StreamingResponse):
    """A streaming response that always releases its engine requests, even when the body is never
    iterated (the client left before the first byte)."""

    def __init__(self, content, cleanup):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


# ---- the application ----------------------------------------------------------------------------
def create_app(engine, *, model_name: str = "nudgefast", api_key: str | None = None,
               limits: ServerLimits | None = None, async_engine_factory=None) -> FastAPI:
    """The ASGI app over a loaded NudgingEngine. The AsyncNudgingEngine is made on the serving
    event loop at start-up (async_engine_factory(engine), default nf.AsyncNudgingEngine; tests pass
    stand-ins with the same surface)."""
    st = ServerState(engine, model_name, api_key, limits or ServerLimits(), async_engine_factory)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        st.aengine = st.factory(engine)
        try:
            yield
        finally:
            st.closing = True
            await st.aengine.close()

    app = FastAPI(title="nudgefast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.nudgefast = st

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, msg, code=code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(APIError(422, str(e.errors())[:500], code="invalid_type").body(), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request, e):  # a safety net: the handlers below map what they expect
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        err = APIError(503, f"the server could not complete the request ({type(e).__name__})", code="internal")
        return JSONResponse(err.body(), status_code=503)

    async def read_json(request: Request) -> dict:
        limit = st.limits.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            raise APIError(413, f"the request body is {cl} bytes; the limit is {limit}", code="request_too_large")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        return parse_json_body(b"".join(chunks))

    def check_model(params) -> None:
        if params.model is not None and params.model != st.model_name:
            raise APIError(404, f"The model `{params.model}` does not exist; this server serves `{st.model_name}`",
                           param="model", code="model_not_found")

    def admit(n: int) -> None:
        if st.closing or st.aengine is None:
            raise APIError(503, "the server is shutting down", code="unavailable")
        if st.pending + n > st.limits.max_pending:
            raise APIError(503, f"the server is at capacity ({st.pending} requests in flight); retry later",
                           code="overloaded")
        st.pending += n

    async def generate(request: Request, chat: bool):
        t_arrival = time.perf_counter()
        body = await read_json(request)
        params = parse_common(body, chat=chat, defaults=st.defaults)
        check_model(params)
        reqs = [chat_request(st, body, params)] if chat else completion_requests(st, body, params)
        admit(len(reqs))
        rid = new_id("chatcmpl" if chat else "cmpl")
        runs = [EngineRun(st, f"{rid}-{i}", r, t_arrival) for i, r in enumerate(reqs)]
        released = False

        async def release():
            nonlocal released
            for r in runs:
                r.abort_now()
            for r in runs:
                await r.close()
            if not released:
                released = True
                st.pending -= len(runs)
                request.scope.setdefault("state", {})["nf_log"] = _log_fields(runs, params)

        try:
            await until_disconnect(request, _all_or_none([r.start() for r in runs]))
            if not params.stream:
                await until_disconnect(request, _all_or_none([_drain(r) for r in runs]))
        except BaseException:
            for r in runs:
                r.abort_now()
            await release()
            raise
        if not params.stream:
            await release()
            use = _usage(runs)
            if chat:
                return JSONResponse(chat_response(rid, st.model_name, runs[0].choice, use))
            return JSONResponse(completion_response(rid, st.model_name, [r.choice for r in runs], use))
        body_iter = _chat_events(st, rid, runs[0], params) if chat else _completion_events(st, rid, runs, params)
        return _Stream(body_iter, release)

    async def guarded(request: Request, chat: bool):
        try:
            return await generate(request, chat)
        except APIError as e:
            return _error_response(e)
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it; the log line says 499
        except Exception as e:  # noqa: BLE001 -- never a 500, never a traceback in the body
            log.exception("request failed")
            return _error_response(APIError(503, f"the engine failed on this request ({type(e).__name__}: {e})",
                                            code="engine_error"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await guarded(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await guarded(request, chat=False)

    def model_card() -> dict:
        e = st.engine
        return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "nudgefast",
                "max_model_len": st.context_len(),
                "nudging": {"base": str(e.base.dir) if e.base else None,
                            "nudger": str(e.nudger.dir) if e.nudger else None,
                            "defaults": dataclasses.asdict(st.defaults)}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != st.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        if st.closing or st.aengine is None:
            return JSONResponse(APIError(503, "shutting down", code="unavailable").body(), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(st.metrics.render(st.counts(), st.kv_usage(), st.pending),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return _Guard(app, st)


async def _all_or_none(aws):
    """Run concurrently; if one fails (or this is cancelled), cancel the others before raising, so
    that none submits an engine request that nobody aborts."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _drain(run: EngineRun) -> None:
    while not run.done:
        await run.step()


def _usage(runs) -> dict:
    return usage(sum(r.prompt_tokens["base"] for r in runs), sum(r.prompt_tokens["nudger"] for r in runs),
                 sum(r.choice.tokens for r in runs), sum(r.choice.nudged_tokens for r in runs))


def _log_fields(runs, params) -> dict:
    if len(runs) == 1:
        return runs[0].log_fields()
    f = runs[0].log_fields()
    f.update(rid=runs[0].rid.rsplit("-", 1)[0], choices=len(runs), completion=sum(r.choice.tokens for r in runs),
             nudged=sum(r.choice.nudged_tokens for r in runs))
    return f


def _stream_error(e: BaseException) -> bytes:
    log.error("stream failed: %s: %s", type(e).__name__, e)
    return sse(APIError(503, f"the engine failed on this request ({type(e).__name__})", code="engine_error").body())


async def _chat_events(st: ServerState, rid: str, run: EngineRun, params):
    created, model = int(time.time()), st.model_name
    first = sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
    try:
        while True:
            # one write per engine output: its pieces (one chunk per writer) go out together
            out = b"".join(sse(chat_chunk(rid, model, created, {"content": text}, nudged=nudged))
                           for text, nudged in run.choice.release())
            if first:
                out, first = first + out, b""
            if out:
                yield out
            if run.done:
                break
            await run.step()
    except Exception as e:  # noqa: BLE001 -- the status is sent: the error goes in the stream
        yield _stream_error(e)
        yield SSE_DONE
        return
    yield sse(chat_chunk(rid, model, created, {}, finish_reason=run.choice.finish_reason,
                         extra=provenance(run.choice)))
    if params.include_usage:
        yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                   "usage": _usage([run])})
    yield SSE_DONE


async def _completion_events(st: ServerState, rid: str, runs: list[EngineRun], params):
    created, model = int(time.time()), st.model_name
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, run: EngineRun):
        try:
            queue.put_nowait((i, None))  # what start() already received
            while not run.done:
                await run.step()
                queue.put_nowait((i, None))
        except Exception as e:  # noqa: BLE001
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(runs)]
    try:
        left = set(range(len(runs)))
        while left:
            i, err = await queue.get()
            if err is not None:
                yield _stream_error(err)
                yield SSE_DONE
                return
            run = runs[i]
            out = b"".join(sse(completion_chunk(rid, model, created, i, text, nudged=nudged))
                           for text, nudged in run.choice.release())
            if out:
                yield out
            if run.done and i in left:
                left.discard(i)
                yield sse(completion_chunk(rid, model, created, i, "", finish_reason=run.choice.finish_reason,
                                           extra=provenance(run.choice)))
        if params.include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                       "usage": _usage(runs)})
        yield SSE_DONE
    finally:
        for t in tasks:
            t.cancel()


class _Guard:
    """Outermost ASGI layer: the API key (every endpoint but /health), one log line per request,
    and the response count by endpoint and status."""

    def __init__(self, app: FastAPI, st: ServerState):
        self.app, self.st = app, st
        self.state = app.state  # tests and tools reach the ServerState through app.state.nudgefast

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [None]

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        scope.setdefault("state", {})
        path = scope.get("path", "")
        try:
            if path != "/health" and not self.st.authorized(scope):
                err = APIError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            code = status[0] or 499  # no response started: the client went away
            label = path if path in KNOWN_PATHS or path.startswith("/v1/models/") else "other"
            self.st.metrics.count_response(label, code)
            extra = scope["state"].get("nf_log")
            client = scope.get("client") or ("-", 0)
            line = f"{client[0]} {scope.get('method', '-')} {path} {code} {(time.perf_counter() - t0) * 1e3:.0f}ms"
            if extra:
                line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
            log.info(line)
