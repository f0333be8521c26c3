"""The FastAPI app of ``fewstep serve``: OpenAI-compatible endpoints, SSE streaming and the live page.

One background thread (:meth:`TextGenerator.start`) owns the engine and calls ``step()`` in a loop;
the handlers here only submit and cancel requests and receive their events through an asyncio queue
per request (the engine thread hands events over with ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fewstep.decoding.text import Canvas, Completion, Delta, Settings, SettingsError, TextGenerator
from fewstep.serve.protocol import ApiError, chunk, new_id, parse_body, parse_request, response, usage


@dataclass
class ServeConfig:
    """What the server serves and its limits."""

    model_name: str
    defaults: Settings
    aliases: set[str] = field(default_factory=set)  # other names accepted in "model" (e.g. the folder path)
    max_batch: int = 32
    max_queue: int = 256  # requests waiting beyond the running set; more answer 429 at once
    api_key: str | None = None
    max_body_bytes: int = 1 << 20


class _Bridge:
    """Events of one HTTP request's engine requests, handed from the engine thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def sink(self, index: int):
        def put(event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return put


def create_app(gen: TextGenerator, cfg: ServeConfig) -> FastAPI:
    """The app; its lifespan starts and stops the engine thread."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        gen.start()
        try:
            yield
        finally:
            gen.stop()

    app = FastAPI(title="fewstep serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    names = {cfg.model_name, *cfg.aliases}

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(_req: Request, exc: Exception):
        err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}")
        return JSONResponse(err.body(), status_code=500)

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
            raise ApiError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request) -> dict[str, Any]:
        limit = cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}", code="body_too_large")
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
            parts.append(part)
        return parse_body(b"".join(parts))

    @app.get("/health")
    async def health():
        alive = gen.running()
        active = gen.active()
        body = {"status": "ok" if alive else "error", "model": cfg.model_name,
                "running": min(active, cfg.max_batch), "queued": max(0, active - cfg.max_batch)}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        from fewstep.decoding.policies import POLICIES

        d = cfg.defaults
        card = {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "fewstep",
                "max_model_len": gen.context,
                "fewstep": {"policy": str(d.policy), "max_tokens": d.max_tokens, "block_length": d.block_length,
                            "cache": d.cache, "policies": list(POLICIES)}}
        return {"object": "list", "data": [card]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("fewstep.serve").joinpath("static/index.html").read_text("utf-8"))

    async def handle(request: Request, chat: bool):
        check_key(request)
        body = await read_body(request)
        parsed = parse_request(body, chat=chat, defaults=cfg.defaults, model_names=names, model=cfg.model_name)
        try:
            prepared = [gen.prepare(p, parsed.settings) for p in parsed.prompts]
        except SettingsError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        except (ValueError, TypeError) as exc:  # encoding the prompt (e.g. no chat template)
            raise ApiError(400, str(exc), param="messages" if chat else "prompt") from None
        if not gen.running():
            raise ApiError(503, "the engine is not running", code="engine_unavailable")
        active = gen.active()
        if active + len(prepared) > cfg.max_batch + cfg.max_queue:
            queued = max(0, active - cfg.max_batch)
            raise ApiError(429, f"the server is busy ({queued} requests queued, limit {cfg.max_queue}); retry later",
                           code="queue_full")
        bridge = _Bridge(asyncio.get_running_loop())
        ids = [gen.submit(p, parsed.settings, bridge.sink(i), canvas=parsed.denoise, prepared=pre)
               for i, (p, pre) in enumerate(zip(parsed.prompts, prepared))]
        rid = new_id(chat)
        if parsed.stream:
            return StreamingResponse(
                _sse(gen, bridge, ids, rid, parsed), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        comps = await _collect(gen, bridge, ids, request)
        if comps is None:
            return JSONResponse({}, status_code=499)
        failed = next((c for c in comps if c.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, f"the engine failed: {failed.stop}")
        return response(rid, parsed.model, comps, chat)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


async def _collect(gen: TextGenerator, bridge: _Bridge, ids: list, request: Request) -> list[Completion] | None:
    """Wait for every completion; a client that disconnects cancels its requests (None)."""
    done: dict[int, Completion] = {}
    try:
        while len(done) < len(ids):
            try:
                index, ev = await asyncio.wait_for(bridge.queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if isinstance(ev, Completion):
                done[index] = ev
        return [done[i] for i in range(len(ids))]
    finally:
        for i, rid in enumerate(ids):
            if i not in done:
                gen.cancel(rid)


def _sse_line(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(gen: TextGenerator, bridge: _Bridge, ids: list, rid: str, parsed):
    """Server-sent events: text deltas (or denoise canvases), one finish chunk per choice, then [DONE]."""
    done: dict[int, Completion] = {}
    chat, model = parsed.chat, parsed.model
    try:
        if chat and not parsed.denoise:
            for i in range(len(ids)):
                yield _sse_line(chunk(rid, model, chat, i, None, None, first=True))
        while len(done) < len(ids):
            index, ev = await bridge.queue.get()
            if isinstance(ev, Delta) and not parsed.denoise:
                yield _sse_line(chunk(rid, model, chat, index, ev.text, None))
            elif isinstance(ev, Canvas) and parsed.denoise:
                yield _sse_line(_canvas(rid, model, index, ev))
            elif isinstance(ev, Completion):
                done[index] = ev
                if ev.finish_reason == "error":
                    yield _sse_line(ApiError(500, f"the engine failed: {ev.stop}").body())
                    continue
                yield _sse_line(_finish(rid, model, chat, index, ev, parsed))
        if parsed.include_usage:
            yield _sse_line({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                             "created": int(time.time()), "model": model, "choices": [],
                             "usage": usage([done[i] for i in range(len(ids))])})
        yield "data: [DONE]\n\n"
    finally:
        for i, r in enumerate(ids):
            if i not in done:
                gen.cancel(r)


def _canvas(rid: str, model: str, index: int, ev: Canvas) -> dict[str, Any]:
    return {"id": rid, "object": "fewstep.denoise.step", "model": model, "index": index, "nfe": ev.nfe,
            "block": ev.block, "tokens": ev.tokens, "pieces": ev.pieces, "steps": ev.steps,
            "committed": ev.committed, "text": ev.text}


def _finish(rid: str, model: str, chat: bool, index: int, comp: Completion, parsed) -> dict[str, Any]:
    if parsed.denoise:
        return {"id": rid, "object": "fewstep.denoise.done", "model": model, "index": index, "text": comp.text,
                "finish_reason": comp.finish_reason, "nfe": comp.nfe, "policy": comp.policy,
                "usage": usage([comp])}
    out = chunk(rid, model, chat, index, None, comp.finish_reason)
    if not parsed.include_usage:
        out["usage"] = usage([comp])
    return out
