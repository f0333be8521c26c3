"""fewstep.decoding: one batch-first generation loop and the unmasking policies it runs.

``generate(model, input_ids, policy="threshold:0.9", gen_length=256, block_length=32, cache="dual")``
(:mod:`fewstep.decoding.pipeline`) runs any policy of :mod:`fewstep.decoding.policies` with any cache
mode, on a left-padded batch, with per-row NFE. See ``docs/decoding.md``.
"""

from fewstep.decoding.pipeline import CACHE_MODES, GenerateOutput, StepEvent, generate, stop_ids
from fewstep.decoding.policies import POLICIES, Policy, Selection, StepState, parse_policy, policy_help

__all__ = [
    "CACHE_MODES",
    "POLICIES",
    "GenerateOutput",
    "Policy",
    "Selection",
    "StepEvent",
    "StepState",
    "generate",
    "parse_policy",
    "policy_help",
    "stop_ids",
]
