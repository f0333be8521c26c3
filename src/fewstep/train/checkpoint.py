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


#: Settings that define the model and the data stream: a resumed run must keep them.
FIXED_KEYS = ("batch_size", "seed", "lora")
#: Keys of ``TrainConfig.extra`` that only describe the run (a moved data file with the same bytes resumes).
DESCRIPTIVE_EXTRA = ("data",)
#: Optimisation settings a resumed run may change (to extend a run or add a final decay); reported.
SCHEDULE_KEYS = ("max_steps", "lr", "schedule", "warmup_steps", "decay_steps", "min_lr_ratio", "weight_decay")


def resume_changes(saved: dict[str, Any], now: dict[str, Any], folder: str | os.PathLike = "") -> list[str]:
    """The one resume rule of pretraining and distillation, on two ``TrainConfig.to_dict()``s.

    ValueError (naming the settings) if a setting that defines the model or the data stream differs:
    :data:`FIXED_KEYS` or any ``extra`` entry that both runs record (data hash, example count, generation
    length, objective and its hyper-parameters). Returns the schedule changes it allows, as
    ``"lr 0.001 -> 0.002"`` strings.
    """
    now = json.loads(json.dumps(now))  # tuples -> lists, as stored
    hard = [k for k in FIXED_KEYS if saved.get(k) != now.get(k)]
    old_extra, new_extra = saved.get("extra") or {}, now.get("extra") or {}
    hard += [
        k
        for k in new_extra
        if k not in DESCRIPTIVE_EXTRA and old_extra.get(k) is not None and old_extra.get(k) != new_extra[k]
    ]
    if hard:
        raise ValueError(
            f"{folder} holds a run with different settings ({', '.join(hard)}); use another --out or --overwrite"
        )
    return [f"{k} {saved.get(k)} -> {now[k]}" for k in SCHEDULE_KEYS if k in now and saved.get(k, now[k]) != now[k]]


def write_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())


def save_hf_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], folder: str | os.PathLike
) -> list[str]:
    """Write a Hugging Face folder from a full state dict, as a drop-in replacement of the base folder
    ``model`` was loaded from (:func:`fewstep.models.saving.save_checkpoint`); the files copied from it.

    ``model`` is the unwrapped fewstep model (for its config and checkpoint key names); the state
    dict may come from ``accelerator.get_state_dict`` (gathered under FSDP / DeepSpeed ZeRO-3).
    """
    from fewstep.models.saving import save_checkpoint

    return save_checkpoint(model, folder, state_dict)
