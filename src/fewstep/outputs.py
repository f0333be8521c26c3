"""Output folders: fewstep writes only into folders it made, and deletes only those.

Every command that writes a folder (``--out``) goes through :func:`check_output` and
:func:`claim_output` (or both at once, :func:`prepare_output`). The rule:

* a folder fewstep made holds the marker file :data:`MARKER` (``run.json``: which command made it and
  when); it is written when the command creates the folder or finds it empty;
* ``--overwrite`` deletes only a folder that holds the marker of the same command, and never one that
  holds an input of the run it starts (``--data`` inside ``--out``); anything else is refused with one
  line, before anything is touched;
* without ``--overwrite`` a command resumes (or refreshes) a folder it made itself, and refuses a
  non-empty folder it did not make unless told (``--allow-existing``: then it writes its files beside
  the others and leaves no marker, so a later ``--overwrite`` still cannot delete them);
* a folder another fewstep command made is refused (an eval folder is not a rollout folder).

How a command treats its own folder found again is its ``on_existing``: ``"resume"`` (eval, rollout,
pretrain, distill, sweep: they continue the run), ``"refresh"`` (demo, score: they rewrite their own
files) or ``"refuse"`` (task, merge-lora: a dataset or checkpoint is replaced only with ``--overwrite``).
A low-layer module (it imports nothing of fewstep but :mod:`fewstep.errors`); docs/cli.md states the rule.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewstep.errors import UsageError

#: The marker file of a folder fewstep made.
MARKER = "run.json"
ON_EXISTING = ("resume", "refresh", "refuse")
ALLOW_EXISTING = "--allow-existing"


@dataclass(frozen=True)
class OutputPlan:
    """What :func:`claim_output` does to a checked folder: ``create`` (absent or empty: make it, write the
    marker), ``replace`` (delete it and start again), ``reuse`` (a run of this command: keep it) or ``join``
    (a folder fewstep did not make, allowed by ``--allow-existing``: no marker)."""

    path: Path
    command: str
    action: str


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of ``folder`` (``{"made_by": "fewstep", "command": ..., "created": ...}``), or None when
    the folder holds no valid one."""
    path = Path(folder) / MARKER
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and doc.get("made_by") == "fewstep" and isinstance(doc.get("command"), str)
    return doc if ok else None


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (symbolic links resolved)."""
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def check_output(
    out: str | os.PathLike,
    command: str,
    *,
    overwrite: bool = False,
    allow_existing: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    on_existing: str = "resume",
    flag: str = "--out",
) -> OutputPlan:
    """Check that ``command`` may write ``out`` (and delete it, with ``overwrite``); touches nothing.

    ``inputs``: the paths the run reads (None entries are skipped). Raises :class:`UsageError` (one line)
    for a path that is a file, a folder fewstep did not make (``--overwrite``, or without
    ``--allow-existing`` when it is not empty), another command's folder, a folder holding an input of
    the run (``--overwrite``), or a folder of this command that ``on_existing="refuse"`` keeps."""
    if on_existing not in ON_EXISTING:
        raise ValueError(f"on_existing must be one of {', '.join(ON_EXISTING)}; got {on_existing!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; give a folder")
    if not path.exists():
        return OutputPlan(path, command, "create")
    marker = read_marker(path)
    only_marker = not any(p.name != MARKER for p in path.iterdir())  # empty, or a start that failed
    if only_marker and (marker is None or marker["command"] == command):
        return OutputPlan(path, command, "create")
    if marker is None:
        return _foreign(path, command, overwrite, allow_existing, flag)
    if marker["command"] != command:
        raise UsageError(
            f"{flag} {path} holds the output of fewstep {marker['command']}, not of fewstep {command}; "
            f"choose another {flag}"
        )
    if overwrite:
        held = [str(p) for p in inputs if p is not None and str(p) and _inside(Path(p), path)]
        if held:
            raise UsageError(f"--overwrite would delete {held[0]}, an input of this run inside {flag} {path}")
        return OutputPlan(path, command, "replace")
    if on_existing == "refuse":
        raise UsageError(f"{flag} {path} holds an earlier fewstep {command} output; pass --overwrite to replace it")
    return OutputPlan(path, command, "reuse")


def _foreign(path: Path, command: str, overwrite: bool, allow_existing: bool, flag: str) -> OutputPlan:
    """A non-empty folder without fewstep's marker: never deleted; written into only when allowed."""
    if overwrite:
        raise UsageError(
            f"--overwrite deletes only a folder fewstep made (one holding {MARKER}); {flag} {path} is not one: "
            f"delete it yourself or choose another {flag}"
        )
    if not allow_existing:
        raise UsageError(
            f"{flag} {path} is not empty and fewstep did not make it (no {MARKER}): choose a new or empty "
            f"{flag}, or pass {ALLOW_EXISTING} to write into it"
        )
    return OutputPlan(path, command, "join")


def claim_output(plan: OutputPlan, **record: Any) -> Path:
    """Carry out a checked plan: create the folder and write the marker (``record``: more fields for it),
    delete and recreate it (``replace``), or leave it as it is (``reuse``, ``join``)."""
    path = plan.path
    if plan.action == "replace":
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if plan.action in ("create", "replace"):
        doc = {"made_by": "fewstep", "command": plan.command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (path / MARKER).write_text(json.dumps({**doc, **record}, indent=2) + "\n", encoding="utf-8")
    return path


def prepare_output(
    out: str | os.PathLike,
    command: str,
    *,
    overwrite: bool = False,
    allow_existing: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    on_existing: str = "resume",
    flag: str = "--out",
) -> Path:
    """:func:`check_output` then :func:`claim_output`, for a single process; returns the folder."""
    plan = check_output(
        out,
        command,
        overwrite=overwrite,
        allow_existing=allow_existing,
        inputs=inputs,
        on_existing=on_existing,
        flag=flag,
    )
    return claim_output(plan)
