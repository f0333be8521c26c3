"""`fewstep eval` on a tiny random-weight model: records, summary, resume after SIGKILL, baseline speedup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fewstep.cli import main
from tests.killpoint import killed_at

ARGS = ["--task", "arith", "--gen-length", "32", "--block-length", "8", "--no-progress"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_eval_writes_records_and_summary(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["eval", "--model", str(tiny_model_dir), *ARGS, "--limit", "5", "--batch-size", "2", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 5 and summary["complete"] and summary["task"] == "arith"
    for key in ("accuracy", "mean_nfe", "tokens_per_forward", "positions_per_forward", "latency_per_sample_s"):
        assert key in summary
    assert "tokens_per_step" not in summary and "speedup" in summary and "tokens_per_s" in summary
    assert (summary["device"], summary["dtype"], summary["batch_size"]) == ("cpu", "float32", 2)
    recs = _records(out)
    assert [r["id"] for r in recs] == [f"arith-test-{i:06d}" for i in range(5)]
    for r in recs:
        keys = {"id", "response", "extracted", "passed", "reason", "nfe", "latency_s"}
        assert set(r) >= keys | {"positions_per_forward", "tokens_per_forward"}
        assert 1 <= r["nfe"] <= 32 and r["reason"]
    # the figures pooled over the records (sums, then one ratio), as d3LLM's harness pools TPF
    nfe = sum(r["nfe"] for r in recs)
    tokens = sum(round(r["tokens_per_forward"] * r["nfe"]) for r in recs)
    assert summary["tokens_per_forward"] == pytest.approx(tokens / nfe)
    assert summary["positions_per_forward"] == pytest.approx(
        sum(r["positions_per_forward"] * r["nfe"] for r in recs) / nfe
    )
    assert summary["tokens_per_forward"] <= summary["positions_per_forward"]
    assert "arith: accuracy" in capsys.readouterr().out
    # the same command again does nothing new; a larger --limit only adds the missing records
    assert (
        main(["eval", "--model", str(tiny_model_dir), *ARGS, "--limit", "5", "--batch-size", "2", "--out", str(out)])
        == 0
    )
    assert len(_records(out)) == 5
    assert (
        main(["eval", "--model", str(tiny_model_dir), *ARGS, "--limit", "7", "--batch-size", "2", "--out", str(out)])
        == 0
    )
    assert [r["id"] for r in _records(out)] == [f"arith-test-{i:06d}" for i in range(7)]


def test_eval_refuses_to_mix_settings(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["eval", "--model", str(tiny_model_dir), *ARGS, "--limit", "2", "--out", str(out)]) == 0
    code = main(
        ["eval", "--model", str(tiny_model_dir), *ARGS, "--limit", "2", "--policy", "entropy:0.5", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "policy='threshold:0.9'" in err and len(err.strip().splitlines()) == 1


def test_eval_bad_input(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing"), *ARGS, "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(["eval", "--model", str(tiny_model_dir), *ARGS, "--policy", "bogus:1", "--out", str(tmp_path / "z")]) == 2
    )


def test_baseline_speedup(tiny_model_dir, tmp_path, capsys):
    base, fast = tmp_path / "base", tmp_path / "fast"
    common = ["eval", "--model", str(tiny_model_dir), *ARGS, "--limit", "2"]
    assert main([*common, "--policy", "llada:steps=32", "--out", str(base)]) == 0
    assert main([*common, "--policy", "threshold:0.5", "--out", str(fast), "--baseline", str(base)]) == 0
    s = json.loads((fast / "summary.json").read_text())
    b = json.loads((base / "summary.json").read_text())
    assert s["speedup"] == pytest.approx(b["latency_per_sample_s"] / s["latency_per_sample_s"])
    assert s["nfe_reduction"] == pytest.approx(b["mean_nfe"] / s["mean_nfe"])
    assert "speedup" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_sigkill(tiny_model_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fewstep", "eval", "--model", str(tiny_model_dir), "--task", "arith", "--no-progress"]
    cmd += [
        "--gen-length",
        "16",
        "--block-length",
        "8",
        "--limit",
        "10",
        "--policy",
        "llada:steps=16",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    rec = out / "records.jsonl"
    # SIGKILL as soon as 3 records are committed (fsync'd): killed mid-way, every time
    killed = subprocess.run(killed_at({"fsync_lines": ["records.jsonl", 3]}, *cmd[3:]), env=env)
    assert killed.returncode == -signal.SIGKILL
    before = rec.read_bytes()
    n_before = before.count(b"\n")
    assert 3 <= n_before < 10, "the run must be killed mid-way for this test to mean anything"
    with rec.open("ab") as f:  # as if the kill had torn the last line
        f.write(b'{"id": "arith-test-0000')
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = rec.read_bytes()
    assert after.startswith(before)  # nothing already there was regenerated
    ids = [r["id"] for r in _records(out)]
    assert ids == [f"arith-test-{i:06d}" for i in range(10)]  # none missing, none twice
    assert json.loads((out / "summary.json").read_text())["n"] == 10
