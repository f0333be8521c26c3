"""Checks at the server's edge, before any field of a request is read.

The ``Host`` header against the names the server answers to (DNS rebinding), the body's media type
(a cross-site ``text/plain`` form cannot post to a server without an API key), the body's JSON (too
deep a nesting, lone UTF-16 surrogates) and the prompt's size in
characters (refused before any tokenising).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from fewstep.serve.protocol import ApiError, parse_body

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ALL_INTERFACES = ("", "0.0.0.0", "::")
MAX_DEPTH = 64  # arrays and objects in arrays and objects (an OpenAI body needs 5)
CHARS_PER_TOKEN = 16  # the default prompt cap: this many characters per token of the model's context
_SURROGATE = re.compile("[\ud800-\udfff]")


# ---- Host -------------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str, api_key: str | None) -> tuple[str, ...]:
    """The ``Host`` names a server accepts by default: any with an API key or bound to every interface;
    else the bound address, and the loopback names when it is a loopback address."""
    if api_key or bind_host in ALL_INTERFACES:
        return ("*",)
    names = [bind_host.strip("[]").lower()]
    if is_loopback(bind_host):
        names += LOOPBACK_NAMES
    return tuple(dict.fromkeys(names))


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """``--allowed-hosts``: comma-separated names, ``*.example.com`` for a domain's names, ``*`` for any."""
    names = tuple(n.strip().strip("[]").lower().rstrip(".") for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("--allowed-hosts needs at least one name (or * for any)")
    return names


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port, lower case (``[::1]:8000`` -> ``::1``)."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0].rstrip(".") if h.count(":") == 1 else h.rstrip(".")


def host_allowed(header: str, allowed: Iterable[str]) -> bool:
    name = host_name(header)
    for pattern in allowed:
        if pattern == "*" or pattern == name:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


def check_host(header: str | None, allowed: Sequence[str]) -> None:
    if "*" in allowed:
        return
    if not header or not host_allowed(header, allowed):
        raise ApiError(
            400,
            f"the Host header {header!r} is not a name this server answers to ({', '.join(allowed)}); "
            "start it with --allowed-hosts to add names",
            code="invalid_host",
        )


# ---- body -------------------------------------------------------------------------------------------------
def check_media_type(header: str | None) -> None:
    """Only ``application/json`` bodies (a web page can post ``text/plain`` to any server it can reach)."""
    media = (header or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(
            415,
            f"the request body must be JSON sent with 'Content-Type: application/json'; got {header or 'none'!r}",
            code="unsupported_media_type",
        )


def decode_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; 400 for what :func:`parse_body` refuses, too deep a nesting and
    strings that are not valid Unicode (lone surrogates)."""
    try:
        body = parse_body(raw)
    except RecursionError:
        raise _too_deep() from None
    for key, value in body.items():
        _check_value(key, key, 0)
        _check_value(key, value, 1)
    return body


def _too_deep() -> ApiError:
    return ApiError(400, f"the request body nests arrays and objects more than {MAX_DEPTH} levels deep",
                    code="invalid_json")  # fmt: skip


def _check_value(field: str, value: Any, depth: int) -> None:
    """Walk ``value`` (iteratively): no nesting beyond MAX_DEPTH, no string with a lone surrogate."""
    stack = [(value, depth)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and (m := _SURROGATE.search(v)):
                raise ApiError(
                    400,
                    f"'{_printable(field)}' is not valid Unicode text: it holds a lone UTF-16 surrogate "
                    f"\\u{ord(m.group()):04x} (a character above U+FFFF is written as a pair, e.g. "
                    "\\ud83d\\ude00)",
                    param=_printable(field),
                    code="invalid_encoding",
                )
        elif isinstance(v, (list, dict)):
            if d >= MAX_DEPTH:
                raise _too_deep()
            if isinstance(v, dict):
                stack.extend((k, d + 1) for k in v)
                stack.extend((x, d + 1) for x in v.values())
            else:
                stack.extend((x, d + 1) for x in v)


def _printable(text: str) -> str:
    return json.dumps(text)[1:-1] if _SURROGATE.search(text) else text


# ---- prompt size ------------------------------------------------------------------------------------------
def prompt_chars(prompt: Any) -> int:
    """Characters of a text prompt or of chat messages (token-id prompts: 0; their length is checked
    against the context as they are)."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return sum(len(m.get("content", "")) + len(m.get("role", "")) for m in prompt)
    return 0


def check_prompt_chars(prompts: Sequence[Any], cap: int | None, chat: bool) -> None:
    if cap is None:
        return
    for i, p in enumerate(prompts):
        n = prompt_chars(p)
        if n > cap:
            what = "the messages have" if chat else ("the prompt has" if len(prompts) == 1 else f"prompt {i} has")
            raise ApiError(
                400,
                f"{what} {n} characters; this server takes at most {cap} (--max-prompt-chars) before tokenising",
                param="messages" if chat else "prompt",
                code="prompt_too_long",
            )
