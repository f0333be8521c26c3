"""Loaders for the benchmark files shipped in ``fewstep/eval/data`` (GSM8K, MATH-500, HumanEval, MBPP).

Every loader returns a list of plain dicts: the upstream fields unchanged plus ``"id"``, the record's
stable id (HumanEval and MBPP ``task_id``, MATH-500 ``unique_id``, GSM8K the 0-based line number of its
file). Nothing here touches the network or any path outside the package.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

DATA_FILES: dict[str, str] = {
    "gsm8k-test": "gsm8k/test.jsonl",
    "gsm8k-train": "gsm8k/train.jsonl",
    "math500": "math500/test.jsonl",
    "humaneval": "humaneval/HumanEval.jsonl",
    "mbpp": "mbpp/mbpp.jsonl",
    "mbpp-sanitized": "mbpp/sanitized-mbpp.json",
}

# MBPP splits by task_id, from the upstream README (`data/mbpp/README.upstream.md`).
MBPP_SPLITS: dict[str, range] = {
    "prompt": range(1, 11),
    "test": range(11, 511),
    "validation": range(511, 601),
    "train": range(601, 975),
}


def data_dir() -> Path:
    """The folder holding the shipped benchmark files (inside the installed package)."""
    return Path(str(resources.files("fewstep.eval").joinpath("data")))


def data_path(name: str) -> Path:
    """Path of one shipped file, by key of :data:`DATA_FILES` or by relative path."""
    return data_dir() / DATA_FILES.get(name, name)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gsm8k_target(answer: str) -> str:
    """The final answer of a GSM8K solution: the text after its last ``####``, commas removed."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def load_gsm8k(split: str = "test") -> list[dict[str, Any]]:
    """GSM8K ``test`` (1,319) or ``train`` (7,473): ``question``, ``answer``, plus ``id`` and ``target``.

    ``id`` is the 0-based line number in the split's file; ``target`` the final number as a string
    (thousands separators removed, e.g. ``"2125"``).
    """
    if split not in ("test", "train"):
        raise ValueError(f"unknown GSM8K split {split!r} (choose test or train)")
    rows = _read_jsonl(data_path(f"gsm8k-{split}"))
    return [{"id": i, **r, "target": gsm8k_target(r["answer"])} for i, r in enumerate(rows)]


def load_math500() -> list[dict[str, Any]]:
    """MATH-500 (500): ``problem``, ``solution``, ``answer``, ``subject``, ``level``, ``unique_id``, plus ``id``."""
    return [{"id": r["unique_id"], **r} for r in _read_jsonl(data_path("math500"))]


def load_humaneval() -> list[dict[str, Any]]:
    """HumanEval (164): ``task_id``, ``prompt``, ``entry_point``, ``canonical_solution``, ``test``, plus ``id``."""
    return [{"id": r["task_id"], **r} for r in _read_jsonl(data_path("humaneval"))]


def _mbpp_split_filter(rows: list[dict[str, Any]], split: str | None) -> list[dict[str, Any]]:
    if split in (None, "all"):
        return rows
    if split not in MBPP_SPLITS:
        raise ValueError(f"unknown MBPP split {split!r} (choose one of {', '.join(MBPP_SPLITS)} or all)")
    ids = MBPP_SPLITS[split]
    return [r for r in rows if r["task_id"] in ids]


def load_mbpp(split: str | None = "test") -> list[dict[str, Any]]:
    """MBPP full set: ``split`` is ``test`` (500, task_ids 11-510), ``prompt``, ``validation``, ``train`` or ``all`` (974).

    Fields: ``task_id``, ``text``, ``code`` (CRLF line ends as upstream), ``test_setup_code``,
    ``test_list``, ``challenge_test_list``, plus ``id`` (= ``task_id``).
    """
    rows = [{"id": r["task_id"], **r} for r in _read_jsonl(data_path("mbpp"))]
    return _mbpp_split_filter(rows, split)


def load_mbpp_sanitized(split: str | None = "all") -> list[dict[str, Any]]:
    """Sanitized MBPP (427 hand-verified problems by default; ``split`` filters by the full set's task_id ranges).

    Fields: ``source_file``, ``task_id``, ``prompt`` (the problem text), ``code``, ``test_imports``,
    ``test_list``, plus ``id`` (= ``task_id``).
    """
    with data_path("mbpp-sanitized").open(encoding="utf-8") as f:
        rows = [{"id": r["task_id"], **r} for r in json.load(f)]
    return _mbpp_split_filter(rows, split)
