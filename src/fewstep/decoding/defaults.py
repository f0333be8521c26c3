"""The library's decoding defaults, declared once, and the rule that fills an unset setting.

Every entry point takes its unset decoding settings from here: :func:`fewstep.generate`, the engine's
:class:`~fewstep.decoding.request.Request`, the text layer (:class:`~fewstep.decoding.text.GenerationSettings`),
the lm-eval adapter and every command (``generate``, ``eval``, ``sweep``, ``rollout``, ``serve``). For each
setting the precedence is:

1. the value the caller gives (an argument, a flag, a request field);
2. the model's recommended decoding: its checkpoint folder's ``decoding.json``, and for the answer length
   the ``gen_length`` it was trained at (``training.json``); :func:`fewstep.load_model` attaches both to
   the model as ``model.decoding`` (:func:`fewstep.models.saving.model_decoding`);
3. :data:`DEFAULTS`.

``block_length`` None means the model's own attention block (block-diffusion models), else 32, never
longer than the answer (:func:`~fewstep.decoding.request.default_block_length`). docs/decoding.md states
the same table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: The KV cache modes (Fast-dLLM's): ``none`` is exact, ``prefix`` reuses the keys/values before the current
#: block, ``dual`` also those after it (docs/decoding.md states what each costs in accuracy).
CACHE_MODES = ("none", "prefix", "dual")


@dataclass(frozen=True)
class DecodingDefaults:
    """The decoding settings used when neither the caller nor the model says otherwise."""

    policy: str = "threshold:0.9"  # Fast-dLLM's confidence threshold at its authors' default
    gen_length: int = 256  # the seed papers' answer length on GSM8K/MATH (dParallel, Fast-dLLM, d3LLM)
    block_length: int | None = None  # the model's attention block, else 32 (at most gen_length)
    cache: str = "none"  # exact; prefix and dual trade accuracy for speed (docs/decoding.md, "KV caches")
    early_stop: bool = True  # a row stops after the block holding its EOS (same answer text, fewer forwards)


#: The defaults themselves.
DEFAULTS = DecodingDefaults()
#: The settings a model may recommend and a caller may leave unset, in order.
SETTINGS: tuple[str, ...] = tuple(asdict(DEFAULTS))


def recommendation(source: Any) -> dict[str, Any]:
    """The recommended decoding of ``source``: a model (its ``decoding`` attribute, set by ``load_model``), a
    checkpoint folder (read from it), or None (nothing recommended)."""
    if source is None:
        return {}
    if isinstance(source, (str, os.PathLike)):
        from fewstep.models.saving import model_decoding

        return model_decoding(source)
    rec = getattr(source, "decoding", None)
    return dict(rec) if isinstance(rec, Mapping) else {}


def resolve_decoding(given: Mapping[str, Any] | None = None, source: Any = None) -> dict[str, Any]:
    """Every setting of :data:`SETTINGS`: ``given``'s value when set (not None), else ``source``'s
    recommendation (:func:`recommendation`), else :data:`DEFAULTS`."""
    from fewstep.models.saving import pick_settings

    return pick_settings(dict(given or {}), recommendation(source), asdict(DEFAULTS))


def describe_default(name: str) -> str:
    """How a command's ``--help`` states an unset setting: ``the model's decoding.json, else <default>``."""
    value = getattr(DEFAULTS, name)
    shown = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    if name == "block_length":
        shown = "the model's own block (block diffusion), else 32, at most the answer length"
    if name == "gen_length":
        return f"the model's decoding.json or training gen_length, else {shown}"
    return f"the model's decoding.json, else {shown}"
