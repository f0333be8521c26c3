"""fewstep.decoding: one step-level, continuous-batching engine and the unmasking policies it runs.

:class:`Engine` (:mod:`fewstep.decoding.engine`) decodes :class:`Request` rows that join and leave at
any round; ``generate(model, input_ids, policy="threshold:0.9", gen_length=256, block_length=32,
cache="dual")`` (:mod:`fewstep.decoding.pipeline`) is a thin call of it for a batch of prompts, with
per-row NFE. Every request is validated on one path (:mod:`fewstep.decoding.request`); the parallelism
figures are computed in :mod:`fewstep.decoding.metrics`; the decoding defaults every entry point shares
are declared in :mod:`fewstep.decoding.defaults`. See ``docs/decoding.md``.

The names below are imported on first use, so that ``fewstep.decoding.defaults`` (which the commands'
``--help`` reads) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Engine": "engine",
    "Quirks": "engine",
    "Request": "engine",
    "RequestError": "engine",
    "RowResult": "engine",
    "Update": "engine",
    "CACHE_MODES": "pipeline",
    "GenerateOutput": "pipeline",
    "StepEvent": "pipeline",
    "generate": "pipeline",
    "stop_ids": "pipeline",
    "POLICIES": "policies",
    "Policy": "policies",
    "Selection": "policies",
    "StepState": "policies",
    "parse_policy": "policies",
    "policy_help": "policies",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"fewstep.decoding.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fewstep.decoding' has no attribute {name!r}")
