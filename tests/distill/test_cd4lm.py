"""Numeric properties of CD4LM's nested masker, collator, clamped losses, guards and λ schedule."""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from fewstep.distill.cd4lm import (
    IGNORE,
    PAPER_MAX_LENGTH,
    CD4LMObjective,
    CD4LMRecipe,
    collate_nested,
    consistency_kl,
    consistency_loss,
    lambda_cosine_schedule,
    mask_ratios,
    nested_mask_counts,
    nested_masks,
    reconstruction_ce,
    visible_token_targets,
)
from fewstep.train.objective import SpecialIds

MASK, PAD = 50, 49


# -- masker ---------------------------------------------------------------------------------------------


def test_mask_ratios_ranges():
    rng = random.Random(0)
    for _ in range(2000):
        r_s, r_t = mask_ratios(rng)
        assert 0.40 <= r_s <= 0.90 and 0.10 <= r_t <= 0.60


def test_counts_follow_the_short_answer_rules():
    assert nested_mask_counts(0, 0.8, 0.4) == (0, 0)
    assert nested_mask_counts(1, 0.8, 0.4) == (1, 1)  # 2 / 1 capped by L
    for L in range(2, 11):
        assert nested_mask_counts(L, 0.9, 0.6) == (2, 1)
    assert nested_mask_counts(15, 0.9, 0.3) == (7, 4)  # L < 20: r_S capped at 0.5, r_T kept
    assert nested_mask_counts(19, 0.9, 0.6) == (9, 9)  # n_T <= n_S
    assert nested_mask_counts(40, 0.40, 0.10) == (16, 4)
    assert nested_mask_counts(100, 0.0, 0.0) == (10, 0)  # minimum max(2, ceil(0.1 L))
    rng = random.Random(1)
    for _ in range(2000):
        L = rng.randint(1, 300)
        r_s, r_t = mask_ratios(rng)
        n_s, n_t = nested_mask_counts(L, r_s, r_t)
        assert 0 <= n_t <= n_s <= L
        if L > 10:
            assert n_s >= max(2, math.ceil(0.1 * L))


@pytest.mark.parametrize("seed", range(20))
def test_teacher_masks_are_a_subset_of_the_student_masks(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    length, cond = rng.randint(5, 80), rng.randint(0, 30)
    r_s, r_t = mask_ratios(rng)
    student, teacher = nested_masks(length, cond, r_s, r_t, g)
    assert not bool((teacher & ~student).any())
    assert not bool(student[:cond].any()), "the question is never masked"
    n_s, n_t = nested_mask_counts(max(length - cond, 0), r_s, r_t)
    assert int(student.sum()) == n_s and int(teacher.sum()) == n_t


def test_collator_labels_inputs_and_random_order():
    seqs = [[1, 2, 3, 10, 11, PAD, 12, 13, 14, 15, 16, 17], [4, 5, 20, 21, 22]]
    rng = random.Random(3)
    b = collate_nested(seqs, [3, 2], mask_id=MASK, pad_id=PAD, rng=rng, generator=torch.Generator().manual_seed(3))
    # Exactly two uniform draws per example.
    replay = random.Random(3)
    for _ in range(4):
        replay.random()
    assert rng.getstate() == replay.getstate()
    x_s, x_t, labels = b["input_ids"], b["teacher_consistency_input_ids"], b["labels"]
    assert x_s.shape == (2, 12) and b["answer_start_indices"].tolist() == [3, 2] and b["lengths"].tolist() == [12, 5]
    student, teacher = x_s == MASK, x_t == MASK
    assert not bool((teacher & ~student).any())
    x0 = torch.full((2, 12), PAD)
    x0[0], x0[1, :5] = torch.tensor(seqs[0]), torch.tensor(seqs[1])
    assert torch.equal(torch.where(student, x0, x_s), x0) and torch.equal(torch.where(teacher, x0, x_t), x0)
    want = torch.where(student & (x0 != PAD), x0, torch.full_like(x0, IGNORE))
    want[0, :3], want[1, :2] = IGNORE, IGNORE
    assert torch.equal(labels, want), "labels: x0 on student masks, -100 on the question and pad-id tokens"
    assert torch.equal(b["attention_mask"], (x_s != PAD).long())
    # train_on_pad_id keeps an in-answer pad-id token when it is student-masked; padding stays ignored.
    for seed in range(40):
        b2 = collate_nested(
            seqs, [3, 2], mask_id=MASK, pad_id=PAD, rng=random.Random(seed),
            generator=torch.Generator().manual_seed(seed), train_on_pad_id=True,
        )  # fmt: skip
        if bool(b2["input_ids"][0, 5] == MASK):
            assert int(b2["labels"][0, 5]) == PAD
            assert bool((b2["labels"][1, 5:] == IGNORE).all())
            return
    pytest.fail("no seed masked the in-answer pad-id token")


# -- losses ---------------------------------------------------------------------------------------------


def _logits(seed: int, b: int = 2, length: int = 9, vocab: int = 12, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, length, vocab, generator=g) * scale
    t = torch.randn(b, length, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, (b, length), generator=g)
    labels[torch.rand(b, length, generator=g) < 0.4] = IGNORE
    return s, t, labels


@pytest.mark.parametrize("seed", range(5))
def test_kl_is_t2_scaled_batchmean_and_non_negative(seed):
    s, t, labels = _logits(seed)
    T = 2.0
    got = consistency_kl(s, t, labels, T)
    active = labels != IGNORE
    p = F.softmax(t[active] / T, -1)
    manual = (p * (p.log() - F.log_softmax(s[active] / T, -1))).sum(-1).mean() * T * T
    assert float(got) == pytest.approx(float(manual), rel=1e-5)
    assert float(got) >= 0.0
    assert float(consistency_kl(t, t, labels, T)) == pytest.approx(0.0, abs=1e-6)
    assert float(reconstruction_ce(s, labels)) == pytest.approx(float(F.cross_entropy(s[active], labels[active])))


def test_clamps_give_zero_gradient_above_five_and_expose_both_values():
    s, t, labels = _logits(0, scale=30.0)  # very different distributions: both terms above 5
    s.requires_grad_(True)
    out = consistency_loss(s, t, labels, lam=0.9, temperature=2.0)
    assert float(out.consistency_unclamped) > 5 and float(out.reconstruction_unclamped) > 5
    assert float(out.consistency.detach()) == 5.0 and float(out.reconstruction.detach()) == 5.0
    assert float(out.total.detach()) == pytest.approx(5.0)
    (grad,) = torch.autograd.grad(out.total, s)
    assert float(grad.abs().sum()) == 0.0
    # Unclamped (clamp_max=None) the same inputs do have a gradient.
    free = consistency_loss(s, t, labels, lam=0.9, temperature=2.0, clamp_max=None)
    (grad,) = torch.autograd.grad(free.total, s)
    assert float(grad.abs().sum()) > 0.0
    # Below the clamp the clamped and unclamped values agree and the gradient flows.
    s2, t2, _ = _logits(1, scale=0.5)
    s2.requires_grad_(True)
    small = consistency_loss(s2, t2, labels, lam=0.5)
    assert float(small.consistency.detach()) == pytest.approx(float(small.consistency_unclamped))
    (grad,) = torch.autograd.grad(small.total, s2)
    assert float(grad.abs().sum()) > 0.0


def test_nan_guards_return_a_zero_loss_with_zero_gradient():
    s, t, labels = _logits(2)
    s = s.clone()
    s[0, 0, 0] = float("nan")
    s.requires_grad_(True)
    out = consistency_loss(s, t, labels, lam=0.9)
    assert out.skipped and float(out.total.detach()) == 0.0
    (grad,) = torch.autograd.grad(out.total, s)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) == 0.0
    # No label at all: the CE is NaN, guard 2 fires, components are reported as 0.
    s2, t2, _ = _logits(3)
    s2.requires_grad_(True)
    empty = torch.full(s2.shape[:2], IGNORE)
    out = consistency_loss(s2, t2, empty, lam=0.9)
    assert out.skipped and float(out.total.detach()) == 0.0 and float(out.consistency) == 0.0
    assert math.isnan(float(out.reconstruction_unclamped))
    out.total.backward()
    assert float(s2.grad.abs().sum()) == 0.0


def test_lambda_schedule_shape():
    assert lambda_cosine_schedule(0, 100) == 0.9
    assert lambda_cosine_schedule(9, 100) == 0.9  # flat during the warm-up
    assert lambda_cosine_schedule(55, 100) == pytest.approx(0.7)
    assert lambda_cosine_schedule(100, 100) == pytest.approx(0.5)
    values = [lambda_cosine_schedule(s, 1000) for s in range(1001)]
    assert all(b <= a for a, b in itertools.pairwise(values))
    up = [lambda_cosine_schedule(s, 50, 0.2, 0.0, 0.5) for s in range(51)]
    assert up[0] == 0.0 and up[-1] == pytest.approx(0.5) and all(b >= a for a, b in itertools.pairwise(up))
    with pytest.raises(ValueError):
        lambda_cosine_schedule(0, 0)


# -- objective ------------------------------------------------------------------------------------------


def _objective(model, gen_length=None, **recipe):
    c = model.config
    ids = SpecialIds(mask=c.mask_token_id, eos=c.eos_token_id, pad=c.pad_token_id)
    return CD4LMObjective(ids, PAPER_MAX_LENGTH, CD4LMRecipe(**recipe), gen_length=gen_length)


def _examples():
    return [
        {"prompt_ids": [5, 6, 7, 8, 9, 10], "response_ids": [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]},
        {"prompt_ids": [30, 31, 32], "response_ids": [40, 41, 42, 43, 44, 45, 46]},
    ]


def test_objective_needs_a_teacher_and_follows_the_schedule(tiny_llada):
    obj = _objective(tiny_llada)
    assert obj.needs_teacher
    batch = obj.collate(_examples(), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        obj.loss(tiny_llada, batch)
    with torch.no_grad():
        _, early = obj.loss(tiny_llada, batch, step=0, max_steps=100, teacher=tiny_llada)
        _, late = obj.loss(tiny_llada, batch, step=100, max_steps=100, teacher=tiny_llada)
    assert early["lambda"] == 0.9 and late["lambda"] == pytest.approx(0.5)
    assert early["consistency"] == pytest.approx(late["consistency"])
    assert _objective(tiny_llada, lam=0.3).current_lambda(50, 100) == 0.3


def test_mask_padding_masks_only_padding(tiny_llada):
    obj = _objective(tiny_llada, mask_padding=True)
    plain = _objective(tiny_llada)
    one = obj.collate(_examples()[:1], torch.Generator().manual_seed(1))  # no padding in a batch of one
    with torch.no_grad():
        a, _ = obj.loss(tiny_llada, one, teacher=tiny_llada)
        b, _ = plain.loss(tiny_llada, one, teacher=tiny_llada)
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_loss_decreases_on_the_fixture_model(tiny_llada):
    teacher = tiny_llada
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    obj = _objective(teacher, lam=0.9)
    batch = obj.collate(_examples() * 2, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for step in range(6):
        loss, _ = obj.loss(student, batch, step=step, max_steps=6, teacher=teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert not any(p.grad is not None for p in teacher.parameters()), "the teacher stays frozen"


def test_eos_pad_gives_the_llada_sft_canvas(tiny_llada):
    """``eos_pad`` with ``gen_length=G``: every answer is EOS-padded to G tokens, the EOS tail is masked and trained on
    like any answer token, the prompt never; without it the canvas is the raw text (the reference)."""
    c = tiny_llada.config
    obj = _objective(tiny_llada, eos_pad=True, gen_length=16)
    batch = obj.collate(_examples(), torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape == (2, 6 + 16)
    assert batch["lengths"].tolist() == [6 + 16, 3 + 16]
    for row, (ex, n) in enumerate(zip(_examples(), batch["lengths"].tolist())):
        p = len(ex["prompt_ids"])
        clean = batch["teacher_consistency_input_ids"][row, :n].clone()
        student = batch["input_ids"][row, :n]
        labels = batch["labels"][row, :n]
        assert (labels[:p] == IGNORE).all()
        # where the student sees a mask, the label is the clean token, EOS included
        masked = student == c.mask_token_id
        assert (labels[masked] != IGNORE).all() and (labels[~masked] == IGNORE).all()
        expected = torch.tensor(
            [*ex["prompt_ids"], *ex["response_ids"]] + [c.eos_token_id] * (16 - len(ex["response_ids"]))
        )
        visible = clean != c.mask_token_id
        assert torch.equal(clean[visible], expected[visible])
        assert torch.equal(labels[masked], expected[masked])
    raw = _objective(tiny_llada).collate(_examples(), torch.Generator().manual_seed(0))
    assert raw["lengths"].tolist() == [18, 10]
    with pytest.raises(ValueError):
        _objective(tiny_llada, eos_pad=True, gen_length=0)


def test_visible_token_targets_replace_only_what_the_teacher_sees():
    """On student-only masks the teacher target becomes the visible token; elsewhere it is untouched.
    The KL there is then T² times the student's cross-entropy at temperature T. (Logits are aligned:
    Dream's shift is applied once, by ``Objective.logits``, before any loss sees them.)"""
    g = torch.Generator().manual_seed(0)
    z_t, z_s = torch.randn(2, 7, 11, generator=g), torch.randn(2, 7, 11, generator=g)
    x0 = torch.randint(0, MASK, (2, 7), generator=g) % 11
    student = torch.tensor([[0, 0, 1, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    teacher = torch.tensor([[0, 0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    labels = torch.where(student, x0, torch.full_like(x0, IGNORE))
    x_t = x0.masked_fill(teacher, MASK)
    out = visible_token_targets(z_t, x_t, labels, MASK)
    only_student = student & ~teacher
    for b, i in itertools.product(range(2), range(7)):
        if only_student[b, i]:
            assert int(out[b, i].argmax()) == int(x0[b, i]) and float(out[b, i].softmax(-1).max()) == 1.0
    assert torch.equal(out[~only_student], z_t[~only_student])
    t = 2.0
    kl = consistency_kl(z_s[:1, 3:4], out[:1, 3:4], labels[:1, 3:4], temperature=t)
    ce = F.cross_entropy(z_s[0, 3:4] / t, x0[0, 3:4])
    assert float(kl) == pytest.approx(t * t * float(ce), rel=1e-5)
