"""The trainer's settings (:class:`TrainConfig`) and the one way a settings dataclass becomes CLI flags.

Every field of :class:`TrainConfig` and of every paper's recipe (:mod:`fewstep.train.recipe`) is an
:func:`option`: its default and its help text live on the field, as in TRL's config dataclasses.
:func:`add_options` turns fields into argparse flags, so ``fewstep pretrain`` and ``fewstep distill``
take their flags, types, choices, defaults and help from the dataclasses instead of a second copy.
This module imports nothing heavy (``fewstep distill --help`` and ``fewstep pretrain --help`` stay fast).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

#: LR schedules after the linear warm-up (``wsd``: warmup-stable-decay, the decay over ``decay_steps``).
SCHEDULES = ("constant", "cosine", "linear", "wsd")


def option(
    default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None, type: Any = None
) -> Any:
    """A settings field: its default, the help text of its CLI flag, and optionally the flag's name, its
    choices and its value type (default: the type of the default value)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "type": type})


def flag_of(f: dataclasses.Field) -> str:
    """The CLI flag of a settings field (``--warmup-steps`` for ``warmup_steps``, unless it names its own)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def fields_of(cls: Any) -> dict[str, dataclasses.Field]:
    """``{name: field}`` of a settings dataclass (class or instance)."""
    return {f.name: f for f in dataclasses.fields(cls)}


def argument_kwargs(f: dataclasses.Field, default: Any, sample: Any = None) -> dict[str, Any]:
    """``add_argument`` keywords of a field: ``store_true`` for a bool, else the declared type (or the type
    of ``sample``, a value the field takes) and the field's choices."""
    kw: dict[str, Any] = {"dest": f.name, "default": default}
    sample = default if sample is None else sample
    if isinstance(sample, bool):
        kw["action"] = "store_true"
        return kw
    kw["type"] = f.metadata.get("type") or (type(sample) if sample is not None else float)
    if f.metadata.get("choices"):
        kw["choices"] = f.metadata["choices"]
    return kw


def add_options(
    group: Any, cls: Any, names: Iterable[str], defaults: Mapping[str, tuple[Any, str]] | None = None
) -> None:
    """One flag per field ``names`` of the settings dataclass ``cls``, with the field's default and help.

    ``defaults``: ``{name: (default, what it means)}`` for a command whose unset flag is worked out
    elsewhere (``fewstep distill``'s ``--max-steps`` None: from ``--epochs``); the flag then defaults to
    that value and its help says what it means.
    """
    by_name, defaults = fields_of(cls), defaults or {}
    for name in names:
        f = by_name[name]
        default = f.default if name not in defaults else defaults[name][0]
        kw = argument_kwargs(f, default, sample=f.default)
        note = f" (default: {defaults[name][1]})" if name in defaults else ""
        kw["help"] = (f.metadata["help"] + note).replace("%", "%%")
        group.add_argument(flag_of(f), **kw)


def check_choices(settings: Any) -> None:
    """ValueError (one line, naming the flag) for a field whose value is not one of its choices."""
    for f in dataclasses.fields(settings):
        choices = f.metadata.get("choices")
        value = getattr(settings, f.name)
        if choices and value not in choices:
            raise ValueError(f"{flag_of(f)} must be one of {', '.join(choices)}; got {value!r}")


def require(settings: Any, name: str, ok: bool, rule: str) -> None:
    """ValueError ``"--flag must <rule>; got <value>"`` unless ``ok`` (the one-line range errors)."""
    if not ok:
        f = fields_of(settings)[name]
        raise ValueError(f"{flag_of(f)} must {rule}; got {getattr(settings, name)!r}")


@dataclasses.dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings of the one trainer (:class:`fewstep.train.trainer.Trainer`).

    ``fewstep pretrain`` takes its flags from these fields (defaults included); ``fewstep distill`` takes
    the run's from them and the optimiser's from the paper's recipe (:mod:`fewstep.train.recipe`).
    ``batch_size`` is the global batch per optimiser step: ``micro_batch_size * grad_accum * processes``.
    """

    out_dir: str
    max_steps: int = option(1000, "optimiser steps")
    batch_size: int = option(64, "global batch: sequences per optimiser step (micro-batch x grad-accum x processes)")
    grad_accum: int = option(1, "micro-steps per optimiser step (per process)")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = option(0.1, "final LR / peak LR for cosine, linear and wsd")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only; not biases and norms)")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    warmup_steps: int = option(100, "linear warm-up steps")
    schedule: str = option("constant", "LR schedule after the warm-up", choices=SCHEDULES)
    decay_steps: int = option(0, "with --schedule wsd: cosine decay to --min-lr-ratio over the last N steps")
    grad_clip: float = option(1.0, "max gradient norm (0 disables)")
    seed: int = option(0, "seed of the initialisation (model or LoRA), the data order and the masks")
    bf16: bool = option(False, "bf16 mixed precision (autocast) through accelerate")
    gradient_checkpointing: bool = option(False, "recompute activations in backward")
    save_every: int = option(500, "checkpoint every N steps")
    keep_checkpoints: int = option(2, "checkpoints kept in the run folder (the newest)")
    log_every: int = option(10, "log every N steps")
    lora: Any = None  # fewstep.train.lora.LoraSpec or None (full fine-tuning)
    progress: bool = True
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self, "max_steps", self.max_steps >= 1, "be >= 1")
        check_choices(self)
        require(self, "batch_size", self.batch_size >= 1, "be >= 1")
        require(self, "grad_accum", self.grad_accum >= 1, "be >= 1")
        require(self, "lr", self.lr > 0, "be > 0")
        require(self, "decay_steps", 0 <= self.decay_steps <= self.max_steps, "lie in 0..max_steps")
        for name in ("save_every", "log_every", "keep_checkpoints"):
            require(self, name, getattr(self, name) >= 1, "be >= 1")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora"] = dataclasses.asdict(self.lora) if self.lora else None
        return d
