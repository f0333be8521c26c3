"""Command implementations of the ``fewstep`` CLI, one module per command."""

from __future__ import annotations

from pathlib import Path

SHIPPED_HELP = (
    "checkpoint folder, or the name of a model shipped with fewstep (teacher, dparallel, dparallel-control, cd4lm)"
)


def resolve_model(spec: str) -> Path:
    """A checkpoint folder, or a shipped model's folder when ``spec`` names one and no such folder exists."""
    from fewstep.tasks.demo import shipped_models

    path = Path(spec)
    if path.is_dir():
        return path
    shipped = dict(shipped_models())
    if spec in shipped:
        return shipped[spec]
    names = ", ".join(shipped) or "none"
    raise FileNotFoundError(f"model folder {spec!r} does not exist (shipped models: {names})")
