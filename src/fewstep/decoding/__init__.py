"""fewstep.decoding: one step-level, continuous-batching engine and the unmasking policies it runs.

:class:`Engine` (:mod:`fewstep.decoding.engine`) decodes :class:`Request` rows that join and leave at
any round; ``generate(model, input_ids, policy="threshold:0.9", gen_length=256, block_length=32,
cache="dual")`` (:mod:`fewstep.decoding.pipeline`) is a thin call of it for a batch of prompts, with
per-row NFE. Every request is validated on one path (:mod:`fewstep.decoding.request`); the parallelism
figures are computed in :mod:`fewstep.decoding.metrics`. See ``docs/decoding.md``.
"""

from fewstep.decoding.engine import Engine, Quirks, Request, RequestError, RowResult, Update
from fewstep.decoding.pipeline import CACHE_MODES, GenerateOutput, StepEvent, generate, stop_ids
from fewstep.decoding.policies import POLICIES, Policy, Selection, StepState, parse_policy, policy_help

__all__ = [
    "CACHE_MODES",
    "POLICIES",
    "Engine",
    "GenerateOutput",
    "Policy",
    "Quirks",
    "Request",
    "RequestError",
    "RowResult",
    "Selection",
    "StepEvent",
    "StepState",
    "Update",
    "generate",
    "parse_policy",
    "policy_help",
    "stop_ids",
]
