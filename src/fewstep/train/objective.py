"""The interface between the one trainer (``fewstep.train``) and a training objective.

Pretraining (LLaDA's masked-diffusion loss) and each distillation method (one paper file under
``fewstep.distill``, a :class:`RecipeObjective` configured by the paper's recipe) are objectives. The trainer owns everything else: data loading, devices
(``accelerate``), LoRA (``peft``), optimiser and schedule, gradient accumulation, checkpoints and
resume, logging and the loss curve. An objective owns how a batch is built from tokenized examples
(padding, masking) and how the loss is computed from model outputs. The losses themselves are pure
functions of logits, labels and masks, living next to the objective, so they can be unit-tested
without a trainer.

An example is a dict with ``prompt_ids`` and ``response_ids`` (lists of token ids, response without
padding) plus whatever else the data carries. Randomness (masks) must come from the ``generator``
the trainer passes, so that a resumed run continues the same random stream.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class SpecialIds:
    """Token ids an objective needs; read from the checkpoint config / tokenizer, never hard-coded."""

    mask: int
    eos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, config: Any = None) -> SpecialIds:
        """The ids of ``tokenizer`` (:func:`fewstep.models.tokenizer.special_ids`), falling back to the
        model ``config``'s ``mask_token_id`` / ``eos_token_id``; pad falls back to EOS, as in LLaDA."""
        from fewstep.models.tokenizer import special_ids

        ids = special_ids(tokenizer)
        mask = ids["mask"] if ids["mask"] is not None else getattr(config, "mask_token_id", None)
        eos = ids["eos"] if ids["eos"] is not None else getattr(config, "eos_token_id", None)
        if mask is None or eos is None:
            raise ValueError("the tokenizer/config define no mask or EOS token")
        pad = ids["pad"] if ids["pad"] is not None else eos
        return cls(mask=int(mask), eos=int(eos), pad=int(pad))


class Objective:
    """Base class of training objectives. Subclasses set ``name`` and implement ``collate`` and ``loss``."""

    name: str = "objective"
    #: True if ``loss`` needs a frozen teacher (CD4LM). With LoRA the trainer passes the base model with
    #: its adapter disabled (no second copy); with full fine-tuning a separate frozen copy.
    needs_teacher: bool = False
    #: 0 if position i's token is predicted by the logits at i (LLaDA), 1 if by the logits at i-1
    #: (Dream). The trainer sets it from the model before training; None reads it from the model
    #: given to :meth:`logits` (through DDP / peft wrappers).
    logit_shift: int | None = None

    def __init__(self, ids: SpecialIds, max_length: int):
        self.ids = ids
        self.max_length = max_length

    def logits(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        shift_of: nn.Module | None = None,
    ) -> torch.Tensor:
        """Logits aligned with the positions they predict, through ``model``'s own ``forward``.

        The one alignment seam of training: every objective gets its logits (student's and teacher's)
        here and its losses take aligned logits (position i's row predicts token i). Objectives must
        call the model they are given (it may be wrapped by DDP/FSDP/peft, whose hooks run in
        ``forward``), never ``model.denoise``. ``shift_of``: the model whose shift applies (a teacher
        wrapper takes the student's).
        """
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        shift = logit_shift_of(shift_of or model) if self.logit_shift is None else self.logit_shift
        return align_logits(logits, shift)

    def training_examples(self, examples: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
        """The examples an epoch passes over: ``examples`` itself, unless the objective trains each example
        in several ways (DMax's OPUT writes each twice, once per ``flag``); give the trainer these."""
        return examples

    def collate(self, examples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Turn tokenized examples into a batch of tensors (the same for every process)."""
        raise NotImplementedError

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        *,
        step: int,
        max_steps: int,
        teacher: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss to minimise and a dict of floats to log (loss components, schedule values)."""
        raise NotImplementedError


class RecipeObjective(Objective):
    """An objective configured by its paper's recipe (a :class:`fewstep.train.recipe.TrainingRecipe`).

    It reads its hyper-parameters from ``self.recipe`` (never a copy of them), so the recipe is the one
    place they are written. ``per_sequence``: normalise each sequence by its own counts and average over
    sequences (independent of how a batch is split over processes and micro-batches; :meth:`reduce`);
    False computes the means over the micro-batch. ``gen_length``: the run's answer canvas, for objectives
    that pad answers to it.
    """

    #: True if ``collate`` pads (or truncates) every sequence to exactly ``max_length`` (``fewstep distill``
    #: warns when the data is longer).
    pads_to_max_length: bool = False
    #: True if :meth:`prepare` reads teacher trajectories (``fewstep distill --trajectories``).
    reads_trajectories: bool = False

    @classmethod
    def prepare(
        cls,
        examples: list[dict[str, Any]],
        records: Sequence[dict[str, Any]],
        trajectories: Sequence[dict[str, Any]] | None = None,
    ) -> list[str]:
        """Complete the tokenized ``examples`` (in place) from their ``records`` (and the teacher
        ``trajectories``) before the run measures their lengths; returns notes worth a warning."""
        return []

    def __init__(
        self,
        ids: SpecialIds,
        max_length: int,
        recipe: Any,
        *,
        per_sequence: bool = False,
        gen_length: int | None = None,
    ):
        super().__init__(ids, max_length)
        recipe.check_run(gen_length)
        self.recipe = recipe
        self.per_sequence = per_sequence
        self.gen_length = gen_length

    def hparams(self) -> dict[str, Any]:
        """What ``training.json`` records (and a resumed run must match): the recipe's objective fields, the
        loss normalisation and the sequence length."""
        return {**self.recipe.hparams(), "per_sequence": self.per_sequence, "max_length": self.max_length}

    def reduce(
        self, rows: int, loss_of: Callable[[slice], tuple[torch.Tensor, dict[str, float]]]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``loss_of(rows)`` over the micro-batch, or its mean over single rows with ``per_sequence``."""
        if not self.per_sequence:
            return loss_of(slice(None))
        return mean_over_rows(rows, lambda i: loss_of(slice(i, i + 1)))


def loss_logs(values: Any, **rename: str) -> dict[str, float]:
    """The trainer's log of a loss result (a dataclass or a dict of tensors and numbers): every value as a
    float (tensors detached), ``total`` named ``loss`` and the other ``rename`` (field -> key) applied."""
    if isinstance(values, Mapping):
        items = list(values.items())
    else:
        items = [(f.name, getattr(values, f.name)) for f in dataclasses.fields(values)]
    names = {"total": "loss", **rename}
    return {names.get(k, k): float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in items}


def align_logits(logits: torch.Tensor, shift: int) -> torch.Tensor:
    """Raw model logits ``[B, L, V]`` -> logits whose row ``i`` predicts token ``i``.

    ``shift=1`` (Dream: token i is predicted at i - 1) moves every row one position right; position 0
    keeps its own row (it is always prompt, never a loss position), as Dream's samplers and
    ``DiffusionLM.denoise`` do. ``shift=0`` (LLaDA) returns ``logits`` unchanged.
    """
    if shift == 0:
        return logits
    if shift != 1:
        raise ValueError(f"logit shift must be 0 or 1, got {shift}")
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / accelerate / peft wrappers (used to read attributes like ``logit_shift``)."""
    for _ in range(8):
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            break
    return model


def logit_shift_of(model: nn.Module) -> int:
    """0 for LLaDA-style models, 1 for Dream-style (token ``i`` predicted at ``i - 1``)."""
    return int(getattr(unwrap(model), "logit_shift", 0))


def python_rng(generator: torch.Generator) -> random.Random:
    """A ``random.Random`` seeded from ``generator`` (so a resumed generator resumes both streams)."""
    return random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))


def mean_over_rows(
    rows: int, loss_of_row: Callable[[int], tuple[torch.Tensor, dict[str, float]]]
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean over ``rows`` of per-row losses and logs (``loss_of_row(i)`` sees row ``i`` alone).

    Objectives use it for per-sequence normalisation: each sequence's loss is normalised by its own
    counts and the batch loss is the mean over sequences, so the loss and its gradient do not depend on
    how a global batch is split into processes and micro-batches (a token mean over a micro-batch
    does). The forwards stay batched; only the (cheap) loss is computed row by row.
    """
    if rows < 1:
        raise ValueError("mean_over_rows needs at least one row")
    total, logs = None, {}
    for i in range(rows):
        loss, parts = loss_of_row(i)
        total = loss if total is None else total + loss
        for k, v in parts.items():
            logs[k] = logs.get(k, 0.0) + v / rows
    total = total / rows
    logs["loss"] = float(total.detach())
    return total, logs
