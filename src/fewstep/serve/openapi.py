"""The request bodies of ``/v1/completions`` and ``/v1/chat/completions`` in the published OpenAPI schema
(``GET /openapi.json``). Documentation only: requests are checked by :mod:`fewstep.serve.protocol`."""

from __future__ import annotations

from typing import Any

_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_COMMON: dict[str, Any] = {
    "model": {"type": "string", "description": "the served model's name, its folder path or folder name"},
    "max_tokens": {"type": "integer", "minimum": 1, "description": "the answer length (the diffusion canvas)"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "seed": {"type": "integer", "description": "the request's own random stream"},
    "stop": {
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 256}, "maxItems": 16},
        ]
    },
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "n": {"type": "integer", "minimum": 1, "maximum": 1},
    "policy": {"type": "string", "description": "unmasking policy spec, e.g. threshold:0.9"},
    "threshold": {"type": "number", "minimum": 0},
    "cache": {"type": "string", "enum": ["none", "prefix", "dual"]},
    "block_length": {"type": "integer", "minimum": 1},
    "max_nfe": {"type": "integer", "minimum": 1},
    "eos_fill": {
        "type": "boolean",
        "description": "d3LLM's EOS stop: after the first EOS every position is EOS at once, no forward spent on it",
    },
    "stream_mode": {"type": "string", "enum": ["text", "denoise"]},
}
COMPLETION = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 64},
                _TOKEN_IDS,
                {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 64},
            ]
        },
        **_COMMON,
    },
}
_PART = {"type": "object", "required": ["type", "text"],
         "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}  # fmt: skip
CHAT = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string"},
                    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _PART}]},
                },
            },
        },
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        **_COMMON,
    },
}


def body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body follows ``schema``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
