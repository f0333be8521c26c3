"""Model configs for training from scratch: named presets or a config.json, completed from the tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.models.families import architecture_of, families, model_class

# Architecture-defining fields only; vocabulary size and special ids come from the tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    # The shipped teacher: 0.8 M parameters, 3.2 MB in float32 (feasibility.md).
    "llada-tiny": {
        "model_type": "llada",
        "d_model": 128,
        "n_layers": 4,
        "n_heads": 4,
        "mlp_hidden_size": 336,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_sequence_length": 512,
    },
    "llada-small": {
        "model_type": "llada",
        "d_model": 256,
        "n_layers": 6,
        "n_heads": 8,
        "mlp_hidden_size": 688,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_sequence_length": 1024,
    },
}


def model_config(spec: str, special: dict[str, int | None], vocab_size: int) -> dict[str, Any]:
    """A full config.json dict from a preset name or a JSON file, with vocab and special ids filled in.

    Values the file sets explicitly win over the tokenizer's, except that the vocabulary must cover
    the tokenizer.
    """
    if spec in PRESETS:
        cfg = dict(PRESETS[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"model config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    cls = model_class(architecture_of({"model_type": "llada", **cfg}))
    if not cls.pretrainable:
        trainable = " or ".join(repr(c.model_types[0]) for c in families().values() if c.pretrainable)
        raise ValueError(f"model_type {cfg.get('model_type')!r}: fewstep trains {trainable} models")
    cfg.setdefault("vocab_size", vocab_size)
    cfg.setdefault("mask_token_id", special["mask"])
    cfg.setdefault("eos_token_id", special["eos"])
    cfg.setdefault("pad_token_id", special["pad"])
    if cfg["vocab_size"] < vocab_size:
        raise ValueError(f"vocab_size {cfg['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    if special["mask"] is None:
        raise ValueError("the tokenizer has no mask token (set mask_token in tokenizer_config.json)")
    return cfg


def init_model(cfg: dict[str, Any], seed: int) -> nn.Module:
    """A randomly initialised fewstep model on the CPU, in float32."""
    from fewstep.models.loading import build_model

    model = build_model(cfg)
    model.to_empty(device="cpu")
    if hasattr(model, "init_weights"):
        model.init_weights(seed)
    else:
        generic_init(model, seed)
    model.train()
    model.source_config = dict(cfg)  # its keys are kept in the saved config.json (auto_map, ...)
    return model


def generic_init(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """normal(0, std) weights, zero biases, unit norm scales; output projections scaled by depth."""
    g = torch.Generator().manual_seed(seed)
    n_layers = sum(1 for n, _ in model.named_modules() if n.count(".") == 1 and n.split(".")[1].isdigit()) or 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
