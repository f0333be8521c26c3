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
    with pytest.raises(ValueError, match="positive"):
        aup([(0.0, 50.0), (2.0, 50.0)])  # a run without a forward has no tokens per forward


def test_aup_of_the_leaderboard_points_by_hand():
    """d3LLM's LLaDA GSM8K-CoT points (TPF 1.0 / 5.14 / 9.11) with the leaderboard's best accuracy as y_max:
    W(72.63) = 0.92095, W(74.02) = 0.97384, W(73.09) = 0.93812 by hand (exp(-3 (1 - y / 74.68)))."""
    pts = [(5.14, 72.63), (9.11, 73.09), (1.0, 74.02)]
    by_hand = (
        74.02 + 0.5 * 4.14 * (72.63 * 0.92095 + 74.02 * 0.97384) + 0.5 * 3.97 * (73.09 * 0.93812 + 72.63 * 0.92095)
    )
    assert aup(pts, y_max=74.68) == pytest.approx(by_hand, abs=5e-3)
    assert aup(pts, y_max=74.68) == pytest.approx(630.5717108162053)


def test_aup_sorts_stably_by_tokens_per_forward():
    """Equal tokens per forward keep their order (aup_utils sorts by rho only): y_1 is the first one given."""
    assert aup([(1.0, 90.0), (1.0, 80.0), (2.0, 84.0)]) == pytest.approx(90.0)  # y_1 = 90: 80 and 84 dropped
    # the other order: y_1 = 80, nothing dropped, the zero-width step adds nothing
    assert aup([(1.0, 80.0), (1.0, 90.0), (2.0, 84.0)], y_max=90.0) == pytest.approx(
        80.0 + 0.5 * 1.0 * (84 * math.exp(-3 * (1 - 84 / 90)) + 90.0)
    )


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
    assert "AUP" in printed and "frontier" in printed and "TPF" in printed and "pos/fwd" in printed
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
    for p in info["points"]:  # both figures, named apart; TPF never counts EOS padding
        assert 0 < p["tokens_per_forward"] <= p["positions_per_forward"] and "tokens_per_step" not in p
    swept = [(p["tokens_per_forward"], 100 * p["accuracy"]) for p in info["points"][1:]]
    assert (
        info["aup"] == pytest.approx(aup(swept, y_max=result["aup_y_max"])) and result["aup_x"] == "tokens_per_forward"
    )
    assert info["points"][1]["speedup"] is not None  # against the baseline run
    assert set(info["frontier"]) <= {p["policy"] for p in info["points"]}
    # every point is an eval folder: a second sweep resumes instead of regenerating
    before = sorted(p.read_bytes() for p in out.rglob("records.jsonl"))
    assert main(args) == 0
    assert sorted(p.read_bytes() for p in out.rglob("records.jsonl")) == before


def test_run_figures_are_pooled_and_old_records_are_refused(tmp_path):
    """A run's tokens per forward is d3LLM's pooled ratio (answer tokens / NFE over all records), not the mean
    of per-record ratios; records written before the figure existed get a one-line error, not a KeyError."""
    from fewstep.eval.runner import parallelism

    recs = [
        {"id": 0, "nfe": 2, "tokens_per_forward": 5.0, "positions_per_forward": 8.0},  # 10 tokens, 16 positions
        {"id": 1, "nfe": 8, "tokens_per_forward": 1.25, "positions_per_forward": 4.0},  # 10 tokens, 32 positions
    ]
    got = parallelism(recs)
    assert got == {"tokens_per_forward": 20 / 10, "positions_per_forward": 48 / 10}
    assert parallelism([]) == {"tokens_per_forward": None, "positions_per_forward": None}
    old = [{"id": "a", "nfe": 4, "tokens_per_step": 2.0}]
    with pytest.raises(ValueError, match="no tokens_per_forward") as err:
        parallelism(old, tmp_path / "records.jsonl")
    assert "\n" not in str(err.value) and "new --out" in str(err.value)


@pytest.mark.parametrize("x_axis", ["nfe", "tpf"])
def test_frontier_plot_on_either_axis(tmp_path, x_axis):
    """``--x-axis tpf`` plots accuracy against tokens per forward (more is faster: the frontier is read the
    other way round); an unknown axis is refused."""
    from fewstep.eval.sweep import SweepPoint, _front, plot_frontier, summarize_sweep

    pts = [
        SweepPoint("m", f"entropy:threshold={v}", str(v), "", acc, nfe, tpf, tpf * 1.5, 0.1, None, 8)
        for v, acc, nfe, tpf in (
            (0.2, 0.9, 20.0, 2.0),
            (0.5, 0.85, 10.0, 4.0),
            (0.8, 0.6, 8.0, 5.0),
            (1.0, 0.5, 9.0, 3.0),
        )
    ]
    result = summarize_sweep(pts, "arith", "entropy", None)
    assert [p.value for p in _front(pts, "nfe")] == ["0.8", "0.5", "0.2"]
    assert [p.value for p in _front(pts, "tpf")] == ["0.2", "0.5", "0.8"]  # (1.0: fewer TPF and less accurate)
    plot_frontier(pts, result, tmp_path / "f.png", "arith", "entropy", x_axis)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="x_axis"):
        plot_frontier(pts, result, tmp_path / "g.png", "arith", "entropy", "speed")


def test_demo_rows_get_tokens_per_forward_and_aup_per_family():
    """The demo's data: each row's ``aup`` is AUP over TPF of its model, policy family and stop rule (y_max:
    the best row; a row without ``stop`` decoded every block); the summary line names tokens per forward
    and the best family's AUP."""
    from fewstep.eval.demo import add_aup, format_summary

    def row(policy, family, acc, nfe, tpf):
        return {"model": "t", "policy": policy, "family": family, "accuracy": acc, "mean_nfe": nfe,
                "tokens_per_forward": tpf, "positions_per_forward": 2 * tpf, "speedup_nfe": 64 / nfe}  # fmt: skip

    rows = [row("baseline", "baseline", 0.90, 64.0, 0.4), row("entropy:0.5", "entropy", 0.88, 10.0, 2.5)]
    rows.append(row("entropy:0.8", "entropy", 0.80, 8.0, 3.1))  # 8 points below y_1 = 88: dropped
    scores = add_aup(rows)
    assert scores == {
        ("t", "baseline", "none"): pytest.approx(0.4 * 90),
        ("t", "entropy", "none"): pytest.approx(2.5 * 88),
    }
    assert [r["aup"] for r in rows] == [scores[("t", "baseline", "none")]] + [scores[("t", "entropy", "none")]] * 2
    line = format_summary(rows)
    assert "0.40 tokens/forward" in line and "best AUP 220.0 (entropy)" in line
