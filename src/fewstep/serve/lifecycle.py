"""The server over time: health (the engine thread alive and making progress), readiness, and the drain.

``/health`` (liveness) asks :meth:`Lifecycle.problem`: the engine thread must be alive and, while work
is pending, must have started a new round within ``stall_timeout`` seconds (a round starts only once
the one before it finished). ``/ready`` (readiness) also needs the server to be accepting requests:
not starting, not draining. :meth:`Lifecycle.drain` is what SIGTERM does: stop accepting, let the
requests in flight finish within a deadline, end the rest with an error to their clients.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from fewstep.serve.protocol import ApiError

WATCH_INTERVAL_S = 0.2


class Lifecycle:
    """State of one app: ``starting`` -> ``ready`` -> ``draining`` -> ``stopped``, and its live requests."""

    def __init__(self, gen: Any, stall_timeout: float):
        self.gen, self.stall_timeout = gen, stall_timeout
        self.state = "starting"
        self.drain_timeout: float | None = None
        self._lock = threading.Lock()
        self._live: set[Any] = set()  # bridges of the HTTP requests in flight (anything with .abort(err))
        self._key: tuple[int, int] | None = None
        self._since = time.monotonic()

    # ---- requests in flight ----------------------------------------------------------------------------
    def add(self, bridge: Any) -> None:
        with self._lock:
            self._live.add(bridge)

    def discard(self, bridge: Any) -> None:
        with self._lock:
            self._live.discard(bridge)

    def live(self) -> list[Any]:
        with self._lock:
            return list(self._live)

    def abort_all(self, err: ApiError) -> int:
        """End every request in flight with ``err`` (its client gets it; its engine rows are cancelled)."""
        live = self.live()
        for bridge in live:
            bridge.abort(err)
        return len(live)

    # ---- health ----------------------------------------------------------------------------------------
    def stalled_for(self) -> float:
        """Seconds the engine has had work without starting a new round (0 while idle or progressing)."""
        engine, now = self.gen.engine, time.monotonic()
        key = (id(engine), engine.rounds)
        with self._lock:
            if key != self._key or not engine.has_work():
                self._key, self._since = key, now
            return now - self._since

    def problem(self) -> str | None:
        """Why the server is not live (None: it is): a dead engine thread or a stalled engine."""
        if not self.gen.running():
            return "the engine thread is not running"
        stalled = self.stalled_for()
        if stalled > self.stall_timeout:
            pending = self.gen.active()
            return (
                f"the engine has not finished a round for {stalled:.1f} s with {pending} request(s) pending "
                f"(limit {self.stall_timeout:g} s)"
            )
        return None

    def not_ready(self) -> str | None:
        """Why the server does not take requests now (None: it does)."""
        if self.state == "starting":
            return "the server is starting"
        if self.state in ("draining", "stopped"):
            return "the server is shutting down"
        return self.problem()

    def accepting(self) -> bool:
        return self.state == "ready"

    async def watch(self) -> None:
        """Sample the engine's progress; when its thread has died, end the requests still waiting on it."""
        while True:
            self.stalled_for()
            if not self.gen.running() and self.state in ("ready", "draining") and self.live():
                self.abort_all(ApiError(503, "the engine thread stopped; the request was not finished",
                                        code="engine_unavailable"))  # fmt: skip
            await asyncio.sleep(WATCH_INTERVAL_S)

    # ---- shutdown --------------------------------------------------------------------------------------
    async def drain(self, timeout: float) -> int:
        """Stop accepting, wait up to ``timeout`` s for the requests in flight, end the rest with an error
        event; returns how many were ended that way."""
        if self.state != "ready":
            return 0
        self.state, self.drain_timeout = "draining", timeout
        deadline = time.monotonic() + timeout
        while self.live() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        msg = f"the server is shutting down and the request did not finish within the drain deadline ({timeout:g} s)"
        ended = self.abort_all(ApiError(503, msg, code="shutting_down"))
        until = time.monotonic() + 2.0  # their handlers write the error and finish
        while self.live() and time.monotonic() < until:
            await asyncio.sleep(0.02)
        self.state = "stopped"
        return ended
