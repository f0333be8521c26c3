"""Unmasking policies (one file per paper family), their registry and the ``"name:args"`` policy parser.

:data:`POLICIES` maps each name to its class (a policy declares its ``name``, ``summary``, ``paper`` and
``positional`` option); :func:`policy_table` renders it as the README's table and :func:`policy_help` as
the ``--help`` text, so neither is written by hand.

A spec is ``NAME``, ``NAME:VALUE`` (sets the policy's main option, e.g. ``threshold:0.9``,
``llada:64``, ``dream:maskgit_plus``) or ``NAME:key=value,key=value`` (e.g.
``cad:threshold=0.95,max_tokens=32``). Tuples are written with ``/`` (``eos_ids=508/509``); ``none``
sets an optional value to None.
"""

from __future__ import annotations

import dataclasses
import re

from fewstep.decoding.policies.base import OptionError, Policy, Selection, StepState, shown
from fewstep.decoding.policies.cd4lm import CADPolicy
from fewstep.decoding.policies.d3llm import DreamMultiBlockPolicy, MultiBlockPolicy
from fewstep.decoding.policies.dmax import SoftParallelPolicy
from fewstep.decoding.policies.dparallel import DreamEntropyThresholdPolicy, EntropyThresholdPolicy
from fewstep.decoding.policies.dream import DreamPolicy
from fewstep.decoding.policies.fastdllm import ConfidenceThresholdPolicy, FactorPolicy
from fewstep.decoding.policies.llada import LowConfidencePolicy
from fewstep.decoding.policies.llada2 import LLaDA2Policy
from fewstep.decoding.policies.sdar import SDARPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        LowConfidencePolicy,
        ConfidenceThresholdPolicy,
        FactorPolicy,
        EntropyThresholdPolicy,
        DreamEntropyThresholdPolicy,
        CADPolicy,
        DreamPolicy,
        LLaDA2Policy,
        SDARPolicy,
        MultiBlockPolicy,
        DreamMultiBlockPolicy,
        SoftParallelPolicy,
    )
}

__all__ = [
    "POLICIES",
    "CADPolicy",
    "ConfidenceThresholdPolicy",
    "DreamEntropyThresholdPolicy",
    "DreamMultiBlockPolicy",
    "DreamPolicy",
    "EntropyThresholdPolicy",
    "FactorPolicy",
    "LLaDA2Policy",
    "LowConfidencePolicy",
    "MultiBlockPolicy",
    "OptionError",
    "Policy",
    "SDARPolicy",
    "Selection",
    "SoftParallelPolicy",
    "StepState",
    "parse_policy",
    "policy_help",
    "policy_table",
]

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _convert(cls: type[Policy], key: str, text: str, annotation: str):
    """Convert ``text`` to the type named by a dataclass field annotation (a string)."""
    text = text.strip()
    where = f"{cls.name}.{key}"
    if text.lower() in ("none", "null") and "None" in annotation:
        return None
    base = annotation.replace(" | None", "").strip()
    try:
        if base == "bool":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
        if base.startswith("tuple[int"):
            return tuple(int(t) for t in re.split(r"[/+\s]+", text) if t)
        return text
    except ValueError:
        raise OptionError(f"{where} expects {annotation}; got {shown(text)}", key) from None


def parse_policy(spec: str | Policy) -> Policy:
    """A policy instance from ``NAME[:VALUE | :key=value,...]`` (instances pass through unchanged)."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"policy must be a Policy or a string NAME[:ARGS]; got {shown(spec)}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower().replace("_", "-")
    if name not in POLICIES:
        raise ValueError(f"unknown policy {shown(name)}; valid names: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    kwargs = {}
    for part in (p for p in rest.split(",") if p.strip()):
        if "=" in part:
            key, _, value = part.partition("=")
            key = key.strip().replace("-", "_")
        elif cls.positional is not None and not kwargs:
            key, value = cls.positional, part
        else:
            raise ValueError(f"policy {name!r}: expected key=value, got {shown(part)}")
        if key not in types:
            raise ValueError(f"policy {name!r} has no option {shown(key)}; options: {', '.join(types)}")
        kwargs[key] = _convert(cls, key, value, str(types[key]))
    return cls(**kwargs)


def policy_help() -> str:
    """One line per policy: name, its main option and its options with their defaults."""
    lines = []
    for name, cls in POLICIES.items():
        doc = cls.summary or (cls.__doc__ or "").strip().splitlines()[0]
        opts = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        lines.append(f"  {name}: {doc}\n      options: {opts}")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def policy_table() -> str:
    """The README's policy table, one row per registered policy: its name, paper, rule, the option a bare
    value sets (with its default) and its other options (the ``quirk_*`` options, which reproduce
    reference-code behaviours, are left to docs/decoding.md). A test keeps the README equal to it."""
    rows = ["| policy | paper | rule | main option | other options |", "| --- | --- | --- | --- | --- |"]
    for name, cls in POLICIES.items():
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        value = defaults.get(cls.positional)
        main = f"`{cls.positional}={'none' if value is None else value}`" if cls.positional else ""
        others = ", ".join(f"`{k}`" for k in defaults if k != cls.positional and not k.startswith("quirk_"))
        rows.append(f"| `{name}` | {_cell(cls.paper)} | {_cell(cls.summary)} | {main} | {others} |")
    return "\n".join(rows) + "\n"
