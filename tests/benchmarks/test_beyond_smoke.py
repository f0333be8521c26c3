"""``benchmarks/beyond.py`` runs end to end on a few problems: every model decoded with the demo's settings
under one stopping rule, the four targets judged per seed, summarised over seeds, and written as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fewstep

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
MODELS = Path(fewstep.__file__).parent / "assets" / "models"
METHODS = ("dparallel", "cd4lm", "d3llm", "dmax")


def test_beyond_benchmark_smoke(tmp_path):
    students = tmp_path / "students"
    students.mkdir()
    for seed in (0, 1):  # the shipped students stand in for two training seeds
        for m in METHODS:
            (students / f"{m}-s{seed}").symlink_to(MODELS / m)
    out = tmp_path / "beyond.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "beyond.py"), "--students", str(students), "--seeds", "0,1",
           "--n", "4", "--batch-size", "4", "--sweep", "quick", "--workers", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [p["seed"] for p in result["per_seed"]] == [0, 1]
    rows = result["rows"]
    assert {r["stop"] for r in rows if r["policy"] != "baseline"} == {"eos"}  # one stopping rule for all
    assert {(r["model"], r["stop"]) for r in rows if r["policy"] == "baseline"} == {
        ("teacher", "none"),
        ("teacher", "eos"),
    }
    assert {r["model"] for r in rows} == {"teacher"} | {f"{m}-s{s}" for m in METHODS for s in (0, 1)}
    # the same checkpoint under two seed names gives the same rows: the spread is 0
    s = result["summary"]
    assert s["a_best_student_vs_teacher"]["std"] in (0.0, None) and s["a_best_student_vs_teacher"]["target"] == 2.5
    assert set(s["c_multi_vs_single_block"]) == set(METHODS)
    for p in result["per_seed"]:
        assert (
            set(p["students"]) == set(METHODS) and p["baseline_accuracy"] == result["per_seed"][0]["baseline_accuracy"]
        )
    assert "a_best_student_vs_teacher" in proc.stdout and "wrote" in proc.stdout
    missing = subprocess.run([*cmd[:3], str(tmp_path / "none")], env=ENV, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "missing student checkpoints" in missing.stderr
