"""``benchmarks/serve.py --matched`` (issue 27's matched-compute setting) runs end to end on a few requests:
the fewstep server in its own pinned process, the in-process engine and text layer at the same levels, every
answer checked against the prompt decoded alone, and the peer skipped with its reason when it is not given.
``benchmarks/profile_round.py`` runs too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def test_matched_serving_benchmark_smoke(tmp_path):
    out = tmp_path / "serve_matched.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--matched", "--requests", "3", "--clients", "1,2",
           "--repeats", "2", "--burst", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["peer"] == {"ran": False, "reason": result["peer"]["reason"]} and "--peer" in result["peer"]["reason"]
    rows = {(r["server"], r["clients"]): r for r in result["rows"]}
    names = ["fewstep serve", "in-process engine (no HTTP)", "in-process text layer (no HTTP)"]
    assert set(rows) == {(n, c) for n in names for c in (1, 2)}
    for (_, c), r in rows.items():  # two bursts of max(2, two waves of the clients)
        assert r["requests"] == 2 * max(2, 2 * c) and r["requests_per_s"] > 0 and r["cpu_s_per_request"] > 0
        assert r["cpu_gain_vs_1"] > 0 and r["speedup_vs_1"] > 0
    for c in (1, 2):
        assert rows[("fewstep serve", c)]["answers_equal_alone"] == 1.0  # concurrency never changes an answer
    assert set(result["target"]) >= {"speedup_at_max_clients", "cpu_gain_at_max_clients", "speedup_met"}
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--report", str(out)], env=ENV,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert report.returncode == 0 and "| fewstep serve | 2 |" in report.stdout


def test_profile_round_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_round.py"), "--batches", "1,2", "--repeats", "1",
           "--label", "smoke", "--out-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "profile_round_smoke.json").read_text())
    assert [(r["batch"], r["layer"]) for r in result["phases"]] == [
        (1, "engine"),
        (1, "text"),
        (2, "engine"),
        (2, "text"),
    ]
    for r in result["phases"]:
        assert r["rounds"] == 64 and r["phases_ms_per_round"]["forward"] > 0  # 64 fixed forwards per request
        assert abs(sum(r["phases_share"].values()) - 1) < 0.01
    assert {t["batch"] for t in result["torch"]} == {1, 2} and result["python"]["top"]
    assert (tmp_path / "profile_round_smoke.md").read_text().startswith("# One engine round")
