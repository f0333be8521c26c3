"""``fewstep serve``: an OpenAI-compatible HTTP server over the text layer, with a live denoising page.

``create_app(generator, config)`` builds the FastAPI app (:mod:`fewstep.serve.app`);
:func:`start_in_thread` runs it under uvicorn on a free port (tests, benchmarks); :func:`run` serves
in the foreground until SIGTERM / SIGINT drain it (the CLI; :mod:`fewstep.serve.server`). See
``docs/serving.md``.
"""

from __future__ import annotations

from fewstep.serve.app import ServeConfig, create_app
from fewstep.serve.server import ServerLimits, run, start_in_thread

__all__ = ["ServeConfig", "ServerLimits", "create_app", "run", "start_in_thread"]
