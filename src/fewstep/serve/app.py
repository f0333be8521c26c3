"""The FastAPI app of ``fewstep serve``: OpenAI-compatible endpoints, SSE streaming and the live page.

One background thread (:meth:`TextGenerator.start`) owns the engine and calls ``step()`` in a loop;
the handlers here only submit and cancel requests and receive their events through an asyncio queue
per request (the engine thread hands events over with ``loop.call_soon_threadsafe``). Decoding the
body and tokenising the prompts run on a worker thread, off the event loop.

The edge (:mod:`fewstep.serve.guards`), health, readiness and the drain at shutdown
(:mod:`fewstep.serve.lifecycle`) and the Prometheus metrics (:mod:`fewstep.serve.metrics`) live beside
this module; the connection deadlines and signal handling in :mod:`fewstep.serve.server`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from fewstep.decoding.text import TEXT_NAMES, Canvas, Completion, Delta, GenerationSettings, RequestError, TextGenerator
from fewstep.serve import guards, openapi
from fewstep.serve.lifecycle import Lifecycle
from fewstep.serve.metrics import CONTENT_TYPE, Metrics
from fewstep.serve.protocol import ApiError, chunk, new_id, parse_request, response, usage


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
    # characters in one prompt (or one chat's messages), refused before tokenising; None: 16 per token of
    # the model's context (guards.CHARS_PER_TOKEN); 0: no cap
    max_prompt_chars: int | None = None
    # Host header names accepted ("*": any; "*.example.com": a domain's names); None: the loopback names
    # without an API key, any with one (guards.default_allowed_hosts for a server bound to 127.0.0.1)
    allowed_hosts: tuple[str, ...] | None = None
    stall_timeout: float = 60.0  # /health is 503 when work is pending and no round finished for this long

    def hosts(self) -> tuple[str, ...]:
        if self.allowed_hosts is not None:
            return tuple(self.allowed_hosts)
        return guards.default_allowed_hosts("127.0.0.1", self.api_key)

    def prompt_cap(self, context: int | None) -> int | None:
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars or None
        return guards.CHARS_PER_TOKEN * context if context else None


class _Bridge:
    """Events of one HTTP request's engine requests, handed from the engine thread to the event loop.

    The engine thread appends to a deque and wakes the loop with ``loop.call_soon_threadsafe`` only when
    no wake-up is pending, so a round's events for one request cost one wake-up; :meth:`get` returns
    everything that arrived (one SSE write per wake-up, not one per event). :meth:`abort` ends the
    request with an :class:`ApiError` (index -1) whatever the engine does (shutdown, a dead engine)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int = 1, on_finish=None):
        self.loop, self.items, self.ready = loop, collections.deque(), asyncio.Event()
        self.lock, self.pending = threading.Lock(), False
        self.n, self.finished, self.on_finish, self.aborted = n, 0, on_finish, False

    def sink(self, index: int):
        def put(event) -> None:
            if isinstance(event, Completion) and self.on_finish is not None:
                with self.lock:
                    self.finished += 1
                self.on_finish(self, event)
            self._put((index, event))

        return put

    def abort(self, err: ApiError) -> None:
        """End the request with ``err`` (once: later aborts are ignored)."""
        with self.lock:
            if self.aborted:
                return
            self.aborted = True
        self._put((-1, err))

    def _put(self, item: tuple[int, Any]) -> None:
        with self.lock:
            self.items.append(item)
            wake, self.pending = not self.pending, True
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
                self.loop.call_soon_threadsafe(self._wake)

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


ENGINE_STOP_WAIT_S = 5.0  # at shutdown: how long to wait for the engine thread (a stuck round is left behind)


def create_app(gen: TextGenerator, cfg: ServeConfig) -> FastAPI:
    """The app; its lifespan starts and stops the engine thread (and the health watcher)."""
    routes = _Routes(gen, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        gen.start()
        routes.life.state = "ready"
        watcher = asyncio.create_task(routes.life.watch())
        try:
            yield
        finally:
            watcher.cancel()
            routes.life.state = "stopped"
            _stop_engine(gen)
            routes.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="fewstep serve",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        dependencies=[Depends(routes.check_host)],
    )
    app.state.lifecycle, app.state.metrics = routes.life, routes.metrics
    _install_errors(app, routes.metrics)
    app.get("/health")(routes.health)
    app.get("/ready")(routes.ready)
    app.get("/metrics")(routes.prometheus)
    app.get("/v1/models")(routes.models)
    app.get("/", response_class=HTMLResponse)(routes.page)
    app.post("/v1/completions", openapi_extra=openapi.body(openapi.COMPLETION))(routes.completions)
    app.post("/v1/chat/completions", openapi_extra=openapi.body(openapi.CHAT))(routes.chat_completions)
    return app


def _stop_engine(gen: TextGenerator) -> None:
    """Stop the engine thread, waiting at most ENGINE_STOP_WAIT_S (a round stuck forever is left behind:
    the thread is a daemon and the process exits without it)."""
    stopper = threading.Thread(target=gen.stop, name="fewstep-engine-stop", daemon=True)
    stopper.start()
    stopper.join(ENGINE_STOP_WAIT_S)


def _install_errors(app: FastAPI, metrics: Metrics) -> None:
    """Every error is ``{"error": {...}}``: ours, the router's (404, 405) and any bug (500, no traceback);
    each one is counted in ``fewstep:request_errors_total``."""

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError):
        metrics.error(exc.status, exc.code or exc.type)
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException):
        err = ApiError(exc.status_code, str(exc.detail))
        metrics.error(err.status, err.code or err.type)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(_req: Request, exc: Exception):
        err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}")
        metrics.error(500, "internal_error")
        return JSONResponse(err.body(), status_code=500)


class _Routes:
    """The endpoints, over one TextGenerator and its config."""

    def __init__(self, gen: TextGenerator, cfg: ServeConfig):
        self.gen, self.cfg = gen, cfg
        self.names = {cfg.model_name, *cfg.aliases}
        self.allowed_hosts = cfg.hosts()
        self.prompt_cap = cfg.prompt_cap(gen.context)
        self.life = Lifecycle(gen, cfg.stall_timeout)
        self.metrics = Metrics(gen, cfg.max_batch)
        # decoding bodies and tokenising prompts, off the event loop (one thread: the tokenizer is shared)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fewstep-prepare")

    def check_host(self, request: Request) -> None:
        """Every route: the Host header must name this server (DNS rebinding; ``--allowed-hosts``)."""
        guards.check_host(request.headers.get("host"), self.allowed_hosts)

    def check_accepting(self) -> None:
        if not self.life.accepting():
            raise ApiError(503, self.life.not_ready() or "the server is not accepting requests", code="shutting_down")

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def finished(self, bridge: _Bridge, comp: Completion) -> None:
        """A request's Completion (engine thread): count it; a request whose every prompt ended is no longer
        in flight (even if its handler never runs again)."""
        self.metrics.finished(comp)
        if bridge.finished >= bridge.n:
            self.life.discard(bridge)

    def check_key(self, request: Request) -> None:
        key = self.cfg.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(
                401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    async def read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}", code="body_too_large")
        parts, size = [], 0
        try:
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
                parts.append(part)
        except ClientDisconnect:  # the client left (or --timeout-read closed it) before its body was in
            raise ApiError(400, "the connection closed before the request body was complete",
                           code="incomplete_body") from None  # fmt: skip
        return b"".join(parts)

    async def health(self):
        """Liveness: 200 while the engine thread is alive and making progress, else 503 with the reason."""
        problem, active, cfg = self.life.problem(), self.gen.active(), self.cfg
        body = {
            "status": "ok" if problem is None else "error",
            "model": cfg.model_name,
            "running": min(active, cfg.max_batch),
            "queued": max(0, active - cfg.max_batch),
        }
        if problem is not None:
            body["reason"] = problem
        return JSONResponse(body, status_code=200 if problem is None else 503)

    async def ready(self):
        """Readiness: 200 while the server takes requests (live, not starting, not draining), else 503."""
        reason = self.life.not_ready()
        if reason is None:
            return JSONResponse({"status": "ready", "model": self.cfg.model_name})
        state = {"ready": "unhealthy", "stopped": "draining"}.get(self.life.state, self.life.state)
        return JSONResponse({"status": state, "reason": reason}, status_code=503, headers={"Retry-After": "1"})

    async def prometheus(self):
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

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
        self.check_accepting()
        raw = await self.read_body(request)
        if self.cfg.api_key is None:  # a web page cannot send JSON cross-site without a CORS preflight
            guards.check_media_type(request.headers.get("content-type"))
        body = await self.off_loop(guards.decode_body, raw)
        cfg = self.cfg
        parsed = parse_request(body, chat=chat, defaults=cfg.defaults, model_names=self.names, model=cfg.model_name)
        guards.check_prompt_chars(parsed.prompts, self.prompt_cap, chat)
        prepared = await self.off_loop(self.admit, parsed, chat)
        self.check_accepting()
        bridge = _Bridge(asyncio.get_running_loop(), len(prepared), self.finished)
        self.life.add(bridge)
        try:
            ids = [
                self.gen.submit(p, parsed.settings, bridge.sink(i), canvas=parsed.denoise, prepared=pre)
                for i, (p, pre) in enumerate(zip(parsed.prompts, prepared))
            ]
        except BaseException:
            self.life.discard(bridge)
            raise
        rid = new_id(chat)
        if parsed.stream:
            return StreamingResponse(
                _sse(self.gen, bridge, ids, rid, parsed, self),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            comps = await _collect(self.gen, bridge, ids, request)
        finally:
            self.life.discard(bridge)
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
            for index, ev in events:
                if isinstance(ev, ApiError):  # ended by the server (shutdown, a dead engine)
                    raise ev
                if isinstance(ev, Completion):
                    done[index] = ev
        return [done[i] for i in range(len(ids))]
    finally:
        for i, rid in enumerate(ids):
            if i not in done:
                gen.cancel(rid)


def _sse_line(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(gen: TextGenerator, bridge: _Bridge, ids: list, rid: str, parsed, routes: _Routes):
    """Server-sent events: text deltas (or denoise canvases), one finish chunk per choice, then [DONE].

    A request the server ends (shutdown, a dead engine) gets one error event, then [DONE]."""
    done: dict[int, Completion] = {}
    chat, model = parsed.chat, parsed.model
    try:
        if chat and not parsed.denoise:
            yield "".join(_sse_line(chunk(rid, model, chat, i, None, None, first=True)) for i in range(len(ids)))
        while len(done) < len(ids):
            lines = []  # everything that arrived since the last write goes out in one write
            for index, ev in await bridge.get():
                if isinstance(ev, ApiError):
                    routes.metrics.error(ev.status, ev.code or ev.type)
                    yield "".join(lines) + _sse_line(ev.body()) + "data: [DONE]\n\n"
                    return
                if isinstance(ev, Delta) and not parsed.denoise:
                    lines.append(_sse_line(chunk(rid, model, chat, index, ev.text, None)))
                elif isinstance(ev, Canvas) and parsed.denoise:
                    lines.append(_sse_line(_canvas(rid, model, index, ev)))
                elif isinstance(ev, Completion):
                    done[index] = ev
                    if ev.finish_reason == "error":
                        err = ApiError(500, f"the request failed: {ev.error}", code="request_failed")
                        routes.metrics.error(err.status, err.code)
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
        routes.life.discard(bridge)
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
