"""The shipped-model registry and the one resolver every entry point uses for a model argument.

A model argument is a checkpoint folder or the name of a checkpoint shipped inside the package
(``teacher``, ``dparallel``, ``dparallel-control``, ``cd4lm``). :func:`resolve_model` turns either into
a folder; ``fewstep.load_model``, ``fewstep.load_tokenizer``, every CLI ``--model``, lm-eval's
``--model_args pretrained=...`` and the server all go through it, so a name works wherever a folder does.
An existing path always wins over a shipped name. This module imports nothing heavy (no torch).
"""

from __future__ import annotations

import os
from pathlib import Path

#: Where the shipped checkpoints live: ``fewstep/assets/models/<name>/``.
MODELS_DIR = Path(__file__).resolve().parent / "models"

SHIPPED_HELP = "checkpoint folder, or the name of a model shipped with fewstep (teacher, cd4lm, d3llm, dmax, dparallel, dparallel-control)"


def shipped_models(root: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """``(name, folder)`` of every checkpoint shipped in the package: the teacher first, then the students."""
    root = Path(root) if root is not None else MODELS_DIR
    found = sorted(d for d in root.iterdir() if (d / "config.json").is_file()) if root.is_dir() else []
    found.sort(key=lambda d: (d.name != "teacher", d.name))
    return [(d.name, d) for d in found]


def resolve_model(spec: str | os.PathLike) -> Path:
    """A checkpoint folder for ``spec``: the path itself when it exists, else the shipped model it names.

    Raises ``FileNotFoundError`` (one line, listing the shipped names) when it is neither.
    """
    path = Path(spec)
    if path.exists():
        return path
    shipped = dict(shipped_models())
    if str(spec) in shipped:
        return shipped[str(spec)]
    names = ", ".join(shipped) or "none"
    raise FileNotFoundError(f"model folder {str(spec)!r} does not exist (shipped models: {names})")
