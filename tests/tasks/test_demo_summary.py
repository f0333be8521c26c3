"""The demo's summary: per model, the fewest-NFE setting that keeps the teacher baseline's accuracy."""

from __future__ import annotations

from fewstep.eval.demo import fewest_nfe_at_baseline_accuracy, format_summary


def _row(model, policy, acc, nfe):
    return {"model": model, "policy": policy, "accuracy": acc, "mean_nfe": nfe, "speedup_nfe": 64 / nfe}


ROWS = [
    _row("teacher", "baseline", 0.970, 64.0),
    _row("teacher", "threshold:0.9", 0.980, 6.9),
    _row("teacher", "threshold:0.7", 0.955, 6.2),  # 1.5 points below: does not count
    _row("teacher", "threshold:0.8", 0.961, 6.5),  # 0.9 points below: counts
    _row("student", "baseline", 0.99, 64.0),
    _row("student", "entropy:0.35", 0.988, 4.7),
    _row("student", "entropy:0.8", 0.53, 2.3),
    _row("weak", "threshold:0.9", 0.5, 3.0),
]


def test_fewest_nfe_within_one_point_of_the_teacher_baseline():
    got = {e["model"]: e for e in fewest_nfe_at_baseline_accuracy(ROWS)}
    assert got["teacher"]["row"]["policy"] == "threshold:0.8" and got["teacher"]["vs_teacher"] == 1.0
    assert got["student"]["row"]["policy"] == "entropy:0.35"
    assert abs(got["student"]["vs_teacher"] - 6.5 / 4.7) < 1e-12
    assert got["weak"]["row"] is None and got["weak"]["vs_teacher"] is None
    assert all(e["baseline_accuracy"] == 0.970 for e in got.values())
    strict = {e["model"]: e for e in fewest_nfe_at_baseline_accuracy(ROWS, tolerance=0.0)}
    assert strict["teacher"]["row"]["policy"] == "threshold:0.9"


def test_summary_lines():
    text = format_summary(ROWS).splitlines()
    assert text[0].startswith("teacher: threshold:0.8 96.1% at 6.50 NFE")
    assert "1.38x fewer than the teacher's best" in text[1]
    assert text[2] == "weak: no setting within 1 point of the baseline"
    assert fewest_nfe_at_baseline_accuracy([]) == [] and format_summary([]) == ""


def test_pareto_front_keeps_only_undominated_points():
    from fewstep.eval.sweep import pareto_frontier  # the demo's frontier panel uses the sweep's helper

    pts = [(6.0, 97.0), (4.0, 90.0), (5.0, 89.0), (4.0, 92.0), (8.0, 96.0), (2.0, 20.0), (9.0, 99.0)]
    assert [pts[i] for i in pareto_frontier(pts)] == [(2.0, 20.0), (4.0, 92.0), (6.0, 97.0), (9.0, 99.0)]
    assert pareto_frontier([]) == []


def test_the_comparison_stays_within_one_stop_rule():
    """With ``stop`` the teacher's best and the student's best come from rows of the same stopping rule,
    while the accuracy bar stays the teacher baseline without early stop."""
    rows = [
        {**_row("teacher", "baseline", 0.9, 64.0), "stop": "none"},
        {**_row("teacher", "baseline", 0.9, 40.0), "stop": "eos"},
        {**_row("teacher", "threshold:0.9", 0.9, 12.0), "stop": "none"},
        {**_row("teacher", "threshold:0.9", 0.9, 6.0), "stop": "eos"},
        {**_row("student", "entropy:0.5", 0.95, 8.0), "stop": "none"},
        {**_row("student", "entropy:0.5", 0.95, 3.0), "stop": "eos"},
    ]
    eos = {e["model"]: e for e in fewest_nfe_at_baseline_accuracy(rows, stop="eos")}
    assert eos["teacher"]["row"]["mean_nfe"] == 6.0 and eos["student"]["vs_teacher"] == 2.0
    none = {e["model"]: e for e in fewest_nfe_at_baseline_accuracy(rows, stop="none")}
    assert none["teacher"]["row"]["mean_nfe"] == 12.0 and none["student"]["vs_teacher"] == 1.5
    assert all(e["baseline_accuracy"] == 0.9 for e in [*eos.values(), *none.values()])
