"""The OpenAI wire format as the server speaks it: request parsing and validation, the prompts each
model gets, the per-choice text accumulator (stop strings, provenance) and the response bodies.

Nothing here imports FastAPI: the rules are plain Python and tested without a server.

Status codes (every error body is `{"error": {"message", "type", "param", "code"}}`):
- 400: a value the server cannot use (temperature < 0, top_p outside (0, 1], max_tokens < 1 or past
  the context, unknown nudging mode, n > 1, empty messages, a prompt longer than the context, a
  request the engine refuses);
- 401: missing or wrong API key; 404: unknown model or route; 413: body over the size limit;
- 422: a body that is JSON but not the request's shape (a field of the wrong type);
- 400 too for a body that is not JSON at all (malformed), as OpenAI answers it;
- 503: the server cannot take the request now (at capacity, shutting down, the engine failed).
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 4  # as OpenAI
CHAT_ROLES_SYSTEM = ("system", "developer")
NUDGING_KEYS = ("mode", "gate", "threshold", "granularity", "speculate")
# Request fields the engine has no counterpart for: accepted at their neutral value, refused otherwise,
# so a client never silently gets something else than it asked for.
UNSUPPORTED_UNLESS_NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False, 0),
                              "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "logit_bias": ({},),
                              "suffix": ("",), "tools": ([],)}


class APIError(Exception):
    """An error answered as OpenAI answers it."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or self.TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def wrong_type(param: str, expected: str, value) -> APIError:
    return APIError(422, f"'{param}' must be {expected}, got {type(value).__name__} {_short(value)}", param=param,
                    code="invalid_type")


def _short(value) -> str:
    s = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def parse_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad("the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(422, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_type")
    return body


# ---- typed field readers (bool is an int in Python, never in JSON) ----------------------------
def _int(body: dict, key: str, default=None, *, param=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise wrong_type(param or key, "an integer", v)
    return v


def _number(body: dict, key: str, default=None, *, param=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise wrong_type(param or key, "a number", v)
    if not math.isfinite(v):
        raise bad(f"'{param or key}' must be finite, got {v}", param=param or key)
    return float(v)


def _bool(body: dict, key: str, default=False):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise wrong_type(key, "a boolean", v)
    return v


def _str(body: dict, key: str, default=None):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise wrong_type(key, "a string", v)
    return v


@dataclass
class GenParams:
    """What one request asks for, validated; prompts are built by the caller (chat or completion)."""
    model: str | None
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int] | None
    stream: bool
    include_usage: bool
    nudging: dict = field(default_factory=dict)


def parse_common(body: dict, *, chat: bool, defaults) -> GenParams:
    """The sampling / streaming / nudging fields shared by both endpoints. `defaults` is an
    nf.NudgeConfig with the engine's defaults."""
    model = _str(body, "model")
    max_tokens = _int(body, "max_tokens")
    if chat:
        mct = _int(body, "max_completion_tokens")
        if mct is not None:
            max_tokens = mct
    if max_tokens is not None and max_tokens < 1:
        raise bad(f"max_tokens={max_tokens} must be >= 1", param="max_tokens")
    temperature = _number(body, "temperature")
    temperature = defaults.temperature if temperature is None else temperature
    if temperature < 0:
        raise bad(f"temperature={temperature} must be >= 0 (0 = greedy)", param="temperature")
    top_p = _number(body, "top_p")
    top_p = defaults.top_p if top_p is None else top_p
    if not 0.0 < top_p <= 1.0:
        raise bad(f"top_p={top_p} must be in (0, 1]", param="top_p")
    seed = _int(body, "seed")
    n = _int(body, "n", 1)
    if n != 1:
        raise bad(f"n={n}: this server writes one choice per prompt (n=1)", param="n")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise wrong_type("stop", "a string or a list of strings", stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise bad(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop")
    if any(s == "" for s in stop):
        raise bad("stop strings must not be empty", param="stop")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in stop_ids):
            raise wrong_type("stop_token_ids", "a list of integers", stop_ids)
        if any(i < 0 for i in stop_ids):
            raise bad("stop_token_ids must be non-negative", param="stop_token_ids")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise wrong_type("stream_options", "an object", opts)
        if not stream:
            raise bad("stream_options is only allowed with stream=true", param="stream_options")
        include_usage = _bool(opts, "include_usage")
    for key, neutral in UNSUPPORTED_UNLESS_NEUTRAL.items():
        if key in body and body[key] is not None and body[key] not in neutral:
            raise bad(f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
    return GenParams(model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                     stop_token_ids=stop_ids, stream=stream, include_usage=include_usage,
                     nudging=parse_nudging(body.get("nudging")))


def parse_nudging(obj) -> dict:
    """The `nudging` object (extra_body): only the keys given, typed; values are checked by
    NudgeConfig itself (one source of truth for the ranges)."""
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise wrong_type("nudging", "an object", obj)
    unknown = sorted(set(obj) - set(NUDGING_KEYS))
    if unknown:
        raise bad(f"unknown nudging parameter(s) {unknown}; known: {list(NUDGING_KEYS)}", param=f"nudging.{unknown[0]}")
    out = {}
    for key in ("mode", "gate", "granularity"):
        v = _str(obj, key)
        if v is not None:
            out[key] = v
    v = _number(obj, "threshold", param="nudging.threshold")
    if v is not None:
        out["threshold"] = v
    v = _int(obj, "speculate", param="nudging.speculate")
    if v is not None:
        out["speculate"] = v
    return out


def parse_messages(body: dict) -> tuple[str, str, str]:
    """messages -> (system_prompt, question, answer_prefix).

    System (and developer) turns make the system prompt, the user turns the question (several are
    joined by blank lines), and a final assistant turn is the answer prefix both models continue
    from. An assistant turn before the last user turn (a multi-turn conversation) is refused: the
    nudging prompts of DESIGN.md section 1 have one question."""
    msgs = body.get("messages")
    if msgs is None:
        raise bad("'messages' is required", param="messages")
    if not isinstance(msgs, list):
        raise wrong_type("messages", "a list of messages", msgs)
    if not msgs:
        raise bad("'messages' is empty: give at least one user message", param="messages")
    system, user, prefix = [], [], None
    for i, m in enumerate(msgs):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise wrong_type(param, "an object", m)
        role = m.get("role")
        if not isinstance(role, str):
            raise wrong_type(f"{param}.role", "a string", role)
        content = _content_text(m.get("content"), f"{param}.content")
        if prefix is not None:
            raise bad("multi-turn conversations are not supported: an assistant turn can only be the last message "
                      "(its text is the answer prefix)", param=param)
        if role in CHAT_ROLES_SYSTEM:
            if user:
                raise bad("system messages must come before the user turns", param=param)
            system.append(content)
        elif role == "user":
            user.append(content)
        elif role == "assistant":
            prefix = content
        else:
            raise bad(f"unknown role {role!r}; expected system, developer, user or assistant", param=f"{param}.role")
    question = "\n\n".join(user)
    if not question.strip():
        raise bad("the conversation has no user text to answer", param="messages")
    return "\n".join(system), question, prefix or ""


def _content_text(content, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        out = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad("only text content parts ({'type': 'text', 'text': ...}) are supported", param=f"{param}[{j}]")
            out.append(part["text"])
        return "".join(out)
    if content is None:
        return ""
    raise wrong_type(param, "a string or a list of content parts", content)


def parse_prompts(body: dict) -> list[str]:
    p = body.get("prompt")
    if p is None:
        raise bad("'prompt' is required", param="prompt")
    if isinstance(p, str):
        p = [p]
    elif not isinstance(p, list) or not all(isinstance(s, str) for s in p):
        raise wrong_type("prompt", "a string or a list of strings", p)
    if not p:
        raise bad("'prompt' is an empty list", param="prompt")
    for i, s in enumerate(p):
        if not s:
            raise bad(f"prompt {i} is empty", param="prompt")
    return p


# ---- the text of one choice -----------------------------------------------------------------
class ChoiceText:
    """The text of one choice as the engine writes it, with who wrote each character, the stop
    strings applied, and what may be sent so far.

    A stop string can straddle two engine outputs, so while the answer runs the last
    (longest stop - 1) characters are held back; they are released when the answer ends. The text
    is cut before the first stop string (which is not returned, as OpenAI does)."""

    def __init__(self, stop: list[str]):
        self.stop = list(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.runs: list[list] = []  # [start, end, nudged], adjacent runs of one writer merged
        self.sent = 0
        self.finished = False
        self.finish_reason: str | None = None
        self.stopped_by_string = False
        self.tokens = 0
        self.nudged_tokens = 0

    def add(self, pieces, token_ids=(), from_nudger=(), finished=False, finish_reason=None) -> None:
        """One engine output: its text pieces [(text, by_nudger)], its tokens and flags."""
        if self.finished:
            return
        self.tokens += len(token_ids)
        self.nudged_tokens += sum(bool(f) for f in from_nudger)
        old = len(self.text)
        for text, nudged in pieces:
            if not text:
                continue
            start = len(self.text)
            self.text += text
            if self.runs and self.runs[-1][2] == bool(nudged):
                self.runs[-1][1] = len(self.text)
            else:
                self.runs.append([start, len(self.text), bool(nudged)])
        if self.stop:
            cut = self._find_stop(max(0, old - self.holdback))
            if cut is not None:
                self._truncate(cut)
                self.finished, self.finish_reason, self.stopped_by_string = True, "stop", True
                return
        if finished:
            self.finished, self.finish_reason = True, finish_reason

    def _find_stop(self, frm: int) -> int | None:
        hits = [i for i in (self.text.find(s, frm) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _truncate(self, n: int) -> None:
        self.text = self.text[:n]
        runs = []
        for a, b, nudged in self.runs:
            if a < n:
                runs.append([a, min(b, n), nudged])
        self.runs = runs

    def release(self) -> list[tuple[str, bool]]:
        """The text that may be sent now and was not yet, split by writer."""
        end = len(self.text) if self.finished else max(self.sent, len(self.text) - self.holdback)
        out = []
        for a, b, nudged in self.runs:
            lo, hi = max(a, self.sent), min(b, end)
            if lo < hi:
                out.append((self.text[lo:hi], nudged))
        self.sent = max(self.sent, end)
        return out

    @property
    def nudged_spans(self) -> list[list[int]]:
        return [[a, b] for a, b, nudged in self.runs if nudged]

    @property
    def nudged_fraction(self) -> float:
        return self.nudged_tokens / self.tokens if self.tokens else 0.0


# ---- response bodies ------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(base_prompt: int, nudger_prompt: int, completion: int, nudged: int) -> dict:
    """OpenAI's usage, plus the split by model. prompt_tokens counts both models' prompts (both are
    prefilled); nudged_tokens is the part of completion_tokens the nudger wrote."""
    prompt = base_prompt + nudger_prompt
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "base_prompt_tokens": base_prompt, "nudger_prompt_tokens": nudger_prompt, "nudged_tokens": nudged}


def provenance(choice: ChoiceText) -> dict:
    return {"nudged_spans": choice.nudged_spans, "nudged_fraction": choice.nudged_fraction}


def chat_response(rid: str, model: str, choice: ChoiceText, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": choice.text}, "logprobs": None,
                         "finish_reason": choice.finish_reason, **provenance(choice)}],
            "usage": use}


def completion_response(rid: str, model: str, choices: list[ChoiceText], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                         **provenance(c)} for i, c in enumerate(choices)],
            "usage": use}


def chat_chunk(rid: str, model: str, created: int, delta: dict, *, nudged: bool | None = None,
               finish_reason: str | None = None, extra: dict | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    if nudged is not None:
        choice["nudged"] = nudged
    if extra:
        choice.update(extra)
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, *, nudged: bool | None = None,
                     finish_reason: str | None = None, extra: dict | None = None) -> dict:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if nudged is not None:
        choice["nudged"] = nudged
    if extra:
        choice.update(extra)
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
