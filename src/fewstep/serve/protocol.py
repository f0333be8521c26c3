"""OpenAI request parsing and response shapes for ``fewstep serve`` (no web framework in here).

Requests are parsed by hand rather than by a schema library so that every mistake gets one clear
OpenAI-style error naming its field (``param``), with status 400, never a traceback.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fewstep.decoding.text import MAX_STOP_LENGTH, MAX_STOP_STRINGS, Completion, Settings

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


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    value = _get(body, name, (int, float), what="a number")
    if value is not None and not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}; got {value}", param=name)
    return None if value is None else float(value)


@dataclass
class Parsed:
    """One parsed /v1 request."""

    prompts: list[Any]
    settings: Settings
    stream: bool = False
    denoise: bool = False
    include_usage: bool = False
    model: str = ""
    chat: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def parse_request(body: dict, *, chat: bool, defaults: Settings, model_names: set[str], model: str) -> Parsed:
    """Check fields and types of a completions / chat completions body and build the decoding Settings."""
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


def _settings(body: dict, defaults: Settings, chat: bool) -> Settings:
    max_tokens = _get(body, "max_completion_tokens", (int,), None) if chat else None
    max_tokens = _get(body, "max_tokens", (int,), max_tokens)
    if max_tokens is not None and max_tokens <= 0:
        raise ApiError(400, f"'max_tokens' must be >= 1; got {max_tokens}", param="max_tokens")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of non-empty strings", param="stop")
    if stop is not None and len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' holds at most {MAX_STOP_STRINGS} strings; got {len(stop)}", param="stop")
    if stop is not None and any(len(s) > MAX_STOP_LENGTH for s in stop):
        raise ApiError(400, f"each stop string is at most {MAX_STOP_LENGTH} characters", param="stop")
    policy = _get(body, "policy", (str,), None)
    cache = _get(body, "cache", (str,), defaults.cache)
    if cache not in ("none", "prefix", "dual"):
        raise ApiError(400, f"'cache' must be one of none, prefix, dual; got {cache!r}", param="cache")
    block = _get(body, "block_length", (int,), None)
    if block is not None and block < 1:
        raise ApiError(400, f"'block_length' must be >= 1; got {block}", param="block_length")
    max_nfe = _get(body, "max_nfe", (int,), None)
    if max_nfe is not None and max_nfe < 1:
        raise ApiError(400, f"'max_nfe' must be >= 1; got {max_nfe}", param="max_nfe")
    seed = _get(body, "seed", (int,), None)
    g = max_tokens if max_tokens is not None else defaults.max_tokens
    if block is None and defaults.block_length is not None:
        block = min(defaults.block_length, g)
    return defaults.replace(
        policy=policy if policy is not None else defaults.policy,
        max_tokens=g,
        block_length=block,  # None: the engine's default (32 at most; a block-diffusion model's own block size)
        cache=cache,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        threshold=_number(body, "threshold", 0.0, 1e9),
        seed=seed,
        stop=tuple(stop or ()),
        max_nfe=max_nfe,
        chat=chat,
    )


# ---- responses ----------------------------------------------------------------------------------------
# one random draw per process, then a counter (a uuid4 per request costs a syscall)
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNT = itertools.count()


def new_id(chat: bool) -> str:
    """A response id unique to this server process: ``cmpl-`` or ``chatcmpl-``, then 24 hex digits."""
    return ("chatcmpl-" if chat else "cmpl-") + f"{_ID_PREFIX}{next(_ID_COUNT):012x}"


def usage(comps: list[Completion]) -> dict[str, Any]:
    """OpenAI usage plus fewstep's ``nfe`` (forwards) and ``tokens_per_forward`` (committed tokens / NFE)."""
    prompt = sum(c.prompt_tokens for c in comps)
    completion = sum(c.completion_tokens for c in comps)
    nfe = sum(c.nfe for c in comps)
    committed = sum(c.tokens_per_forward * c.nfe for c in comps)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "nfe": nfe,
        "tokens_per_forward": round(committed / nfe, 4) if nfe else 0.0,
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
