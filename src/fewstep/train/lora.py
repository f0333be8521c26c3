"""LoRA through ``peft``, with target modules named by *role* and mapped per model family.

Reference recipes list Llama/Qwen projection names (``q_proj ... down_proj``). fewstep names roles
(:data:`ROLES`) and each model class maps them to its own module names (``lora_roles``: LLaDA calls the
attention output ``attn_out``, the MLP gate ``ff_proj`` and the MLP down projection ``ff_out``), so "all
seven" means all seven on every family. A reference's Llama-named list reaches only some roles on some
families (``reference_lora_roles``: q, k, v, up on LLaDA), which ``--lora-targets dparallel`` reproduces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fewstep.models.families import model_class

#: The projection roles LoRA targets name; each model class maps them to its module names (``lora_roles``).
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LoraSpec:
    """LoRA settings: rank ``r``, ``alpha``, ``dropout`` and the projection ``roles`` to adapt."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    roles: tuple[str, ...] = field(default=ROLES)

    def __post_init__(self) -> None:
        bad = [r for r in self.roles if r not in ROLES]
        if bad or not self.roles:
            raise ValueError(f"unknown LoRA roles {bad}; choose from {', '.join(ROLES)}")
        if self.r < 1:
            raise ValueError("LoRA rank must be >= 1")


def target_regex(architecture: str, roles: tuple[str, ...] | list[str]) -> str:
    """One regex (peft full-matches it against module names) for the modules of ``roles`` in the family
    ``architecture``, from its model class's ``lora_roles``."""
    pats = model_class(architecture).lora_roles
    if not pats:
        raise ValueError(f"no LoRA role map for architecture {architecture!r}")
    return "(" + "|".join(dict.fromkeys(pats[r] for r in roles)) + ")"


def target_modules(model: nn.Module, roles: tuple[str, ...] | list[str]) -> list[str]:
    """The qualified names of ``model``'s modules that ``roles`` select (for logs and tests); a linear that
    peft has already wrapped (its ``base_layer``) still counts."""
    import re

    pattern = re.compile(target_regex(model.architecture, roles))
    linear = lambda m: isinstance(m, nn.Linear) or isinstance(getattr(m, "base_layer", None), nn.Linear)  # noqa: E731
    return [n for n, m in model.named_modules() if linear(m) and pattern.fullmatch(n)]


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Wrap ``model`` in a ``peft`` LoRA model (base weights frozen, adapters trainable)."""
    from peft import LoraConfig, get_peft_model

    names = target_modules(model, spec.roles)
    if not names:
        raise ValueError(f"LoRA roles {spec.roles} match no module of this {model.architecture} model")
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target_regex(model.architecture, spec.roles),
        bias="none",
    )
    model.requires_grad_(True)
    return get_peft_model(model, config)


def is_peft(model: nn.Module) -> bool:
    """True for a ``peft`` wrapper."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


class AdapterDisabledTeacher(nn.Module):
    """The frozen base model behind a LoRA model, without a second copy of its weights.

    Calling it runs the peft model with its adapter disabled and without gradients: exactly the
    pretrained weights. The peft model is held outside the module tree (not a submodule), so it is
    not registered, saved or prepared twice.
    """

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self._ref = [peft_model]

    def forward(self, *args, **kwargs):
        model = self._ref[0]
        import torch

        with torch.no_grad(), model.disable_adapter():
            return model(*args, **kwargs)


def lora_roles(spec: str, architecture: str) -> tuple[str, ...]:
    """The roles of a ``--lora-targets`` value: ``all``, ``dparallel`` (the set dParallel's Llama-named
    config effectively adapts: the family's ``reference_lora_roles``, q,k,v,up on LLaDA, all elsewhere) or
    comma-separated roles from :data:`ROLES`."""
    if spec == "all":
        return ROLES
    if spec == "dparallel":
        return model_class(architecture).reference_lora_roles or ROLES
    roles = tuple(r.strip() for r in spec.split(",") if r.strip())
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise ValueError(f"--lora-targets: unknown role(s) {bad}; use all, dparallel or roles from {', '.join(ROLES)}")
    return roles


def merge_lora(
    base: str | os.PathLike, adapter: str | os.PathLike, dtype: str | torch.dtype | None = None
) -> nn.Module:
    """The base model (folder or shipped name) with a peft LoRA adapter merged in: a plain fewstep model
    in ``dtype`` (default: the base checkpoint's), merged in float32 arithmetic. Saving it with
    :func:`fewstep.models.save_model` writes a drop-in replacement of the base folder."""
    from peft import PeftModel

    from fewstep.assets import resolve_model
    from fewstep.models.loading import checkpoint_dtype, load_model, parse_dtype, weight_files

    base, adapter = resolve_model(base), Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter_config.json in {str(adapter)!r} (expected a peft LoRA adapter folder)")
    model = load_model(base, dtype="float32")
    target = parse_dtype(dtype) or checkpoint_dtype(base, weight_files(base))
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"the adapter in {adapter} does not fit the base model {base}: {exc}") from None
    merged = peft_model.merge_and_unload()
    merged.requires_grad_(False)
    return merged.to(target) if target != torch.float32 else merged
