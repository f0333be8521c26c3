"""Typed training recipes: one dataclass per paper, one instance per model family.

A recipe's fields carry their default (the paper's, per model family) and their help text in
``field(metadata=...)``, the way TRL's config dataclasses do. They are the single source of three
things: the CLI flags (:func:`add_recipe_arguments`; a flag left unset takes the recipe's value for
the model's family), the Python API's defaults (``fewstep.distill.build_objective``) and the README's
recipe table (:func:`recipe_table`, checked against the README by a test).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any


def recipe_field(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A recipe field: its default, the help text of its CLI flag, and optionally the flag's name / choices."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


def flag_of(f: dataclasses.Field) -> str:
    """The CLI flag of a recipe field (``--warmup-steps`` for ``warmup_steps``, unless it names its own)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _show(value: Any) -> str:
    return "none" if value is None else str(value)


def _defaults_text(uses: list[tuple[str, Any]]) -> str:
    """``"dparallel/llada 6.0; dparallel/dream 3.0; cd4lm 10.0"``: a ``method/family`` group whose families
    agree is shown once under the method's name."""
    groups: dict[str, list[tuple[str, Any]]] = {}
    for label, value in uses:
        groups.setdefault(label.split("/")[0], []).append((label, value))
    parts = []
    for method, members in groups.items():
        if len({repr(v) for _, v in members}) == 1:
            parts.append(f"{method} {_show(members[0][1])}")
        else:
            parts += [f"{label} {_show(v)}" for label, v in members]
    return "; ".join(parts)


def add_recipe_arguments(group: Any, recipes: Mapping[str, Any]) -> None:
    """Add one flag per field of the ``recipes`` (``{label: recipe instance}``), defaulting to None.

    A field shared by several recipes gets one flag whose help lists each recipe's default; an unset
    flag keeps the recipe's value (:func:`with_overrides`).
    """
    fields: dict[str, list[tuple[str, dataclasses.Field, Any]]] = {}
    for label, recipe in recipes.items():
        for f in dataclasses.fields(recipe):
            fields.setdefault(f.name, []).append((label, f, getattr(recipe, f.name)))
    for name, uses in fields.items():
        first = uses[0][1]
        helps = list(dict.fromkeys(f.metadata["help"] for _, f, _ in uses))
        text = helps[0] if len(helps) == 1 else "; ".join(helps)
        defaults = _defaults_text([(label, value) for label, _, value in uses])
        kw: dict[str, Any] = {"dest": name, "default": None, "help": f"{text} (default: {defaults})".replace("%", "%%")}
        sample = next((v for _, _, v in uses if v is not None), None)
        if isinstance(sample, bool):
            kw["action"] = "store_true"
        else:
            kw["type"] = type(sample) if sample is not None else float
            if first.metadata.get("choices"):
                kw["choices"] = first.metadata["choices"]
        group.add_argument(flag_of(first), **kw)


def with_overrides(recipe: Any, args: argparse.Namespace | Mapping[str, Any]) -> Any:
    """``recipe`` with every field that ``args`` sets (not None) replaced; other keys are ignored."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    names = {f.name for f in dataclasses.fields(recipe)}
    return dataclasses.replace(recipe, **{k: v for k, v in values.items() if k in names and v is not None})


def unused_flags(recipe: Any, recipes: Mapping[str, Any], args: argparse.Namespace | Mapping[str, Any]) -> list[str]:
    """The flags that ``args`` sets (not None / False) for fields of other ``recipes`` but not of ``recipe``:
    values the run ignores, e.g. ``--entropy-weight`` for dParallel on a block-diffusion model, whose
    objective has no such term. Each flag once, in the recipes' field order."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    mine = {f.name for f in dataclasses.fields(recipe)}
    flags = {f.name: flag_of(f) for r in recipes.values() for f in dataclasses.fields(r) if f.name not in mine}
    return [flag for name, flag in flags.items() if values.get(name) is not None and values.get(name) is not False]


def recipe_table(recipes: Mapping[str, Any]) -> str:
    """A markdown table of the recipes' defaults: one row per field (its flag), one column per recipe."""
    labels = list(recipes)
    rows: dict[str, list[str]] = {}
    flags: dict[str, str] = {}
    for i, label in enumerate(labels):
        for f in dataclasses.fields(recipes[label]):
            flags.setdefault(f.name, flag_of(f))
            rows.setdefault(f.name, [""] * len(labels))[i] = _show(getattr(recipes[label], f.name))
    lines = ["| flag | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
    lines += [f"| `{flags[name]}` | " + " | ".join(values) + " |" for name, values in rows.items()]
    return "\n".join(lines) + "\n"


SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
    """The optimisation part every paper's recipe has (the paper classes add their objective's fields)."""

    finetune: str = recipe_field("lora", "LoRA through peft, or full fine-tuning", choices=("lora", "full"))
    lr: float = recipe_field(2e-5, "peak learning rate (AdamW)")
    epochs: float = recipe_field(1.0, "passes over the data (--max-steps overrides)")
    schedule: str = recipe_field("constant", "LR schedule after the warm-up", choices=SCHEDULES)
    warmup_steps: int | None = recipe_field(0, "linear warm-up steps (none: --warmup-ratio of the run)")
    warmup_ratio: float = recipe_field(0.0, "warm-up as a share of the run when --warmup-steps is none")

    def warmup_for(self, max_steps: int) -> int:
        """Warm-up steps of a run of ``max_steps``: ``warmup_steps``, else ``warmup_ratio`` of the run."""
        return self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * max_steps)
