"""The FastAPI app of ``fewstep serve``: OpenAI-compatible endpoints, SSE streaming and the live page.

One background thread (:meth:`TextGenerator.start`) owns the engine and calls ``step()`` in a loop;
the handlers here only submit and cancel requests and receive their events through an asyncio queue
per request (the engine thread hands events over with ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fewstep.decoding.text import TEXT_NAMES, Canvas, Completion, Delta, GenerationSettings, RequestError, TextGenerator
from fewstep.serve.protocol import ApiError, chunk, new_id, parse_body, parse_request, response, usage


@dataclass
class ServeConfig:
    """What the server serves and its limits."""

    model_name: str
    defaults: GenerationSettings
    aliases: set[str] = field(default_factory=set)  # other names accepted in "model" (e.g. the folder path)
    max_batch: int = 32
    max_queue: int = 256  # requests waiting beyond the running set; more answer 429 at once
    api_key: str | None = None
    max_body_bytes: int = 1 << 20


class _Bridge:
    """Events of one HTTP request's engine requests, handed from the engine thread to the event loop.

    The engine thread appends to a deque and wakes the loop with ``loop.call_soon_threadsafe`` only when
    no wake-up is pending, so a round's events for one request cost one wake-up; :meth:`get` returns
    everything that arrived (one SSE write per wake-up, not one per event)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.ready = loop, collections.deque(), asyncio.Event()
        self.lock, self.pending = threading.Lock(), False

    def sink(self, index: int):
        def put(event) -> None:
            with self.lock:
                self.items.append((index, event))
                wake, self.pending = not self.pending, True
            if wake:
                with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
                    self.loop.call_soon_threadsafe(self._wake)

        return put

    def _wake(self) -> None:
        with self.lock:
            self.pending = False
        self.ready.set()

    async def get(self) -> list[tuple[int, Any]]:
        """Every event that arrived since the last call (waits for at least one)."""
        while True:
            with self.lock:
                if self.items:
                    out = list(self.items)
                    self.items.clear()
                    return out
                self.ready.clear()
            await self.ready.wait()


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
    _install_errors(app)
    routes = _Routes(gen, cfg)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.get("/", response_class=HTMLResponse)(routes.page)
    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat_completions)
    return app


def _install_errors(app: FastAPI) -> None:
    """Every error is ``{"error": {...}}``: ours, the router's (404, 405) and any bug (500, no traceback)."""

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


class _Routes:
    """The endpoints, over one TextGenerator and its config."""

    def __init__(self, gen: TextGenerator, cfg: ServeConfig):
        self.gen, self.cfg = gen, cfg
        self.names = {cfg.model_name, *cfg.aliases}

    def check_key(self, request: Request) -> None:
        key = self.cfg.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(
                401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    async def read_body(self, request: Request) -> dict[str, Any]:
        limit = self.cfg.max_body_bytes
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

    async def health(self):
        alive, active, cfg = self.gen.running(), self.gen.active(), self.cfg
        body = {
            "status": "ok" if alive else "error",
            "model": cfg.model_name,
            "running": min(active, cfg.max_batch),
            "queued": max(0, active - cfg.max_batch),
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    async def models(self, request: Request):
        from fewstep.decoding.policies import POLICIES

        self.check_key(request)
        d = self.cfg.defaults
        knobs = {"policy": str(d.policy), "max_tokens": d.max_tokens, "block_length": d.block_length,
                 "cache": d.cache, "policies": list(POLICIES)}  # fmt: skip
        card = {"id": self.cfg.model_name, "object": "model", "created": 0, "owned_by": "fewstep",
                "max_model_len": self.gen.context, "fewstep": knobs}  # fmt: skip
        return {"object": "list", "data": [card]}

    async def page(self):
        return HTMLResponse(resources.files("fewstep.serve").joinpath("static/index.html").read_text("utf-8"))

    async def completions(self, request: Request):
        return await self.handle(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self.handle(request, chat=True)

    def admit(self, parsed, chat: bool) -> list:
        """Encode and validate every prompt, then check the queue (429 at once when full)."""
        gen, cfg = self.gen, self.cfg
        try:
            prepared = [gen.prepare(p, parsed.settings) for p in parsed.prompts]
        except RequestError as exc:  # stated in the text layer's field names, which are the API's
            err = exc.renamed(TEXT_NAMES)
            raise ApiError(400, str(err), param=err.field) from None
        except (ValueError, TypeError) as exc:  # encoding the prompt (e.g. no chat template)
            raise ApiError(400, str(exc), param="messages" if chat else "prompt") from None
        if not gen.running():
            raise ApiError(503, "the engine is not running", code="engine_unavailable")
        active = gen.active()
        if active + len(prepared) > cfg.max_batch + cfg.max_queue:
            queued = max(0, active - cfg.max_batch)
            msg = f"the server is busy ({queued} requests queued, limit {cfg.max_queue}); retry later"
            raise ApiError(429, msg, code="queue_full")
        return prepared

    async def handle(self, request: Request, chat: bool):
        self.check_key(request)
        body = await self.read_body(request)
        cfg = self.cfg
        parsed = parse_request(body, chat=chat, defaults=cfg.defaults, model_names=self.names, model=cfg.model_name)
        prepared = self.admit(parsed, chat)
        bridge = _Bridge(asyncio.get_running_loop())
        ids = [
            self.gen.submit(p, parsed.settings, bridge.sink(i), canvas=parsed.denoise, prepared=pre)
            for i, (p, pre) in enumerate(zip(parsed.prompts, prepared))
        ]
        rid = new_id(chat)
        if parsed.stream:
            return StreamingResponse(
                _sse(self.gen, bridge, ids, rid, parsed),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        comps = await _collect(self.gen, bridge, ids, request)
        if comps is None:  # the client went away; nobody reads this
            return JSONResponse({}, status_code=499)
        failed = next((c for c in comps if c.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, f"the request failed: {failed.error}", code="request_failed")
        return response(rid, parsed.model, comps, chat)


async def _collect(gen: TextGenerator, bridge: _Bridge, ids: list, request: Request) -> list[Completion] | None:
    """Wait for every completion; a client that disconnects cancels its requests (None)."""
    done: dict[int, Completion] = {}
    try:
        while len(done) < len(ids):
            try:
                events = await asyncio.wait_for(bridge.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            done.update((index, ev) for index, ev in events if isinstance(ev, Completion))
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
            yield "".join(_sse_line(chunk(rid, model, chat, i, None, None, first=True)) for i in range(len(ids)))
        while len(done) < len(ids):
            lines = []  # everything that arrived since the last write goes out in one write
            for index, ev in await bridge.get():
                if isinstance(ev, Delta) and not parsed.denoise:
                    lines.append(_sse_line(chunk(rid, model, chat, index, ev.text, None)))
                elif isinstance(ev, Canvas) and parsed.denoise:
                    lines.append(_sse_line(_canvas(rid, model, index, ev)))
                elif isinstance(ev, Completion):
                    done[index] = ev
                    if ev.finish_reason == "error":
                        err = ApiError(500, f"the request failed: {ev.error}", code="request_failed")
                        lines.append(_sse_line(err.body()))
                    else:
                        lines.append(_sse_line(_finish(rid, model, chat, index, ev, parsed)))
            if len(done) < len(ids):
                yield "".join(lines)
        if parsed.include_usage:
            lines.append(
                _sse_line(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": int(time.time()),
                        "model": model,
                        "choices": [],
                        "usage": usage([done[i] for i in range(len(ids))]),
                    }
                )
            )
        yield "".join(lines) + "data: [DONE]\n\n"
    finally:
        for i, r in enumerate(ids):
            if i not in done:
                gen.cancel(r)


def _canvas(rid: str, model: str, index: int, ev: Canvas) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "fewstep.denoise.step",
        "model": model,
        "index": index,
        "nfe": ev.nfe,
        "block": ev.block,
        "tokens": ev.tokens,
        "pieces": ev.pieces,
        "steps": ev.steps,
        "committed": ev.committed,
        "revised": ev.revised,
        "text": ev.text,
    }


def _finish(rid: str, model: str, chat: bool, index: int, comp: Completion, parsed) -> dict[str, Any]:
    if parsed.denoise:
        return {
            "id": rid,
            "object": "fewstep.denoise.done",
            "model": model,
            "index": index,
            "text": comp.text,
            "finish_reason": comp.finish_reason,
            "nfe": comp.nfe,
            "policy": comp.policy,
            "usage": usage([comp]),
        }
    out = chunk(rid, model, chat, index, None, comp.finish_reason)
    if not parsed.include_usage:
        out["usage"] = usage([comp])
    return out
