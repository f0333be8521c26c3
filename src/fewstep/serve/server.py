"""uvicorn under ``fewstep serve``: connection deadlines, and a graceful drain on SIGTERM / SIGINT.

uvicorn closes an idle connection only *between* requests (``timeout_keep_alive``, armed when a
response ends). :class:`_Protocol` adds the two deadlines it lacks: a new connection that sends nothing
is closed after the same keep-alive timeout, and a request whose head and body have not all arrived
``timeout_read`` seconds after its first byte is closed (with a 408 while its head is incomplete).

:class:`Server` replaces uvicorn's signal handling: the first SIGTERM or SIGINT drains the app
(:meth:`fewstep.serve.lifecycle.Lifecycle.drain`: new requests get 503, in-flight ones get
``drain_timeout`` seconds to finish, the rest end with an error event), then the server exits with
status 0; a second signal exits at once (status 128 + the signal's number).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("uvicorn.error")


@dataclass
class ServerLimits:
    """Connection deadlines and the drain deadline (the flags of ``fewstep serve``)."""

    timeout_keep_alive: float = 5.0  # an idle connection (before its first request, between requests) closes
    timeout_read: float = 30.0  # a request's head and body must arrive within this of its first byte
    drain_timeout: float = 5.0  # after SIGTERM / SIGINT: how long in-flight requests may run on


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": f"the request did not arrive within {seconds:g} s of its first byte",
                "type": "invalid_request_error",
                "param": None,
                "code": "request_timeout",
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for idle new connections and one for reading a request."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: asyncio.TimerHandle | None = None
        # an idle new connection: uvicorn's own keep-alive handler closes it (data_received disarms it)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_read()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read()
        super().connection_lost(exc)

    def _reading(self) -> bool:
        """Whether part of a request has arrived and the rest has not."""
        state = self.conn.their_state
        return state is h11.SEND_BODY or (state is h11.IDLE and bool(self.conn.trailing_data[0]))

    def _watch_read(self) -> None:
        if self.transport.is_closing() or not self._reading():
            self._disarm_read()
        elif self._read_timer is None:
            self._read_timer = self.loop.call_later(self.config.fewstep_timeout_read, self._read_timeout)

    def _disarm_read(self) -> None:
        timer, self._read_timer = getattr(self, "_read_timer", None), None
        if timer is not None:
            timer.cancel()

    def _read_timeout(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or not self._reading():
            return
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:  # the head is incomplete
            self.transport.write(_timeout_response(self.config.fewstep_timeout_read))
        log.warning("closing a connection whose request did not arrive within %g s", self.config.fewstep_timeout_read)
        self.transport.close()  # a body still missing: the app sees the client go away


class Server(uvicorn.Server):
    """A uvicorn server that drains its app on the first SIGTERM / SIGINT and exits on the second."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float = 5.0):
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Future | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        """Signal handler (main thread): drain on the first signal, exit at once on the second."""
        name = signal.Signals(sig).name
        if self._draining:
            print(f"fewstep serve: {name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + sig)
        print(
            f"fewstep serve: {name}: draining (up to {self.drain_timeout:g} s; a second signal exits at once)",
            file=sys.stderr,
            flush=True,
        )
        self.shutdown_gracefully()

    def shutdown_gracefully(self) -> None:
        """Drain the app, then exit (callable from any thread)."""
        self._draining = True
        loop = self._loop
        if loop is None or loop.is_closed():
            self.should_exit = True
            return
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        lifecycle = getattr(getattr(self.config.app, "state", None), "lifecycle", None)
        if lifecycle is None or not self.started:
            self.should_exit = True
            return
        self._drain_task = asyncio.ensure_future(self._drain(lifecycle))  # a reference keeps the task alive

    async def _drain(self, lifecycle) -> None:
        try:
            await lifecycle.drain(self.drain_timeout)
        except Exception:  # never keep the process alive because the drain failed
            log.exception("the drain failed")
        finally:
            self.should_exit = True


def make_server(app, host: str, port: int, log_level: str, limits: ServerLimits) -> Server:
    """A :class:`Server` for ``app`` with ``limits``."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        http=_Protocol,
        timeout_keep_alive=limits.timeout_keep_alive,  # type: ignore[arg-type]  # a float works: call_later
        timeout_graceful_shutdown=5,
    )
    config.fewstep_timeout_read = limits.timeout_read  # type: ignore[attr-defined]
    return Server(config, drain_timeout=limits.drain_timeout)


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port=0``: a free one).

    It is made with ``IPPROTO_TCP`` so that asyncio sets ``TCP_NODELAY`` on the connections it accepts
    (it checks the protocol number; a socket made with protocol 0 keeps Nagle's algorithm, and every
    response then waits ~40 ms for the client's delayed ACK).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", limits=None):
    """Run ``app`` under uvicorn in a daemon thread; returns ``(server, thread, port)`` once it answers.

    ``port=0`` binds a free port. Stop it with ``server.should_exit = True; thread.join()``, or drain it
    first with ``server.shutdown_gracefully()`` (what SIGTERM does to ``fewstep serve``).
    """
    sock = bound_socket(host, port)
    server = make_server(app, host, port, log_level, limits or ServerLimits())
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return server, thread, sock.getsockname()[1]


def run(app, host: str, port: int, log_level: str = "info", limits: ServerLimits | None = None) -> None:
    """Serve in the foreground until a signal drains and stops the server."""
    make_server(app, host, port, log_level, limits or ServerLimits()).run()
