"""`fewstep score` end to end: the reference checks (gold answers score 100 %), outputs and errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fewstep.cli import main
from fewstep.eval.benchmarks import get_task


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _score(tmp_path, task, rows, capsys, *extra):
    preds = _write(tmp_path / "preds.jsonl", rows)
    out = tmp_path / "out"
    code = main(["score", "--task", task, "--predictions", preds, "--out", str(out), "--no-progress", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return summary, records, captured.out


def _failures(records):
    return [(r["id"], r["reason"]) for r in records if not r["passed"]]


def test_gsm8k_reference_both_forms(tmp_path, capsys):
    task = get_task("gsm8k")
    rows = [{"id": r["id"], "response": f"Reasoning...\n#### {r['target']}"} for r in task.records]
    summary, records, out = _score(tmp_path, "gsm8k", rows, capsys)
    assert summary == {"task": "gsm8k", "n": 1319, "correct": 1319, "accuracy": 1.0}
    assert out.strip() == "gsm8k: accuracy 1.0000 (1319/1319 scored)"
    assert set(records[0]) == {"id", "extracted", "passed", "reason"}
    assert records[0] == {"id": 0, "extracted": "18", "passed": True, "reason": "correct"}
    rows = [
        {"id": str(r["id"]), "response": "The answer is $\\boxed{" + r["answer"].split("####")[-1].strip() + "}$"}
        for r in task.records
    ]
    summary, _, _ = _score(tmp_path, "gsm8k", rows, capsys)
    assert summary["correct"] == 1319


def test_math500_reference(tmp_path, capsys):
    rows = [{"id": r["id"], "response": "Hence $\\boxed{" + r["answer"] + "}$."} for r in get_task("math500").records]
    summary, records, _ = _score(tmp_path, "math500", rows, capsys)
    assert _failures(records) == []
    assert summary == {"task": "math500", "n": 500, "correct": 500, "accuracy": 1.0}


@pytest.mark.slow
def test_humaneval_reference_164(tmp_path, capsys):
    rows = [
        {
            "id": r["id"],
            "response": "Here is the code:\n```python\n" + r["prompt"] + r["canonical_solution"] + "\n```\nDone.",
        }
        for r in get_task("humaneval").records
    ]
    summary, records, out = _score(tmp_path, "humaneval", rows, capsys)
    assert _failures(records) == []
    assert summary == {"task": "humaneval", "n": 164, "correct": 164, "accuracy": 1.0}
    assert out.strip() == "humaneval: pass@1 1.0000 (164/164 scored)"


@pytest.mark.slow
def test_mbpp_sanitized_reference_427(tmp_path, capsys):
    rows = [
        {"id": r["id"], "response": "```python\n" + r["code"] + "\n```"} for r in get_task("mbpp-sanitized").records
    ]
    summary, records, _ = _score(tmp_path, "mbpp-sanitized", rows, capsys)
    assert _failures(records) == []  # no reference solution fails its own tests
    assert summary == {"task": "mbpp-sanitized", "n": 427, "correct": 427, "accuracy": 1.0}


def test_mbpp_full_reference_sample(tmp_path, capsys):
    """All records with setup code or imports, plus the first 20 of the test split (all 974 pass; see docs)."""
    task = get_task("mbpp")
    chosen = [r for r in task.records if r["test_setup_code"].strip()] + task.eval_records(limit=20)
    rows = [{"id": r["id"], "response": "```python\n" + r["code"] + "\n```"} for r in chosen]
    summary, records, _ = _score(tmp_path, "mbpp", rows, capsys)
    assert _failures(records) == [] and summary["n"] == len(chosen)


# Representative references for the loaded-machine test: the most CPU-hungry of each set (measured:
# MBPP 123 needs about 3 s of CPU, HumanEval/75 0.16 s, everything else under 0.05 s), the ones with
# setup code or helpers, and a few plain ones.
LOADED = {
    "humaneval": [
        "HumanEval/75",
        "HumanEval/12",
        "HumanEval/36",
        "HumanEval/0",
        "HumanEval/14",
        "HumanEval/32",
        "HumanEval/50",
    ],
    "mbpp-sanitized": [123, 2, 478, 773, 630],
    "mbpp": [123, 367, 927, 11],
}


@pytest.mark.slow
def test_references_pass_on_a_loaded_machine(tmp_path, capsys):
    """Issue 23: the references pass beside two CPU-bound processes that the test starts. The time limit
    is CPU time, so a busy machine only stretches the wall clock (a 10 s wall-clock limit used to fail
    MBPP 123's reference, which needs about 3 s of CPU, on a loaded machine)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for name, ids in LOADED.items():
            task = get_task(name)
            rows = []
            for rid in ids:
                r = task.get(rid)
                body = r["prompt"] + r["canonical_solution"] if name == "humaneval" else r["code"]
                rows.append({"id": rid, "response": "```python\n" + body + "\n```"})
            (tmp_path / name).mkdir()
            summary, records, _ = _score(tmp_path / name, name, rows, capsys)
            assert _failures(records) == [] and summary["correct"] == len(ids)
        assert all(h.poll() is None for h in hogs)  # the load was there all along
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def test_code_failures_carry_reasons(tmp_path, capsys):
    he = get_task("humaneval")
    rec = he.get("HumanEval/0")
    rows = [
        {"id": "HumanEval/0", "response": "```python\n" + rec["prompt"] + "    return True\n```"},
        {"id": "HumanEval/1", "response": "I do not know."},
        {
            "id": "HumanEval/2",
            "response": "```python\ndef truncate_number(number):\n    while True:\n        pass\n    return 0.0\n```",
        },
    ]
    summary, records, _ = _score(tmp_path, "humaneval", rows, capsys, "--timeout", "1")
    assert summary == {"task": "humaneval", "n": 3, "correct": 0, "accuracy": 0.0}
    assert records[0]["reason"].startswith("exit code 1: AssertionError")
    assert records[1] == {
        "id": "HumanEval/1",
        "extracted": None,
        "passed": False,
        "reason": "no code found in the response",
    }
    assert records[2]["reason"].startswith("timeout")


@pytest.mark.parametrize(
    ("task", "lines", "message"),
    [
        ("gsm8k", ['{"id": 0, "response": "#### 18"}', '{"id": 1, "resp'], "preds.jsonl:2: not valid JSON"),
        ("gsm8k", ['{"id": 99999, "response": "x"}'], "preds.jsonl:1: unknown id 99999 for task gsm8k"),
        ("humaneval", ['{"id": "HumanEval/999", "response": "x"}'], "unknown id 'HumanEval/999' for task humaneval"),
        ("gsm8k", ['{"id": 0, "response": "a"}', '{"id": "0", "response": "b"}'], "preds.jsonl:2: duplicate id '0'"),
        ("gsm8k", ['{"id": 0}'], "preds.jsonl:1: missing 'response'"),
        ("gsm8k", ['{"id": 0, "response": 5}'], "'response' must be a string"),
        ("gsm8k", ["[1, 2]"], "expected a JSON object"),
        ("gsm8k", [], "no predictions"),
        (
            "gsm9k",
            ['{"id": 0, "response": "a"}'],
            "unknown task 'gsm9k' (known: arith, gsm8k, humaneval, math500, mbpp",
        ),
    ],
)
def test_bad_input_exits_with_one_line(tmp_path, capsys, task, lines, message):
    preds = _write(tmp_path / "preds.jsonl", lines)
    code = main(["score", "--task", task, "--predictions", preds, "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_missing_file_and_no_out(tmp_path, capsys):
    assert main(["score", "--task", "gsm8k", "--predictions", str(tmp_path / "none.jsonl")]) != 0
    assert "not found" in capsys.readouterr().err
    preds = _write(tmp_path / "p.jsonl", ['{"id": 3, "response": "#### 1"}'])
    assert main(["score", "--task", "gsm8k", "--predictions", preds]) == 0
    assert capsys.readouterr().out.strip().startswith("gsm8k: accuracy 0.0000 (0/1 scored)")
    assert not (tmp_path / "summary.json").exists()


def test_embedded_task_is_registered_and_verified_step_by_step(tmp_path, capsys):
    task = get_task("arith")
    assert len(task.records) == 512 and task.records[0]["id"] == "arith-test-000000"
    rows = [{"id": r["id"], "response": r["response"]} for r in task.records]
    summary, _, _ = _score(tmp_path, "arith", rows, capsys)
    assert summary == {"task": "arith", "n": 512, "correct": 512, "accuracy": 1.0}
    rec = task.records[0]  # '1 + 5 + 1 + 7 - 8 ?' = 6
    right_value_wrong_steps = {"id": rec["id"], "response": "1 + 5 = 6 , 6 + 1 = 8 , 8 + 7 = 14 , 14 - 8 = 6 #### 6"}
    summary, records, _ = _score(tmp_path, "arith", [right_value_wrong_steps], capsys)
    assert summary["correct"] == 0 and records[0]["extracted"] == "6"
    assert "does not reduce" in records[0]["reason"] or "false" in records[0]["reason"]
