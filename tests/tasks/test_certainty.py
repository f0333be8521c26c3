"""The certainty-convergence measurement: an exact replay of a one-token-per-forward decoding, and its curves."""

from __future__ import annotations

import math

import pytest
import torch

import fewstep
from fewstep.eval.certainty import (
    CertaintyTrace,
    block_curves,
    certainty_trace,
    lag_curve,
    measure_task,
    plot_certainty,
)
from fewstep.tasks import BLOCK_LENGTH, GEN_LENGTH, generate_problems


@pytest.fixture(scope="module")
def teacher():
    return fewstep.load_model("teacher"), fewstep.load_tokenizer("teacher")


@pytest.fixture(scope="module")
def trace(teacher):
    model, tok = teacher
    problems = generate_problems("test", 6, seed=0)
    prompts = [tok(p.prompt, add_special_tokens=False).input_ids for p in problems]
    return certainty_trace(model, prompts, gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, batch_size=4)


def test_replay_sees_what_the_decoder_saw(trace):
    """At every forward the committed position is the block's most confident mask and its argmax is the
    final token (greedy low-confidence remasking): a replay shifted by one step would break both."""
    n, s_max, g = trace.prob.shape
    assert (n, s_max, g) == (6, GEN_LENGTH, GEN_LENGTH)
    assert sorted(trace.decode_step[0].tolist()) == list(range(1, GEN_LENGTH + 1))
    for r in range(n):
        for s in range(1, s_max + 1):
            masked = ~torch.isnan(trace.prob[r, s - 1])
            assert torch.equal(masked, trace.decode_step[r] >= s)
            pos = int((trace.decode_step[r] == s).nonzero())
            assert bool(trace.top[r, s - 1, pos])
            block = slice(pos // BLOCK_LENGTH * BLOCK_LENGTH, (pos // BLOCK_LENGTH + 1) * BLOCK_LENGTH)
            others = trace.prob[r, s - 1, block]
            assert float(trace.prob[r, s - 1, pos]) >= float(others[~torch.isnan(others)].max()) - 1e-6


def test_replay_matches_the_decoded_answer(trace, teacher):
    model, tok = teacher
    problems = generate_problems("test", 6, seed=0)
    prompts = [tok(p.prompt, add_special_tokens=False).input_ids for p in problems]
    out = fewstep.generate(
        model, prompts, f"llada:steps={GEN_LENGTH}", gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, early_stop=False
    )
    assert torch.equal(out.answers, trace.answers) and torch.equal(out.decode_step, trace.decode_step)
    assert torch.equal(trace.eos, trace.answers == model.config.eos_token_id)


def _toy() -> CertaintyTrace:
    """2 rows, 4 positions, blocks of 2, decoded left to right; row 1 is wrong; position 3 is EOS."""
    nan = math.nan
    prob = torch.tensor(
        [
            [[0.5, 0.2, 0.4, 0.9], [nan, 0.6, 0.4, 0.9], [nan, nan, 0.8, 0.9], [nan, nan, nan, 1.0]],
            [[0.1, 0.1, 0.1, 0.1], [nan, 0.1, 0.1, 0.1], [nan, nan, 0.1, 0.1], [nan, nan, nan, 0.1]],
        ]
    )
    return CertaintyTrace(
        prob=prob,
        top=prob > 0.45,
        decode_step=torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]]),
        answers=torch.tensor([[5, 6, 7, 2], [5, 6, 7, 2]]),
        eos=torch.tensor([[False, False, False, True]] * 2),
        correct=torch.tensor([True, False]),
        gen_length=4,
        block_length=2,
    )


def test_block_and_lag_curves_average_the_right_positions():
    toy = _toy()
    blocks = block_curves(toy)
    assert blocks["count"] == [[2, 1], [1, 0]]
    assert blocks["confidence"][0] == pytest.approx([0.35, 0.6]) and blocks["confidence"][1][1] is None
    assert blocks["confidence"][1][0] == pytest.approx(0.8)
    assert blocks["argmax_agrees"][0] == pytest.approx([0.5, 1.0])
    eos = block_curves(toy, "eos")
    assert eos["count"] == [[0, 0], [1, 1]] and eos["confidence"][1] == pytest.approx([0.9, 1.0])
    lag = lag_curve(toy)
    assert lag["lag"] == [0, 1] and lag["count"] == [3, 2]
    assert lag["confidence"] == pytest.approx([(0.5 + 0.6 + 0.8) / 3, (0.2 + 0.4) / 2])


def test_measure_task_and_plot(teacher, tmp_path):
    model, tok = teacher
    result = measure_task(
        model, tok, generate_problems("test", 4, seed=0), gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH
    )
    assert result["n_rows"] == 4 and 0 <= result["n_correct"] <= 4
    assert len(result["blocks"]["confidence"]) == GEN_LENGTH // BLOCK_LENGTH
    if result["n_correct"]:
        assert len(result["example"]["prob"]) == GEN_LENGTH
    plot_certainty(result, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 20_000
