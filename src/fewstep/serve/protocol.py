"""OpenAI request parsing and response shapes for ``fewstep serve`` (no web framework in here).

Requests are parsed by hand rather than by a schema library so that every mistake gets one clear
OpenAI-style error naming its field (``param``), with status 400, never a traceback. This module checks
only the JSON types of the fields and the fields that exist only in the API (``n``, ``stream_mode``, ...);
the values of the decoding fields, which are the text layer's ``GenerationSettings`` fields under the same
names, are checked by the engine's one validation path (:mod:`fewstep.decoding.request`).
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fewstep.decoding.text import Completion, GenerationSettings

MAX_PROMPTS = 64  # prompts in one /v1/completions request (a list prompt)


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_body(raw: bytes) -> dict[str, Any]:
    """A JSON object from the request body (400 for non-UTF-8 bytes, malformed JSON, a non-object)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding"
        ) from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            code="invalid_json",
        ) from None
    except ValueError as exc:  # a number beyond what Python parses (e.g. an integer of 5,000 digits)
        raise ApiError(400, f"the request body holds a number out of range: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _get(body: dict, name: str, kinds: tuple, default: Any = None, *, what: str | None = None) -> Any:
    """``body[name]`` checked against ``kinds`` (None/absent -> ``default``); bools are not numbers."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise ApiError(
            400,
            f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}; got {value!r}",
            param=name,
            code="invalid_type",
        )
    return value


@dataclass
class Parsed:
    """One parsed /v1 request."""

    prompts: list[Any]
    settings: GenerationSettings
    stream: bool = False
    denoise: bool = False
    include_usage: bool = False
    model: str = ""
    chat: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def parse_request(body: dict, *, chat: bool, defaults: GenerationSettings, model_names: set[str], model: str) -> Parsed:
    """Check fields and types of a completions / chat completions body and build its GenerationSettings."""
    name = _get(body, "model", (str,), model)
    if name not in model_names:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {model!r}",
            param="model",
            code="model_not_found",
        )
    prompts = _messages(body) if chat else _prompts(body)
    n = _get(body, "n", (int,), 1)
    if n != 1:
        raise ApiError(
            400, f"only n = 1 is supported (diffusion decoding here is one answer per prompt); got {n}", param="n"
        )
    for key in ("echo", "logprobs", "top_logprobs", "suffix"):
        if body.get(key):
            raise ApiError(400, f"'{key}' is not supported by fewstep serve", param=key)
    best_of = _get(body, "best_of", (int,), 1)
    if best_of != 1:
        raise ApiError(400, "only best_of = 1 is supported", param="best_of")
    settings = _settings(body, defaults, chat)
    stream = _get(body, "stream", (bool,), False, what="a boolean")
    mode = _get(body, "stream_mode", (str,), "text")
    if mode not in ("text", "denoise"):
        raise ApiError(400, f"'stream_mode' must be 'text' or 'denoise'; got {mode!r}", param="stream_mode")
    opts = _get(body, "stream_options", (dict,), {}, what="an object")
    usage = _get(opts, "include_usage", (bool,), False, what="a boolean")
    return Parsed(prompts, settings, stream, mode == "denoise", usage, name, chat)


def _prompts(body: dict) -> list[Any]:
    p = body.get("prompt")
    if p is None:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_field")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return [p]
    if (isinstance(p, list) and p and all(isinstance(x, str) for x in p)) or (
        isinstance(p, list)
        and p
        and all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in p)
    ):
        prompts = list(p)
    else:
        raise ApiError(
            400,
            "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists (non-empty)",
            param="prompt",
            code="invalid_type",
        )
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request; got {len(prompts)}", param="prompt")
    return prompts


def _messages(body: dict) -> list[Any]:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_field")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            if not all(
                isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content
            ):
                raise ApiError(400, f"messages[{i}].content parts must be text", param=f"messages[{i}].content")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return [out]


#: body fields that are GenerationSettings fields of the same name, with their JSON types (the values are
#: checked by the engine and the text layer, fewstep.decoding.request)
_SETTINGS_FIELDS: dict[str, tuple[tuple[type, ...], str | None]] = {
    "policy": ((str,), None),
    "max_tokens": ((int,), None),
    "block_length": ((int,), None),
    "cache": ((str,), None),
    "seed": ((int,), None),
    "max_nfe": ((int,), None),
    "temperature": ((int, float), "a number"),
    "top_p": ((int, float), "a number"),
    "threshold": ((int, float), "a number"),
    "eos_fill": ((bool,), "a boolean"),
}


def _settings(body: dict, defaults: GenerationSettings, chat: bool) -> GenerationSettings:
    """The request's GenerationSettings: its fields' JSON types checked here, their values by the engine."""
    values = {name: _get(body, name, kinds, what=what) for name, (kinds, what) in _SETTINGS_FIELDS.items()}
    if chat and values["max_tokens"] is None:  # OpenAI's newer name for it
        values["max_tokens"] = _get(body, "max_completion_tokens", (int,))
    for name in ("policy", "cache", "max_tokens", "eos_fill"):
        if values[name] is None:
            values[name] = getattr(defaults, name)
    if values["block_length"] is None and defaults.block_length is not None:
        values["block_length"] = min(defaults.block_length, values["max_tokens"])
    for name in ("temperature", "top_p", "threshold"):
        values[name] = None if values[name] is None else _float(values[name])
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    return defaults.replace(**values, stop=() if stop is None else stop, chat=chat)


def _float(value: int | float) -> float:
    """A JSON number as a float (an integer too large for one: infinity, which no range admits)."""
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


# ---- responses ----------------------------------------------------------------------------------------
# one random draw per process, then a counter (a uuid4 per request costs a syscall)
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNT = itertools.count()


def new_id(chat: bool) -> str:
    """A response id unique to this server process: ``cmpl-`` or ``chatcmpl-``, then 24 hex digits."""
    return ("chatcmpl-" if chat else "cmpl-") + f"{_ID_PREFIX}{next(_ID_COUNT):012x}"


def usage(comps: list[Completion]) -> dict[str, Any]:
    """OpenAI usage plus fewstep's ``nfe`` (forwards), ``tokens_per_forward`` (answer tokens before the first
    EOS / NFE) and ``positions_per_forward`` (committed positions / NFE), over every choice."""
    prompt = sum(c.prompt_tokens for c in comps)
    completion = sum(c.completion_tokens for c in comps)
    nfe = sum(c.nfe for c in comps)
    tokens = sum(c.tokens_per_forward * c.nfe for c in comps)
    committed = sum(c.positions_per_forward * c.nfe for c in comps)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "nfe": nfe,
        "tokens_per_forward": round(tokens / nfe, 4) if nfe else 0.0,
        "positions_per_forward": round(committed / nfe, 4) if nfe else 0.0,
        "latency_s": round(max((c.latency_s for c in comps), default=0.0), 6),
    }


def response(rid: str, model: str, comps: list[Completion], chat: bool) -> dict[str, Any]:
    """The non-streaming completions / chat completions response."""
    if chat:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
                "nfe": c.nfe,
            }
            for i, c in enumerate(comps)
        ]
    else:
        choices = [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None, "nfe": c.nfe}
            for i, c in enumerate(comps)
        ]
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(comps),
    }


def chunk(
    rid: str, model: str, chat: bool, index: int, text: str | None, finish: str | None, *, first: bool = False
) -> dict[str, Any]:
    """One streaming chunk: a text delta (``text``) or the end of a choice (``finish``)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
