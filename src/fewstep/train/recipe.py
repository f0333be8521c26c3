"""Typed training recipes: one frozen dataclass per paper's objective, one instance per model family.

A recipe is the one place a paper's hyper-parameters are written: each field is an
:func:`~fewstep.train.config.option` carrying its default (the paper's) and its help text, the way
TRL's config dataclasses do. The objective takes its recipe and reads the fields (nothing is copied
into keyword arguments or attributes), ``__post_init__`` checks their ranges with one-line errors, and
the hyper-parameters recorded with a run (``training.json``) are the recipe's own fields. The recipes are
also the single source of the CLI flags (:func:`add_recipe_arguments`; a flag left unset takes the
recipe's value for the model's family) and of the recipe table in docs/distillation.md
(:func:`recipe_table`, checked against the docs by a test).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from fewstep.train.config import (
    TrainConfig,
    argument_kwargs,
    check_choices,
    fields_of,
    flag_of,
    option,
    require,
)

_TRAIN = fields_of(TrainConfig)


def trainer_option(name: str, default: Any) -> Any:
    """A recipe field that sets the trainer's :class:`TrainConfig` field ``name``: its help and choices are
    the trainer's, its default the paper's."""
    meta = _TRAIN[name].metadata
    return option(default, meta["help"], choices=meta["choices"])


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
    for uses in fields.values():
        first = uses[0][1]
        helps = list(dict.fromkeys(f.metadata["help"] for _, f, _ in uses))
        text = helps[0] if len(helps) == 1 else "; ".join(helps)
        defaults = _defaults_text([(label, value) for label, _, value in uses])
        sample = next((v for _, _, v in uses if v is not None), None)
        kw = argument_kwargs(first, None, sample)
        kw["help"] = f"{text} (default: {defaults})".replace("%", "%%")
        group.add_argument(flag_of(first), **kw)


def with_overrides(recipe: Any, args: argparse.Namespace | Mapping[str, Any]) -> Any:
    """``recipe`` with every field that ``args`` sets (not None) replaced; other keys are ignored."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    names = fields_of(recipe)
    return dataclasses.replace(recipe, **{k: v for k, v in values.items() if k in names and v is not None})


def unused_flags(recipe: Any, recipes: Mapping[str, Any], args: argparse.Namespace | Mapping[str, Any]) -> list[str]:
    """The flags that ``args`` sets (not None / False) for fields of other ``recipes`` but not of ``recipe``:
    values the run ignores, e.g. ``--entropy-weight`` for dParallel on a block-diffusion model, whose
    objective has no such term. Each flag once, in the recipes' field order."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    mine = fields_of(recipe)
    flags = {f.name: flag_of(f) for r in recipes.values() for f in dataclasses.fields(r) if f.name not in mine}
    return [flag for name, flag in flags.items() if values.get(name) is not None and values.get(name) is not False]


def recipe_flags(recipes: Mapping[str, Any]) -> dict[str, str]:
    """``{field name: CLI flag}`` of every field of the ``recipes`` (``lam`` -> ``--lambda``)."""
    return {f.name: flag_of(f) for r in recipes.values() for f in dataclasses.fields(r)}


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


@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
    """The optimisation part every paper's recipe has; a paper's recipe adds its objective's fields and
    names the objective it configures (``objective_class``)."""

    #: The :class:`~fewstep.train.objective.RecipeObjective` subclass this recipe configures.
    objective_class: ClassVar[type]

    finetune: str = option("lora", "LoRA through peft, or full fine-tuning", choices=("lora", "full"))
    lr: float = trainer_option("lr", 2e-5)
    epochs: float = option(1.0, "passes over the data (--max-steps overrides)")
    schedule: str = trainer_option("schedule", "constant")
    warmup_steps: int | None = option(0, "linear warm-up steps (none: --warmup-ratio of the run)")
    warmup_ratio: float = option(0.0, "warm-up as a share of the run when --warmup-steps is none")
    min_lr_ratio: float = trainer_option("min_lr_ratio", 0.0)
    weight_decay: float = trainer_option("weight_decay", 0.01)
    adam_beta2: float = option(0.999, "AdamW beta2 (beta1 is 0.9)")

    def __post_init__(self) -> None:
        check_choices(self)
        require(self, "lr", self.lr > 0, "be > 0")
        require(self, "epochs", self.epochs > 0, "be > 0")
        require(self, "warmup_steps", self.warmup_steps is None or self.warmup_steps >= 0, "be >= 0 or none")
        require(self, "warmup_ratio", 0 <= self.warmup_ratio < 1, "lie in [0, 1)")
        require(self, "min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "lie in [0, 1]")
        require(self, "weight_decay", self.weight_decay >= 0, "be >= 0")
        require(self, "adam_beta2", 0 <= self.adam_beta2 < 1, "lie in [0, 1)")

    def check_run(self, gen_length: int | None) -> None:
        """ValueError (one line) when the recipe cannot run with the run's answer length ``gen_length``."""

    def warmup_for(self, max_steps: int) -> int:
        """Warm-up steps of a run of ``max_steps``: ``warmup_steps``, else ``warmup_ratio`` of the run."""
        return self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * max_steps)

    def optimiser(self, max_steps: int) -> dict[str, Any]:
        """The :class:`TrainConfig` fields this recipe sets for a run of ``max_steps``."""
        return {
            "lr": self.lr,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_for(max_steps),
            "min_lr_ratio": self.min_lr_ratio,
            "weight_decay": self.weight_decay,
            "betas": (0.9, self.adam_beta2),
        }

    def hparams(self) -> dict[str, Any]:
        """The objective's hyper-parameters: every field this recipe adds to :class:`TrainingRecipe` (recorded
        in ``training.json`` and checked when a run resumes)."""
        base = fields_of(TrainingRecipe)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in base}

    def objective(self, ids: Any, max_length: int, *, per_sequence: bool = True, gen_length: int | None = None) -> Any:
        """The objective this recipe configures (``gen_length``: the run's answer canvas)."""
        return self.objective_class(ids, max_length, self, per_sequence=per_sequence, gen_length=gen_length)
