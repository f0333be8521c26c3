"""The shipped students: complete checkpoints with model cards, and fewer NFE than the teacher at its accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fewstep
from fewstep.assets import shipped_models
from fewstep.eval.embedded import evaluate_policy
from fewstep.tasks import generate

MODELS = Path(fewstep.__file__).parent / "assets" / "models"
STUDENTS = ("dparallel", "dparallel-control", "cd4lm")


def test_every_model_ships_and_they_stay_under_20_mb():
    assert [name for name, _ in shipped_models()] == ["teacher", "cd4lm", "dparallel", "dparallel-control"]
    total = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file())
    assert total < 20 * 10**6, total


@pytest.mark.parametrize("name", STUDENTS)
def test_student_folder_and_card(name):
    folder = MODELS / name
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    teacher_cfg = json.loads((MODELS / "teacher" / "config.json").read_text())
    assert json.loads((folder / "config.json").read_text()) == teacher_cfg  # same architecture and ids
    card = (folder / "README.md").read_text()
    method = "cd4lm" if name == "cd4lm" else "dparallel"
    assert f"fewstep distill --method {method}" in card and "fewstep rollout" in card and "--seed 0" in card
    assert ("--entropy-weight 0 " in card) == (name == "dparallel-control")
    recorded = json.loads((folder / "training.json").read_text())
    assert recorded["seed"] == 0 and recorded["n_examples"] == 4008 and recorded["steps"] == 1000


@pytest.fixture(scope="module")
def problems():
    return generate("test", 96, seed=0)


def _evaluate(name, problems, policy):
    folder = MODELS / name
    result, _ = evaluate_policy(
        fewstep.load_model(folder), fewstep.load_tokenizer(folder), problems, policy, batch_size=96
    )
    return result


@pytest.mark.xfail(
    strict=True,
    reason="the shipped students were distilled from the previous teacher on the previous task (5-number chains, "
    "blocks of 32); they are retrained from the new teacher (docs/embedded.md section 7) before this branch merges",
)
def test_dparallel_student_keeps_accuracy_with_far_fewer_steps(problems):
    """Measured on all 512 held-out problems (README): dparallel threshold 0.85 98.4 % at 3.80 NFE, the
    teacher 98.4 % at 6.63. On this sample: the student stays accurate and needs >= 1.4x fewer NFE."""
    student = _evaluate("dparallel", problems, "threshold:0.85")
    teacher = _evaluate("teacher", problems, "threshold:0.85")
    assert student.accuracy >= 0.9, student
    assert student.mean_nfe <= 4.5 and teacher.mean_nfe >= 1.4 * student.mean_nfe, (student, teacher)
