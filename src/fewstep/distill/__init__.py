"""Distillation, one module per paper: ``dparallel`` (certainty forcing), ``cd4lm`` (DSCD), ``dmax`` (OPUT),
``d3llm`` (pseudo-trajectory certainty forcing).

Each paper's module holds its objective, its losses and its recipe (a typed dataclass per model
family: ``RECIPES``). This package maps a ``fewstep distill --method`` name to them:

    from fewstep.distill import build_objective
    objective = build_objective("dparallel", "llada", ids, max_length=384)          # the paper's defaults
    objective = build_objective("cd4lm", "llada", ids, 512, temperature=3.0)        # one override
    objective = build_objective("dparallel", "llada2", ids, 384)   # block models: dFactory's objective

Modules are imported lazily, so importing this package stays cheap.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METHODS = ("dparallel", "cd4lm", "dmax", "d3llm")


def _module(method: str):
    if method == "dparallel":
        from fewstep.distill import dparallel

        return dparallel
    if method == "cd4lm":
        from fewstep.distill import cd4lm

        return cd4lm
    if method == "dmax":
        from fewstep.distill import dmax

        return dmax
    if method == "d3llm":
        from fewstep.distill import d3llm

        return d3llm
    raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(METHODS)}")


def objective_class(method: str, architecture: str | None = None) -> type:
    """The ``Objective`` subclass of a distillation method (``"dparallel"``, ``"cd4lm"``, ``"dmax"``, ``"d3llm"``) for a
    model family: the block-diffusion variant for the block-causal families (``"llada2"``, ``"sdar"``)."""
    mod = _module(method)
    if method == "d3llm":
        return mod.D3LLMObjective
    if method == "dmax":
        block = architecture is not None and is_block_family(architecture)
        return mod.BlockDiffusionDMaxObjective if block else mod.DMaxObjective
    if architecture is not None and is_block_family(architecture):
        return mod.BlockDiffusionDParallelObjective if method == "dparallel" else mod.BlockDiffusionCD4LMObjective
    return mod.DParallelObjective if method == "dparallel" else mod.CD4LMObjective


def is_block_family(architecture: str) -> bool:
    """True for the block-diffusion model families (block-causal attention: LLaDA2-MoE, SDAR)."""
    from fewstep.models.loading import ARCHITECTURES

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown model family {architecture!r}; families: {', '.join(ARCHITECTURES)}")
    return bool(getattr(ARCHITECTURES[architecture][1], "block_diffusion", False))


def recipes(method: str) -> dict[str, Any]:
    """``{model family: recipe}`` of a method (the paper file's ``RECIPES``)."""
    return dict(_module(method).RECIPES)


def all_recipes() -> dict[str, Any]:
    """``{"method/family": recipe}`` of every method: what ``fewstep distill``'s recipe flags and the
    README's recipe table (:func:`recipe_table`) are built from."""
    return {f"{m}/{family}": r for m in METHODS for family, r in recipes(m).items()}


def recipe_table() -> str:
    """The README's table of the papers' defaults per method and model family (a test keeps them equal)."""
    from fewstep.train.recipe import recipe_table as table

    return table(all_recipes())


def recipe_for(method: str, architecture: str, overrides: Mapping[str, Any] | None = None, **fields: Any) -> Any:
    """The recipe of ``method`` for a model family (``"llada"``, ``"dream"``, ``"llada2"``, ``"sdar"``) with
    ``overrides`` (a mapping,
    e.g. ``vars(args)``; keys that are not recipe fields and None values are ignored) and ``fields`` applied."""
    from fewstep.train.recipe import with_overrides

    table = recipes(method)
    if architecture not in table:
        raise ValueError(f"no {method} recipe for {architecture!r}; families: {', '.join(table)}")
    return with_overrides(table[architecture], {**(overrides or {}), **fields})


def build_objective(
    method: str,
    architecture: str,
    ids: Any,
    max_length: int,
    *,
    gen_length: int | None = None,
    per_sequence: bool = True,
    overrides: Mapping[str, Any] | None = None,
    **fields: Any,
):
    """The objective of ``method`` with its recipe's hyper-parameters for ``architecture``
    (``overrides`` / ``fields`` replace recipe fields, e.g. ``temperature=3.0``). The block-diffusion
    families (``llada2``, ``sdar``) get the block-diffusion objectives, whose views are the noisy half of a
    ``[noisy | clean]`` forward under the block-diffusion mask (``fewstep.distill.dparallel``)."""
    recipe = recipe_for(method, architecture, overrides, **fields)
    return recipe.objective(ids, max_length, per_sequence=per_sequence, gen_length=gen_length)


_HPARAMS = (
    "block_size",
    "temperature",
    "entropy_weight",
    "mask_ratio",
    "reference_masking",
    "lam",
    "initial_lambda",
    "final_lambda",
    "lambda_warmup_ratio",
    "clamp_max",
    "mask_padding",
    "train_on_pad_id",
    "per_sequence",
    "eos_pad_to",
    "teacher_visible",
    "max_length",
    "confidence_beta",
    "noise_range",
    "same_token_labels",
    "views",
    "eos_labels",
    "block_sizes",
    "min_mask_ratio",
    "max_mask_ratio",
    "entropy_views",
    "past_canvas",
    "reference_offsets",
)


def objective_hparams(objective: Any) -> dict[str, Any]:
    """The hyper-parameters an objective was built with (recorded in training.json and checked on resume)."""
    values = {k: getattr(objective, k) for k in _HPARAMS if hasattr(objective, k)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}  # as JSON reads it back


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
    """CD4LM's teacher for full fine-tuning: a separate copy of the original checkpoint, frozen, in eval
    mode (with LoRA the trainer uses the base model with its adapter disabled instead: no copy)."""
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
