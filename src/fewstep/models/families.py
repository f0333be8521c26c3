"""The registry of model families, read from the model classes themselves.

A family is one architecture module of ``fewstep.models`` whose :class:`~fewstep.models.base.DiffusionLM`
subclass names itself (``architecture``) and declares its config class, the config.json names that
select it, its LoRA roles and the recipe rows it trains with (see ``DiffusionLM``). Loading, saving, LoRA
and the distillation recipes all read this registry, so a new family is its architecture file alone.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from functools import cache
from typing import Any

import fewstep.models
from fewstep.models.base import DiffusionLM

_NOT_FAMILIES = {"families", "loading", "saving", "tokenizer"}  # this package's modules that define no family


@cache
def families() -> dict[str, type[DiffusionLM]]:
    """``{architecture: model class}`` of every native family, in ``family_order`` (llada, dream, llada2, sdar)."""
    found: dict[str, type[DiffusionLM]] = {}
    for info in pkgutil.iter_modules(fewstep.models.__path__):
        if info.name in _NOT_FAMILIES:
            continue
        module = importlib.import_module(f"fewstep.models.{info.name}")
        for cls in vars(module).values():
            if inspect.isclass(cls) and issubclass(cls, DiffusionLM) and vars(cls).get("architecture"):
                found[cls.architecture] = cls
    return dict(sorted(found.items(), key=lambda item: (item[1].family_order, item[0])))


def model_class(family: str) -> type[DiffusionLM]:
    """The model class of ``family``; ValueError (one line, naming the families) for an unknown one."""
    table = families()
    if family not in table:
        raise ValueError(f"unknown model family {family!r}; families: {', '.join(table)}")
    return table[family]


def architecture_of(cfg: dict[str, Any]) -> str:
    """The family of a config.json dict: the one whose ``model_types`` holds its ``model_type`` (first) or
    one of its ``architectures`` (case-insensitive); ValueError naming the supported types otherwise."""
    names = [str(cfg.get("model_type", "")), *(str(a) for a in cfg.get("architectures") or [])]
    for name in names:
        for family, cls in families().items():
            if name.lower() in (t.lower() for t in cls.model_types):
                return family
    supported = ", ".join(f"{cls.config_class.FAMILY} ({cls.model_types[0]!r})" for cls in families().values())
    raise ValueError(
        f"unknown model_type {cfg.get('model_type')!r} (architectures {names[1:]}); fewstep supports {supported}"
    )
