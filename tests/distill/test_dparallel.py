"""Numeric properties of dParallel's masker, certainty-forcing loss and objective."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from fewstep.distill.dparallel import (
    DParallelObjective,
    DParallelRecipe,
    active_span,
    certainty_forcing_entropy,
    certainty_forcing_loss,
    complementary_masks,
    entropy,
    masked_cross_entropy,
)
from fewstep.train.objective import SpecialIds, align_logits

MASK, EOS = 50, 49


def _batch(seed: int, b: int = 5, length: int = 40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (b, length), generator=g)
    prompts = [int(p) for p in torch.randint(1, length + 3, (b,), generator=g)]  # some rows have no response
    prompts[0] = 3
    return ids, prompts


@pytest.mark.parametrize("block_size", [4, 8, 7, None])
@pytest.mark.parametrize("seed", range(6))
def test_intended_masker_per_row(seed, block_size):
    ids, prompts = _batch(seed)
    length = ids.shape[1]
    views = complementary_masks(
        ids,
        prompts,
        mask_id=MASK,
        rng=random.Random(seed),
        generator=torch.Generator().manual_seed(seed),
        block_size=block_size,
    )
    spans = random.Random(seed)  # randint is the only Python draw: replay the spans row by row
    for i, p in enumerate(prompts):
        span = active_span(p, length, block_size, spans)
        m, r = views.mask[i], views.mask_rev[i]
        assert not bool((m & r).any()), "the two views overlap"
        if span is None:
            assert not bool((m | r).any())
            assert torch.equal(views.noisy[i], ids[i]) and torch.equal(views.noisy_rev[i], ids[i])
            continue
        a, e = span
        assert p <= a <= e <= length
        if block_size is None:
            assert (a, e) == (p, length)
        else:
            assert (a - p) % block_size == 0
            assert e - a == block_size or e == length
        inside = torch.zeros(length, dtype=torch.bool)
        inside[a:e] = True
        assert torch.equal(m | r, inside), "the complementary views must partition the block"
        for noisy, sel in ((views.noisy[i], m), (views.noisy_rev[i], r)):
            assert torch.equal(noisy[:a], ids[i, :a]), "earlier blocks and the prompt stay clean"
            assert bool((noisy[e:] == MASK).all()), "later blocks are fully masked"
            assert torch.equal(noisy[a:e], torch.where(sel[a:e], MASK, ids[i, a:e]))


def test_empty_tail_masks_nothing_in_the_loss():
    ids = torch.arange(20).unsqueeze(0)  # P = 4, R = 16, block 8: k = 2 is the empty tail
    for seed in range(50):
        rng = random.Random(seed)
        if active_span(4, 20, 8, random.Random(seed)) != (20, 20):
            continue
        v = complementary_masks(ids, [4], mask_id=MASK, rng=rng, block_size=8)
        assert not bool(v.mask.any() or v.mask_rev.any())
        assert torch.equal(v.noisy, ids)
        return
    pytest.fail("no seed drew the empty tail")


@pytest.mark.parametrize("seed", range(5))
def test_batch_of_one_reference_equals_intended(seed):
    ids, prompts = _batch(seed, b=1)
    kw = {"mask_id": MASK, "block_size": 8}
    a = complementary_masks(ids, prompts, rng=random.Random(seed), generator=torch.Generator().manual_seed(seed), **kw)
    b = complementary_masks(
        ids, prompts, rng=random.Random(seed), generator=torch.Generator().manual_seed(seed), reference=True, **kw
    )
    for x, y in zip((a.noisy, a.noisy_rev, a.mask, a.mask_rev), (b.noisy, b.noisy_rev, b.mask, b.mask_rev)):
        assert torch.equal(x, y)


def test_reference_mode_reproduces_the_batch_quirks():
    ids = torch.randint(0, 40, (3, 48), generator=torch.Generator().manual_seed(0))
    view = 99
    v = complementary_masks(
        ids,
        [10, 14, 12],
        mask_id=MASK,
        rng=random.Random(1),
        generator=torch.Generator().manual_seed(1),
        block_size=8,
        reference=True,
        view_mask_id=view,
    )
    # Only the last row keeps its future masking; elsewhere the span masks carry the view id.
    assert not bool((v.noisy[:2] == MASK).any()) and bool((v.noisy[2] == MASK).any())
    assert bool((v.noisy[:2][v.mask[:2]] == view).all())
    # Spans are shared across rows: every row's masked columns are a union of the same spans.
    assert torch.equal(v.mask.any(0) | v.mask_rev.any(0), (v.mask | v.mask_rev).all(0))


def test_dream_masking_uses_no_block_draw():
    rng = random.Random(5)
    state = rng.getstate()
    ids = torch.arange(30).view(2, 15)
    v = complementary_masks(ids, [4, 9], mask_id=MASK, rng=rng, block_size=None)
    assert rng.getstate() == state
    assert torch.equal(v.mask[0, 4:] | v.mask_rev[0, 4:], torch.ones(11, dtype=torch.bool))
    assert not bool((v.mask | v.mask_rev)[0, :4].any())


# -- losses ---------------------------------------------------------------------------------------------


def _random_loss_inputs(seed: int, b: int = 3, length: int = 12, vocab: int = 16):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (b, length), generator=g)
    mask = torch.rand(b, length, generator=g) < 0.5
    return logits, labels, mask


@pytest.mark.parametrize("seed", range(5))
def test_losses_non_negative_and_per_view_normalised(seed):
    logits, labels, mask = _random_loss_inputs(seed)
    logits_rev = logits.flip(1)
    out = certainty_forcing_loss(logits, logits_rev, labels, mask, ~mask, temperature=0.5, entropy_weight=2.0)
    for t in (out.total, out.ce, out.ce_rev, out.entropy, out.entropy_rev):
        assert float(t) >= 0.0
    assert float(out.ce) == pytest.approx(float(F.cross_entropy(logits[mask], labels[mask])), rel=1e-6)
    assert float(out.ce_rev) == pytest.approx(float(F.cross_entropy(logits_rev[~mask], labels[~mask])), rel=1e-6)
    want = out.ce + out.ce_rev + 2.0 * (out.entropy + out.entropy_rev)
    assert float(out.total) == pytest.approx(float(want), rel=1e-6)


def test_entropy_term_only_over_correct_positions():
    logits, labels, mask = _random_loss_inputs(7, b=2, length=10)
    mask[:] = False
    mask[0, :6] = True
    labels[0, :3] = logits[0, :3].argmax(-1)  # three correct masked positions
    labels[0, 3:6] = (logits[0, 3:6].argmax(-1) + 1) % logits.shape[-1]  # three wrong ones
    labels[1] = logits[1].argmax(-1)  # correct but not masked
    logits.requires_grad_(True)
    ent, n = certainty_forcing_entropy(logits, labels, mask, temperature=0.5)
    assert n == 3
    assert float(ent.detach()) == pytest.approx(float(entropy(logits[0, :3].detach(), 0.5).mean()), rel=1e-6)
    (grad,) = torch.autograd.grad(ent, logits)
    assert bool(grad[0, :3].abs().sum(-1).gt(0).all())
    assert float(grad[0, 3:].abs().sum()) == 0.0 and float(grad[1].abs().sum()) == 0.0


def test_empty_sets_give_zero_with_a_graph():
    logits, labels, _ = _random_loss_inputs(1)
    logits.requires_grad_(True)
    none = torch.zeros(labels.shape, dtype=torch.bool)
    assert float(masked_cross_entropy(logits, labels, none).detach()) == 0.0
    wrong = (logits.argmax(-1) + 1) % logits.shape[-1]
    ent, n = certainty_forcing_entropy(logits, wrong, torch.ones_like(none), 0.5)
    assert n == 0 and float(ent.detach()) == 0.0
    out = certainty_forcing_loss(logits, logits, labels, none, none)
    out.total.backward()
    assert float(out.total.detach()) == 0.0 and float(logits.grad.abs().sum()) == 0.0


def test_dream_shift_aligns_logit_i_minus_1_with_token_i():
    """The one alignment seam: Dream's row i-1 predicts token i; the loss on aligned logits equals the
    loss on the raw logits with the last row and the first label dropped (position 0 is prompt)."""
    logits, labels, mask = _random_loss_inputs(3)
    mask[:, 0] = False
    aligned = align_logits(logits, 1)
    assert torch.equal(aligned[:, 1:], logits[:, :-1]) and torch.equal(aligned[:, 0], logits[:, 0])
    shifted = certainty_forcing_loss(
        aligned, aligned, labels, mask, ~mask & (torch.arange(mask.shape[1]) > 0), entropy_weight=1.0
    )
    manual = certainty_forcing_loss(
        logits[:, :-1], logits[:, :-1], labels[:, 1:], mask[:, 1:], ~mask[:, 1:], entropy_weight=1.0
    )
    assert float(shifted.total) == pytest.approx(float(manual.total), rel=1e-6)
    assert shifted.num_correct == manual.num_correct
    with pytest.raises(ValueError, match="shift"):
        align_logits(logits, 2)


# -- objective ------------------------------------------------------------------------------------------


def test_collate_pads_with_eos_to_a_fixed_length_and_is_reproducible():
    obj = DParallelObjective(SpecialIds(mask=MASK, eos=EOS, pad=EOS), 16, DParallelRecipe(block_size=4))
    examples = [
        {"prompt_ids": [1, 2, 3], "response_ids": [4, 5, 6, 7]},
        {"prompt_ids": [1] * 5, "response_ids": list(range(20))},  # truncated
    ]
    a = obj.collate(examples, torch.Generator().manual_seed(0))
    b = obj.collate(examples, torch.Generator().manual_seed(0))
    assert a["input_ids"].shape == (2, 16)
    assert a["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 6, 7] + [EOS] * 9
    assert a["input_ids"][1].tolist() == [1] * 5 + list(range(11))
    assert a["prompt_lengths"].tolist() == [3, 5]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not bool((a["mask"] & a["mask_rev"]).any())


def test_loss_decreases_on_the_fixture_model(tiny_llada):
    torch.manual_seed(0)
    model = tiny_llada
    ids = SpecialIds(mask=model.config.mask_token_id, eos=model.config.eos_token_id, pad=model.config.pad_token_id)
    obj = DParallelObjective(ids, 32, DParallelRecipe(block_size=8))
    g = torch.Generator().manual_seed(0)
    examples = [{"prompt_ids": list(range(1, 9)), "response_ids": list(range(9, 25))} for _ in range(4)]
    batch = obj.collate(examples, g)
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals, ces = [], []
    for _ in range(8):
        loss, logs = obj.loss(model, batch, step=0, max_steps=8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(float(loss.detach()))
        ces.append(logs["ce"] + logs["ce_rev"])
    # The entropy term jumps when a position becomes correct (the selection is discrete), so the total
    # is not monotone; the cross-entropy is, and the total ends well below where it started.
    assert all(b < a for a, b in itertools.pairwise(ces)), ces
    assert totals[-1] < 0.85 * totals[0], totals


def test_objective_registry():
    from fewstep.distill import METHODS, objective_class

    assert objective_class("dparallel") is DParallelObjective
    assert [objective_class(m).name for m in METHODS] == list(METHODS)
    with pytest.raises(ValueError, match="unknown distillation method"):
        objective_class("nope")
