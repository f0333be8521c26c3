"""Distillation, one file per paper, and the table of them (:data:`METHODS`): ``dparallel`` (certainty
forcing), ``cd4lm`` (DSCD), ``dmax`` (on-policy uniform training), ``d3llm`` (pseudo-trajectory distillation).

Each paper's file holds its objective, its losses and its recipes (a typed dataclass, one instance per
recipe family: ``RECIPES``). :data:`METHODS` is the one table of methods: ``fewstep distill --method``'s
choices, the model card's title and the objective lookup all come from it. A model family takes the
recipe rows its model class names (``recipes_from``)::

    from fewstep.distill import build_objective
    objective = build_objective("dparallel", "llada", ids, max_length=384)          # the paper's defaults
    objective = build_objective("cd4lm", "llada", ids, 512, temperature=3.0)        # one override
    objective = build_objective("dparallel", "llada2", ids, 384)   # block models: dFactory's objective

Adding a method is its paper file plus one row of :data:`METHODS`. Paper files are imported lazily, so
importing this package stays cheap.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Method:
    """A distillation method: its ``--method`` name, its paper file (a module of this package with a
    ``RECIPES`` table) and the words the model card of a student uses for it."""

    name: str
    module: str
    title: str

    def recipes(self) -> dict[str, Any]:
        """``{recipe family: recipe}`` of the paper file."""
        return dict(importlib.import_module(f"fewstep.distill.{self.module}").RECIPES)


#: The distillation methods, one row each.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dparallel", "dparallel", "dParallel certainty forcing"),
        Method("cd4lm", "cd4lm", "CD4LM consistency distillation (DSCD)"),
        Method("dmax", "dmax", "DMax on-policy uniform training (OPUT)"),
        Method("d3llm", "d3llm", "d3LLM pseudo-trajectory distillation"),
    )
}


def method(name: str) -> Method:
    """The row of ``name``; ValueError (one line, listing the methods) otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown distillation method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def recipes(name: str) -> dict[str, Any]:
    """``{recipe family: recipe}`` of a method (the paper file's ``RECIPES``)."""
    return method(name).recipes()


def _row(table: Mapping[str, Any], architecture: str) -> str | None:
    """The first row of a paper's ``RECIPES`` that the family's model class names in ``recipes_from``."""
    from fewstep.models.families import families

    cls = families().get(architecture)
    return next((key for key in (cls.recipes_from if cls else ()) if key in table), None)


def recipe_for(name: str, architecture: str, overrides: Mapping[str, Any] | None = None, **fields: Any) -> Any:
    """The recipe of method ``name`` for a model family (``"llada"``, ``"dream"``, ``"llada2"``, ``"sdar"``):
    the first row of the paper's ``RECIPES`` that the family's model class names in ``recipes_from``, with
    ``overrides`` (a mapping, e.g. ``vars(args)``; keys that are not recipe fields and None values are
    ignored) and ``fields`` applied."""
    from fewstep.models.families import families
    from fewstep.train.recipe import with_overrides

    table = recipes(name)
    row = _row(table, architecture)
    if row is None:
        raise ValueError(f"no {name} recipe for {architecture!r}; families: {', '.join(families())}")
    return with_overrides(table[row], {**(overrides or {}), **fields})


def all_recipes() -> dict[str, Any]:
    """``{"method/family": recipe}`` of every method and every model family it has a recipe row for: what
    ``fewstep distill``'s recipe flags and the recipe table of docs/distillation.md (:func:`recipe_table`) are
    built from."""
    from fewstep.models.families import families

    out = {}
    for m in METHODS:
        table = recipes(m)
        out.update({f"{m}/{family}": table[row] for family in families() if (row := _row(table, family))})
    return out


def recipe_table() -> str:
    """The table of the papers' defaults per method and model family in docs/distillation.md (a test keeps
    them equal)."""
    from fewstep.train.recipe import recipe_table as table

    return table(all_recipes())


def method_table() -> str:
    """The README's table of the methods: ``--method``, what it trains (the model card's title) and the model
    families it has a recipe row for (a test keeps the README equal to it)."""
    from fewstep.models.families import families

    rows = ["| `--method` | method | model families |", "| --- | --- | --- |"]
    for m in METHODS.values():
        table = m.recipes()
        rows.append(f"| `{m.name}` | {m.title} | {', '.join(f for f in families() if _row(table, f))} |")
    return "\n".join(rows) + "\n"


def objective_class(name: str, architecture: str = "llada") -> type:
    """The ``Objective`` subclass method ``name`` trains ``architecture`` with (its recipe's
    ``objective_class``: the block-diffusion objective for the block-causal families)."""
    return type(recipe_for(name, architecture)).objective_class


def build_objective(
    name: str,
    architecture: str,
    ids: Any,
    max_length: int,
    *,
    gen_length: int | None = None,
    per_sequence: bool = True,
    overrides: Mapping[str, Any] | None = None,
    **fields: Any,
):
    """The objective of method ``name`` with its recipe's hyper-parameters for ``architecture``
    (``overrides`` / ``fields`` replace recipe fields, e.g. ``temperature=3.0``). The block-diffusion
    families (``llada2``, ``sdar``) get the block-diffusion objectives, whose views are the noisy half of a
    ``[noisy | clean]`` forward under the block-diffusion mask (:mod:`fewstep.distill.blockdiff`)."""
    recipe = recipe_for(name, architecture, overrides, **fields)
    return recipe.objective(ids, max_length, per_sequence=per_sequence, gen_length=gen_length)


def read_training_data(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[Path]]:
    """Records of a JSONL file or of a rollout folder's shards, the rollout manifest (or None), the files."""
    from fewstep.distill.rollout import MANIFEST, shard_files
    from fewstep.train.data import read_jsonl

    p = Path(path)
    if not p.is_dir():
        return read_jsonl(p), None, [p]
    files = shard_files(p) or sorted(p.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no JSONL shards in {str(p)!r}")
    manifest = json.loads((p / MANIFEST).read_text()) if (p / MANIFEST).is_file() else None
    records = [r for f in files if f.stat().st_size for r in read_jsonl(f)]
    if not records:
        raise ValueError(f"the shards in {p} hold no records (did the rollout keep any answer?)")
    return records, manifest, files


def frozen_teacher(model_dir: str | Path, dtype: str):
    """The teacher for full fine-tuning of an objective that needs one (CD4LM): a separate copy of the
    original checkpoint, frozen, in eval mode (with LoRA the trainer uses the base model with its adapter
    disabled instead: no copy)."""
    from fewstep.models.loading import load_model

    teacher = load_model(model_dir, dtype=dtype, device="cpu")
    return teacher.eval().requires_grad_(False)


def save_dtype_for(choice: str, model_dir: str | Path):
    """The dtype a student's weights are saved in: ``float32`` -> None (as trained), ``bfloat16``, or
    ``auto``: bfloat16 when the base checkpoint stores bfloat16."""
    import torch

    if choice == "float32":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return torch.bfloat16 if str(cfg.get("torch_dtype", "")).endswith("bfloat16") else None
