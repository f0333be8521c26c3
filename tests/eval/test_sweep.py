"""AUP (d3LLM's formula), the Pareto frontier, and `fewstep sweep` on a tiny model."""

from __future__ import annotations

import json
import math

import pytest

from fewstep.cli import main
from fewstep.eval.sweep import aup, pareto_frontier, policy_spec


def test_aup_matches_the_formula_by_hand():
    points = [(1.0, 80.0), (2.0, 78.0), (4.0, 70.0), (3.0, 74.0)]  # unsorted on purpose
    w78 = math.exp(-3 * (1 - 78 / 80))
    # (3, 74) and (4, 70) fall more than 5 points below y_1 = 80 and are dropped
    assert aup(points) == pytest.approx(1.0 * 80 + 0.5 * (2.0 - 1.0) * (78 * w78 + 80 * 1.0))
    assert aup([(2.0, 50.0)]) == pytest.approx(100.0)  # a single point: rho_1 * y_1
    # no accuracy loss: AUP is the plain area under the curve (W = 1 everywhere)
    assert aup([(1.0, 60.0), (3.0, 60.0)]) == pytest.approx(60 + 0.5 * 2 * 120)
    # a higher y_max (the best accuracy anyone reached on the task) penalises the same curve more
    assert aup([(1.0, 60.0), (3.0, 60.0)], y_max=80.0) < aup([(1.0, 60.0), (3.0, 60.0)])
    with pytest.raises(ValueError):
        aup([])


def test_pareto_frontier():
    pts = [(100, 0.80), (50, 0.78), (60, 0.75), (30, 0.60), (30, 0.65), (200, 0.80), (120, 0.82)]
    assert pareto_frontier(pts) == [4, 1, 0, 6]


def test_policy_spec():
    assert policy_spec("threshold", "0.7") == "threshold:threshold=0.7"
    assert policy_spec("cad:max_tokens=32", "0.9") == "cad:threshold=0.9,max_tokens=32"
    with pytest.raises(ValueError):
        policy_spec("nope", "1")


def test_sweep_cli_writes_png_and_json(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(tiny_model_dir), "--task", "arith", "--policy", "threshold", "--values", "0.5,0.9"]
    args += ["--baseline-policy", "llada:steps=16", "--gen-length", "16", "--block-length", "8", "--limit", "3"]
    args += ["--batch-size", "3", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "AUP" in printed and "frontier" in printed
    png = out / "frontier.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    result = json.loads((out / "sweep.json").read_text())
    info = result["models"][str(tiny_model_dir)]
    assert [p["policy"] for p in info["points"]] == [
        "llada:steps=16",
        "threshold:threshold=0.5",
        "threshold:threshold=0.9",
    ]
    assert all(p["n"] == 3 for p in info["points"])
    assert info["points"][1]["speedup"] is not None  # against the baseline run
    assert set(info["frontier"]) <= {p["policy"] for p in info["points"]}
    # every point is an eval folder: a second sweep resumes instead of regenerating
    before = sorted(p.read_bytes() for p in out.rglob("records.jsonl"))
    assert main(args) == 0
    assert sorted(p.read_bytes() for p in out.rglob("records.jsonl")) == before
