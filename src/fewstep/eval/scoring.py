"""Score model responses against a task: extraction, checking (math) or sandboxed tests (code).

Shared by ``fewstep score`` (responses from a file), ``fewstep eval`` (responses just generated) and
``fewstep sweep``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fewstep.eval.benchmarks import Task
from fewstep.eval.sandbox import Limits, Sandbox


@dataclass
class ScoredRecord:
    """The outcome of one record: what was extracted, whether it is right, and why."""

    id: Any
    extracted: str | None
    passed: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Summary:
    """``summary.json`` of ``fewstep score``: accuracy is pass@1 for code tasks."""

    task: str
    n: int
    correct: int
    accuracy: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(task: Task, scored: Sequence[ScoredRecord]) -> Summary:
    correct = sum(s.passed for s in scored)
    return Summary(task.name, len(scored), correct, correct / len(scored) if scored else 0.0)


def _short(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def score_math(task: Task, record: dict[str, Any], response: str) -> ScoredRecord:
    if task.judge is not None:
        extracted, ok, reason = task.judge(record, response)
        return ScoredRecord(record["id"], extracted, ok, reason)
    extracted = task.extract(record, response)
    if extracted is None:
        return ScoredRecord(record["id"], None, False, "no final answer found in the response")
    ok = task.check(record, extracted)
    gold = task.gold(record) if task.gold else None
    reason = "correct" if ok else "wrong answer" + (f" (gold: {_short(gold)})" if gold is not None else "")
    return ScoredRecord(record["id"], extracted, ok, reason)


def score(
    task: Task,
    items: Sequence[tuple[dict[str, Any], str]],
    *,
    sandbox: Sandbox | None = None,
    workers: int = 2,
    progress: bool = False,
) -> list[ScoredRecord]:
    """Score ``(record, response)`` pairs, in order. Code runs in ``sandbox`` (default limits if None)."""
    if task.kind == "math":
        return [score_math(task, r, resp) for r, resp in items]
    if task.kind != "code":
        raise ValueError(f"task {task.name!r} has unknown kind {task.kind!r}")
    out: list[ScoredRecord | None] = [None] * len(items)
    to_run: list[tuple[int, dict[str, Any], str]] = []
    for i, (record, response) in enumerate(items):
        extracted = task.extract(record, response)
        if extracted is None:
            out[i] = ScoredRecord(record["id"], None, False, "no code found in the response")
        else:
            to_run.append((i, record, extracted))
    if to_run:
        box = sandbox or Sandbox(Limits())
        programs = [task.program(record, extracted) for _, record, extracted in to_run]
        bar = _progress(progress, len(programs))
        with bar as p:
            tid = p.add_task(f"testing {task.name}", total=len(programs)) if p else None

            def done(_: int, __: Any) -> None:
                if p is not None:
                    p.advance(tid)

            results = box.run_many(programs, workers=workers, on_result=done)
        for (i, record, extracted), res in zip(to_run, results):
            out[i] = ScoredRecord(record["id"], extracted, res.passed, res.reason)
    return [s for s in out if s is not None]


def _progress(enabled: bool, total: int):
    if not enabled or total == 0:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def read_predictions(path: str | Path, task: Task) -> list[tuple[dict[str, Any], str]]:
    """Parse a predictions JSONL (``{"id": ..., "response": "..."}`` per line) into ``(record, response)`` pairs.

    Raises ValueError with a one-line message naming the file and line on malformed JSON, a missing or
    mistyped field, an id the task does not have, or a duplicate id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    pairs: list[tuple[dict[str, Any], str]] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(_lines(f, path), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object with 'id' and 'response'")
            if "id" not in obj:
                raise ValueError(f"{where}: missing 'id'")
            if "response" not in obj:
                raise ValueError(f"{where}: missing 'response'")
            if not isinstance(obj["response"], str):
                raise ValueError(f"{where}: 'response' must be a string, got {type(obj['response']).__name__}")
            if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
                raise ValueError(f"{where}: 'id' must be a string or an integer")
            record = task.get(obj["id"])
            if record is None:
                raise ValueError(f"{where}: unknown id {obj['id']!r} for task {task.name}")
            key = str(record["id"])
            if key in seen:
                raise ValueError(f"{where}: duplicate id {obj['id']!r} (first on line {seen[key]})")
            seen[key] = lineno
            pairs.append((record, obj["response"]))
    if not pairs:
        raise ValueError(f"{path}: no predictions (the file is empty)")
    return pairs


def _lines(f: Iterable[str], path: Path) -> Iterable[str]:
    try:
        yield from f
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None


def write_results(out_dir: str | Path, summary: Summary, scored: Sequence[ScoredRecord]) -> None:
    """Write ``summary.json`` and ``records.jsonl`` into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")
    with (out / "records.jsonl").open("w", encoding="utf-8") as f:
        for s in scored:
            f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")


def print_summary(summary: Summary, kind: str, file: Any = None) -> None:
    metric = "pass@1" if kind == "code" else "accuracy"
    print(
        f"{summary.task}: {metric} {summary.accuracy:.4f} ({summary.correct}/{summary.n} scored)",
        file=file or sys.stdout,
    )
