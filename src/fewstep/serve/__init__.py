"""``fewstep serve``: an OpenAI-compatible HTTP server over the text layer, with a live denoising page.

``create_app(generator, config)`` builds the FastAPI app (:mod:`fewstep.serve.app`);
:func:`start_in_thread` runs it under uvicorn on a free port (tests, benchmarks); :func:`run` serves
in the foreground until SIGTERM / SIGINT drain it (the CLI; :mod:`fewstep.serve.server`). See
``docs/serving.md``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fewstep.serve.app import ServeConfig, create_app
from fewstep.serve.server import ServerLimits, run, start_in_thread

__all__ = ["ServeConfig", "ServerLimits", "card_defaults", "create_app", "run", "start_in_thread"]


def card_defaults(model_dir: str | Path) -> dict[str, Any]:
    """The decoding a model card recommends: ``policy`` and ``gen_length`` from its ``fewstep generate`` line.

    Empty when the folder has no README.md or the card names no such command.
    """
    card = Path(model_dir) / "README.md"
    if not card.is_file():
        return {}
    line = next((ln for ln in card.read_text("utf-8").splitlines() if "fewstep generate" in ln), "")
    out: dict[str, Any] = {}
    if m := re.search(r"--policy\s+(\S+?)`?(\s|$)", line):
        out["policy"] = m.group(1).strip("`")
    if m := re.search(r"--gen-length\s+(\d+)", line):
        out["gen_length"] = int(m.group(1))
    if m := re.search(r"--block-length\s+(\d+)", line):
        out["block_length"] = int(m.group(1))
    return out
