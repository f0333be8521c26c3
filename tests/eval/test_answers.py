"""Answer extraction and checking for GSM8K and MATH-500, and the gold-answer reference checks."""

from __future__ import annotations

import pytest

from fewstep.eval import answers
from fewstep.eval.benchmarks import get_task
from fewstep.eval.scoring import score, summarize


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Janet sells 9 eggs.\n#### 18", "18"),
        ("#### $1,250.", "1250"),
        ("steps 3 and 4\n#### -7\n\nQuestion: next", "-7"),
        ("The answer is \\boxed{42}.", "42"),
        ("so \\boxed{\\$1,000} in total, 5 days", "1000"),
        ("\\boxed{18 \\text{ dollars}}", "18"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("3 apples and then 5 pears, 12.5 left.", "12.5"),
        ("costs 1,000,000 dollars", "1000000"),
        ("no numbers here", None),
    ],
)
def test_extract_gsm8k(response, expected):
    assert answers.extract_gsm8k(response) == expected


def test_gsm8k_numeric_comparison():
    assert answers.gsm8k_equal("18.00", "18")
    assert answers.gsm8k_equal("1,000", "1000")
    assert answers.gsm8k_equal("$5", "5")
    assert answers.gsm8k_equal("3/4", "0.75")
    assert not answers.gsm8k_equal("17", "18")
    assert not answers.gsm8k_equal(None, "18")
    assert not answers.gsm8k_equal("seven", "7")


def test_last_boxed_handles_nesting_and_forms():
    assert answers.last_boxed("\\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"
    assert answers.last_boxed("\\fbox{7}") == "7"
    assert answers.last_boxed("$\\boxed 5$") == "5"
    assert answers.last_boxed("\\boxed{unbalanced") is None
    assert answers.last_boxed("nothing") is None


def test_extract_math_and_minerva_fallback():
    assert (
        answers.extract_math("so $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.")
        == "\\left( 3, \\frac{\\pi}{2} \\right)"
    )
    minerva = "Final Answer: The final answer is $\\frac{2}{3}$. I hope it is correct."
    assert answers.extract_math(minerva) == "\\frac{2}{3}"
    assert answers.extract_math("I do not know.") is None


@pytest.mark.parametrize(
    ("predicted", "gold", "equal"),
    [
        ("0.5", "\\frac{1}{2}", True),
        ("\\dfrac{1}{2}", "\\frac12", True),
        ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("x^2+2x+1", "(x+1)^2", True),
        ("\\frac{1}{3}", "\\frac{1}{2}", False),
        ("5", "-5", False),
        (None, "1", False),
    ],
)
def test_math_equal_uses_math_verify(predicted, gold, equal):
    assert answers.math_equal(predicted, gold) is equal


def _reference(task_name, wrap):
    task = get_task(task_name)
    scored = score(task, [(r, wrap(r)) for r in task.records])
    return summarize(task, scored), [s for s in scored if not s.passed]


def test_gsm8k_reference_hash_form_scores_100():
    summary, failed = _reference(
        "gsm8k", lambda r: "Let me think. 2 + 3 = 5.\n#### " + r["answer"].split("####")[-1].strip()
    )
    assert failed == [] and (summary.n, summary.correct, summary.accuracy) == (1319, 1319, 1.0)


def test_gsm8k_reference_boxed_form_scores_100():
    summary, failed = _reference(
        "gsm8k", lambda r: "So the total is $\\boxed{" + r["answer"].split("####")[-1].strip() + "}$."
    )
    assert failed == [] and summary.correct == 1319


def test_gsm8k_full_gold_solution_scores_100():
    summary, failed = _reference("gsm8k", lambda r: r["answer"])
    assert failed == [] and summary.correct == 1319


def test_math500_reference_boxed_scores_100():
    summary, failed = _reference("math500", lambda r: "Therefore the answer is $\\boxed{" + r["answer"] + "}$.")
    assert failed == [] and (summary.n, summary.correct) == (500, 500)


def test_math500_gold_solutions_score_100():
    """The worked solutions end in their own \\boxed{} answer; math-verify must accept every one."""
    summary, failed = _reference("math500", lambda r: r["solution"])
    assert [(f.id, f.extracted) for f in failed] == [] and summary.correct == 500


def test_wrong_answers_fail_with_a_reason():
    task = get_task("gsm8k")
    rec = task.records[0]
    wrong, none = score(task, [(rec, "#### 17"), (rec, "I cannot say")])
    assert not wrong.passed and wrong.extracted == "17" and wrong.reason == "wrong answer (gold: 18)"
    assert not none.passed and none.extracted is None and none.reason == "no final answer found in the response"
