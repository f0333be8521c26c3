"""``fewstep serve``: an OpenAI-compatible HTTP server over the text layer, with a live denoising page.

``create_app(generator, config)`` builds the FastAPI app (:mod:`fewstep.serve.app`);
:func:`start_in_thread` runs it under uvicorn on a free port (tests, benchmarks); :func:`run` serves
in the foreground (the CLI). See ``docs/serving.md``.
"""

from __future__ import annotations

import socket
import threading
import time

from fewstep.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app", "run", "start_in_thread"]


def _server(app, host: str, log_level: str):
    import uvicorn

    config = uvicorn.Config(app, host=host, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Run ``app`` under uvicorn in a daemon thread; returns ``(server, thread, port)`` once it answers.

    ``port=0`` binds a free port. Stop it with ``server.should_exit = True; thread.join()``.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = _server(app, host, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return server, thread, sock.getsockname()[1]


def run(app, host: str, port: int, log_level: str = "info") -> None:
    """Serve in the foreground until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
