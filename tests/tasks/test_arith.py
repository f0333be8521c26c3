"""The embedded task: generator determinism, disjoint splits, and the verifier on every answer form."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fewstep.tasks import BLOCK_LENGTH, GEN_LENGTH, arith
from fewstep.tasks.arith import (
    ArithConfig,
    derivation,
    evaluate,
    generate,
    n_derivations,
    parse,
    render,
    split_of,
    verify,
)


def test_generator_is_deterministic_and_seeded():
    a = generate("train", 300, seed=3)
    b = generate("train", 300, seed=3)
    c = generate("train", 300, seed=4)
    assert a == b
    assert [p.prompt for p in a] != [p.prompt for p in c]
    assert [p.id for p in a[:2]] == ["arith-train-000000", "arith-train-000001"]


def test_splits_are_disjoint_for_any_seed():
    test = generate("test", 512, seed=0)
    train = generate("train", 20_000, seed=0, unique=False)
    other = generate("train", 5_000, seed=7)
    test_prompts = {p.prompt for p in test}
    assert len(test_prompts) == 512  # test prompts are distinct
    assert not test_prompts & {p.prompt for p in train}
    assert not test_prompts & {p.prompt for p in other}
    assert all(split_of(p.prompt) == "test" for p in test)
    assert all(split_of(p.prompt) == "train" for p in train)


def test_every_generated_example_is_valid_and_in_range():
    cfg = ArithConfig()
    for p in generate("train", 2000, seed=1, unique=False):
        assert verify(p.prompt, p.response), (p.prompt, p.response, verify(p.prompt, p.response).reason)
        tree = parse(p.prompt)
        assert render(tree) + " ?" == p.prompt
        assert str(evaluate(tree)) == p.gold
        words = set(p.prompt.split()) | set(p.response.split())
        assert words <= set(cfg.vocabulary())
        assert "(" not in p.prompt  # the default shape is a left-to-right chain


def test_answers_vary_in_length_and_span_several_blocks():
    """The shipped geometry (GEN_LENGTH, BLOCK_LENGTH): every answer and its first EOS fit the canvas with
    at least one EOS block after it, answers take 3 to 7 blocks, and every length in between occurs."""
    problems = generate("test", 512, seed=0)
    lengths = [len(p.response.split()) for p in problems]
    assert sorted(set(lengths)) == [19, 25, 31, 37, 43, 49, 55]  # 4..10 numbers: 3..9 steps of 6 tokens
    assert max(lengths) + 1 <= GEN_LENGTH - BLOCK_LENGTH  # the last block is always all EOS
    blocks = {(n + 1 + BLOCK_LENGTH - 1) // BLOCK_LENGTH for n in lengths}  # blocks up to the first EOS
    assert blocks == {3, 4, 5, 6, 7}
    counts = Counter(lengths)
    assert min(counts.values()) >= 40  # roughly uniform over the seven lengths
    prompts = Counter(len(p.prompt.split()) for p in problems)
    assert sorted(prompts) == [8, 10, 12, 14, 16, 18, 20]


def test_several_valid_answers_per_prompt():
    """Median 8 valid derivations per held-out prompt (about 3 independent operand-order choices)."""
    problems = generate("test", 512, seed=0)
    counts = sorted(n_derivations(parse(p.prompt)) for p in problems)
    assert counts[len(counts) // 2] >= 8 and sum(c > 1 for c in counts) >= 0.95 * len(counts)


def test_tree_shape_generates_valid_bracketed_problems():
    cfg = ArithConfig(shape="tree", max_leaves=5)
    problems = generate("train", 500, seed=2, cfg=cfg)
    assert any("(" in p.prompt for p in problems)
    assert all(verify(p.prompt, p.response) for p in problems)
    assert max(n_derivations(parse(p.prompt)) for p in problems) >= 8  # order choices on top of swaps


def test_training_answers_have_several_forms():
    """Operand order and step order vary across samples of one prompt: the task is multimodal."""
    e = parse("( 1 + 2 ) - ( 3 - 1 ) ?")
    rng = random.Random(0)
    forms = {derivation(e, rng, ArithConfig()) for _ in range(200)}
    assert forms == {
        "1 + 2 = 3 , 3 - 1 = 2 , 3 - 2 = 1 #### 1",
        "2 + 1 = 3 , 3 - 1 = 2 , 3 - 2 = 1 #### 1",
        "3 - 1 = 2 , 1 + 2 = 3 , 3 - 2 = 1 #### 1",
        "3 - 1 = 2 , 2 + 1 = 3 , 3 - 2 = 1 #### 1",
    }
    assert n_derivations(e) == 4
    assert all(verify("( 1 + 2 ) - ( 3 - 1 ) ?", f) for f in forms)
    # with the knobs at 0 there is exactly one form
    fixed = {derivation(e, rng, ArithConfig(p_swap=0.0, p_shuffle=0.0)) for _ in range(50)}
    assert fixed == {"1 + 2 = 3 , 3 - 1 = 2 , 3 - 2 = 1 #### 1"}


PROMPT = "9 - ( 3 + 4 ) + 6 ?"


@pytest.mark.parametrize(
    "response",
    [
        "3 + 4 = 7 , 9 - 7 = 2 , 2 + 6 = 8 #### 8",
        "4 + 3 = 7 , 9 - 7 = 2 , 2 + 6 = 8 #### 8",  # swapped operands of '+'
        "4 + 3 = 7 , 9 - 7 = 2 , 6 + 2 = 8 #### 8",
        "3 + 4 = 7 , 9 - 7 = 2 , 2 + 6 = 8 #### 8 <|endoftext|> <|endoftext|>",  # EOS padding ignored
        "3 + 4 = 7 , 9 - 7 = 2 , 2 + 6 = 8 #### 8<|endoftext|>garbage after eos",
        "  3 + 4 = 7 ,  9 - 7 = 2 , 2 + 6 = 8   ####   8 ",  # whitespace
    ],
)
def test_verifier_accepts_every_valid_form(response):
    v = verify(PROMPT, response)
    assert v.correct and v.reason == "ok" and v.answer == "8"


def test_verifier_accepts_any_order_of_independent_steps():
    prompt = "( 1 + 2 ) - ( 3 - 1 ) ?"
    assert verify(prompt, "1 + 2 = 3 , 3 - 1 = 2 , 3 - 2 = 1 #### 1")
    assert verify(prompt, "3 - 1 = 2 , 2 + 1 = 3 , 3 - 2 = 1 #### 1")


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ("3 + 4 = 7 , 9 - 7 = 2 , 2 + 6 = 9 #### 9", "step 3 is false"),
        ("3 + 4 = 7 , 9 - 7 = 2 , 2 + 6 = 8 #### 9", "final answer 9 but the steps give 8"),
        ("3 + 4 = 7 , 9 - 7 = 2 #### 8", "2 steps for 3 operations"),
        ("3 + 4 = 7 , 9 - 7 = 2 , 2 + 6 = 8 , 1 + 1 = 2 #### 8", "4 steps for 3 operations"),
        ("9 - 3 = 6 , 6 + 4 = 10 , 10 - 2 = 8 #### 8", "step 1 does not reduce"),  # wrong bracketing
        ("3 + 4 = 7 , 7 - 9 = -2 , 2 + 6 = 8 #### 8", "step 2 does not reduce"),  # '-' operands swapped
        ("9 - 7 = 2 , 3 + 4 = 7 , 2 + 6 = 8 #### 8", "step 1 does not reduce"),  # 7 not computed yet
        ("3 + 4 = 7 , 9 - 7 = 2 , 2 + 6 = 8", "no final answer"),
        ("3 + 4 = 7 , 9 - 7 = 2 , 2 + 6 = 8 ####", "nothing after"),
        ("3 + 4 = 7 , 9 - 7 = 2 , 2 + 6 = 8 #### 8 8", "trailing text"),
        ("3 + 4 = 7 , 9 - 7 = 2 2 + 6 = 8 #### 8", "is not an equation"),
        ("3 + 4 = 7 , , 2 + 6 = 8 #### 8", "is not an equation"),
        ("3 + 4 = 7 , 9 - 7 = 2 , 2 + <|mdm_mask|> = 8 #### 8", "no final answer"),  # cut at the first special token
        ("", "no final answer"),
    ],
)
def test_verifier_rejects_wrong_answers_with_a_reason(response, reason):
    v = verify(PROMPT, response)
    assert not v.correct
    assert reason in v.reason, v.reason


def test_verifier_backtracks_over_identical_subexpressions():
    # Both brackets are '1 + 2'; reducing either first must be accepted.
    prompt = "( 1 + 2 ) - ( 1 + 2 ) + 5 ?"
    assert verify(prompt, "1 + 2 = 3 , 2 + 1 = 3 , 3 - 3 = 0 , 0 + 5 = 5 #### 5")
    assert parse(prompt) == ("+", ("-", ("+", 1, 2), ("+", 1, 2)), 5)


def test_verifier_rejects_a_bad_prompt():
    v = verify("hello ?", "#### 1")
    assert not v.correct and "prompt" in v.reason


def test_extract_answer():
    assert arith.extract_answer("1 + 1 = 2 #### 2 <|endoftext|>") == "2"
    assert arith.extract_answer("1 + 1 = 2") is None


def test_config_validation():
    with pytest.raises(ValueError):
        ArithConfig(min_leaves=1)
    with pytest.raises(ValueError):
        ArithConfig(p_swap=1.5)
    with pytest.raises(ValueError):
        generate("dev", 3)
