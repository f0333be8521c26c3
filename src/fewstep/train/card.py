"""The one model-card writer: ``README.md`` of every checkpoint fewstep trains (pretraining, distillation)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{a}={b}" for a, b in value.items())
    return str(value)


def write_model_card(
    folder: str | os.PathLike,
    *,
    tags: Sequence[str],
    description: str,
    commands: Sequence[str],
    table: Mapping[str, Any],
    base_model: str | None = None,
    note: str = "",
) -> None:
    """``README.md`` in ``folder``: front matter (library, tags, base model), what the checkpoint is, how
    to load it, the exact commands that made it and a table of the run's settings and results."""
    folder = Path(folder)
    front = ["---", "library_name: fewstep", f"tags: [{', '.join(tags)}]"]
    if base_model is not None:
        front.append(f"base_model: {base_model}")
    lines = [*front, "---", "", f"# {folder.name}", "", description]
    lines += ["Load it with `fewstep.load_model(path)` and `fewstep.load_tokenizer(path)`.", "", "## Training", ""]
    lines += ["```bash", *commands, "```", ""]
    if note:
        lines += [note, ""]
    lines += ["| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in table.items())]
    lines += ["", "The loss curve is `loss.png`; per-step logs are in `train_log.jsonl`.", ""]
    (folder / "README.md").write_text("\n".join(lines))
