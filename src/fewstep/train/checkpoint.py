"""Trainer checkpoints: atomic step folders, the latest one found after a crash, HF exports.

Layout of a run folder ``OUT``::

    OUT/checkpoints/step-000500/   accelerate state (model, optimizer, RNG of every process),
                                   trainer_state.json (step, history, config), hf/ (HF model folder)
    OUT/checkpoints/.tmp-step-.../ a checkpoint being written (ignored; removed on the next save)

A checkpoint folder is written under a temporary name and renamed when complete, so a run killed at
any moment (SIGKILL included) leaves either the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def step_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The most recent complete checkpoint of a run folder, or None."""
    ckpts = Path(root) / "checkpoints"
    if not ckpts.is_dir():
        return None
    found = []
    for d in ckpts.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m[1]), d))
    return max(found)[1] if found else None


def prune(root: Path, keep: int) -> None:
    """Keep the ``keep`` most recent checkpoints and drop leftovers of interrupted saves."""
    ckpts = root / "checkpoints"
    for d in ckpts.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)
    steps = sorted((int(m[1]), d) for d in ckpts.iterdir() if (m := _STEP_DIR.match(d.name)))
    for _, d in steps[: max(len(steps) - keep, 0)]:
        shutil.rmtree(d, ignore_errors=True)


def write_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())


def save_hf_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: str | os.PathLike) -> None:
    """Write a Hugging Face folder (config.json + model.safetensors) from a full state dict.

    ``model`` is the unwrapped fewstep model (for its config and checkpoint key names); the state
    dict may come from ``accelerator.get_state_dict`` (gathered under FSDP / DeepSpeed ZeRO-3).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {model.checkpoint_key(k): v.detach().contiguous().cpu() for k, v in state_dict.items()}
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
