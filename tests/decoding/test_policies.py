"""Unit tests of the unmasking rules on hand-made logits (no model): each rule's accept set, its edge
cases and its documented quirk options, plus the ``name:args`` parser."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.decoding.policies import (
    POLICIES,
    CADPolicy,
    ConfidenceThresholdPolicy,
    DreamEntropyThresholdPolicy,
    DreamPolicy,
    EntropyThresholdPolicy,
    FactorPolicy,
    LowConfidencePolicy,
    base,
    parse_policy,
)
from fewstep.decoding.policies.base import RowRNG, StepState, even_quota

V = 8
MASK = V  # outside the toy vocabulary; never predicted


def logits_for(probs: list[list[float]], token: int = 3) -> torch.Tensor:
    """Logits ``[1, L, V]`` whose softmax puts ``p`` on ``token`` and spreads the rest evenly."""
    rows = []
    for p in probs[0]:
        q = torch.full((V,), (1 - p) / (V - 1), dtype=torch.float64)
        q[token] = p
        rows.append(q.log())
    return torch.stack(rows)[None].float()


def state(mask, step=0, memory=None, gen_masked=None, gen_length=None, eos=(), block_length=None) -> StepState:
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if mask.dim() == 1:
        mask = mask[None]
    R, L = mask.shape
    return StepState(
        tokens=torch.where(mask, MASK, 0),
        mask=mask,
        step=torch.full((R,), step),
        rows=torch.arange(R),
        block=0,
        num_blocks=1,
        block_length=block_length or L,
        gen_length=gen_length or L,
        gen_masked=mask.sum(-1) if gen_masked is None else torch.tensor([gen_masked] * R),
        mask_id=MASK,
        eos_ids=tuple(eos),
        rng=RowRNG(None, torch.device("cpu")),
        memory=memory or {},
    )


def test_even_quota_remainder_first():
    assert even_quota(torch.tensor([32, 8, 3]), 5).tolist() == [[7, 7, 6, 6, 6], [2, 2, 2, 1, 1], [1, 1, 1, 0, 0]]


def test_llada_quota_and_past_schedule():
    p = LowConfidencePolicy(steps=2)
    z = logits_for([[0.9, 0.5, 0.8, 0.2]])
    st = state([1, 1, 1, 1])
    mem = p.start_block(st)
    assert mem["quota"].tolist() == [[2, 2]]
    sel = p.select(z, state([1, 1, 1, 1], memory=mem))
    assert sel.commit.tolist() == [[True, False, True, False]]  # the two most confident
    assert (sel.tokens[sel.commit] == 3).all()
    # past the schedule (a committed mask prediction left a mask): everything left at once
    sel = p.select(z, state([1, 1, 1, 0], step=5, memory=mem))
    assert sel.commit.tolist() == [[True, True, True, False]]


def test_llada_eos_options():
    eos, eot = 5, 6
    z = logits_for([[0.9, 0.6, 0.8]], token=eos)
    z[0, 2] = logits_for([[0.8]], token=eot)[0, 0]
    z[0, 1] = logits_for([[0.6]], token=2)[0, 0]
    st = state([1, 1, 1], eos=(eos, eot), memory={"quota": torch.tensor([[2]])})
    plain = LowConfidencePolicy(steps=1).select(z, st)
    assert plain.commit.tolist() == [[True, False, True]] and plain.tokens[0, 0] == eos
    # logits_eos_inf: EOS can never be predicted (the second choice wins at position 0)
    no_eos = LowConfidencePolicy(steps=1, suppress_eos=True).select(z, st)
    assert no_eos.tokens[0, 0] != eos and no_eos.tokens[0, 2] == eot
    # confidence_eos_eot_inf: EOS / EOT predictions keep their token but rank last
    low = LowConfidencePolicy(steps=1, eos_low_confidence=True).select(z, st)
    # the only non-EOS prediction is now the most confident; the two EOS/EOT ones tie at 0 (left first)
    assert low.commit.tolist() == [[True, True, False]] and low.tokens[0, 0] == eos


def test_llada_steps_must_divide_blocks():
    with pytest.raises(ValueError, match=r"steps \(6\) must be divisible by the number of blocks \(4"):
        LowConfidencePolicy(steps=6).validate(32, 8)


def test_threshold_accepts_above_and_always_top1():
    p = ConfidenceThresholdPolicy(0.7)
    sel = p.select(logits_for([[0.9, 0.5, 0.75, 0.2]]), state([1, 1, 1, 1]))
    assert sel.commit.tolist() == [[True, False, True, False]]
    sel = p.select(logits_for([[0.3, 0.5, 0.4, 0.2]]), state([1, 1, 1, 1]))
    assert sel.commit.tolist() == [[False, True, False, False]]  # none passes: the best one only
    sel = p.select(logits_for([[0.99, 0.5, 0.95, 0.2]]), state([0, 1, 0, 1]))
    assert sel.commit.tolist() == [[False, True, False, False]]  # only candidates count


def test_factor_rule_and_last_rank_quirk():
    # sorted confidences 0.95, 0.9, 0.6; factor 1: n=1: 2*0.05=0.1 ok; n=2: 3*0.1=0.3 ok; n=3: 4*0.4=1.6 fails
    z = logits_for([[0.6, 0.95, 0.9]])
    assert FactorPolicy(1.0).select(z, state([1, 1, 1])).commit.tolist() == [[False, True, True]]
    # dInfer's copy: the only failure is at the last rank, so it commits all three
    quirk = FactorPolicy(1.0, quirk_last_rank=True).select(z, state([1, 1, 1]))
    assert quirk.commit.tolist() == [[True, True, True]]
    # nothing passes: still one token
    assert FactorPolicy(0.01).select(logits_for([[0.5, 0.6]]), state([1, 1])).commit.tolist() == [[False, True]]


def _entropy_of(p: float) -> float:
    rest = (1 - p) / (V - 1)
    return -(p * math.log(p) + (V - 1) * rest * math.log(rest))


def test_entropy_threshold_inclusive_vs_strict():
    z = logits_for([[0.99, 0.6, 0.9]])
    h = _entropy_of(0.9)
    # threshold exactly at a candidate's entropy (float64): dParallel-LLaDA accepts (<=), Dream rejects (<)
    h64 = base.entropy(z[0, 2:3].double(), torch.float64, 1e-12).item()
    assert abs(h64 - h) < 1e-5
    assert EntropyThresholdPolicy(h64).select(z, state([1, 1, 1])).commit.tolist() == [[True, False, True]]
    strict = EntropyThresholdPolicy(h64, strict=True).select(z, state([1, 1, 1]))
    assert strict.commit.tolist() == [[True, False, False]]
    dream = DreamEntropyThresholdPolicy(0.01).select(z, state([1, 1, 1]))
    assert dream.commit.tolist() == [[True, False, False]]  # lowest entropy always


def test_cad_min_max_and_eos_gating():
    eos = 5
    p = CADPolicy(threshold=0.8, min_tokens=1, max_tokens=2, eos_ratio=0.5, eos_ids=(eos,))
    z = logits_for([[0.95, 0.9, 0.85, 0.3]])
    sel = p.select(z, state([1, 1, 1, 1]))
    assert sel.commit.tolist() == [[True, True, False, False]]  # three above, capped at 2
    low = p.select(logits_for([[0.3, 0.4, 0.2, 0.1]]), state([1, 1, 1, 1]))
    assert low.commit.tolist() == [[False, True, False, False]]  # none above: min_tokens
    # EOS predicted everywhere except position 3: gated while progress < 0.5
    z_eos = logits_for([[0.95, 0.9, 0.85, 0.3]], token=eos)
    z_eos[0, 3] = logits_for([[0.3]], token=2)[0, 0]
    early = p.select(z_eos, state([1, 1, 1, 1], gen_masked=10, gen_length=10))
    assert early.commit.tolist() == [[False, False, False, True]]
    late = p.select(z_eos, state([1, 1, 1, 1], gen_masked=4, gen_length=10))  # 60 % generated: EOS allowed
    assert late.commit.tolist() == [[True, True, False, False]]


def test_cad_all_gated_fallback_and_forced_step():
    eos = 5
    p = CADPolicy(threshold=0.8, min_tokens=1, max_tokens=4, eos_ratio=0.5, eos_ids=(eos,))
    z = logits_for([[0.6, 0.9, 0.7]], token=eos)
    sel = p.select(z, state([1, 1, 1], gen_masked=10, gen_length=10))
    assert sel.commit.tolist() == [[False, True, False]]  # all gated: min_tokens, the most confident
    ref = CADPolicy(threshold=0.8, eos_ratio=0.5, eos_ids=(eos,), quirk_gated_fallback_topk=True)
    assert ref.select(z, state([1, 1, 1], gen_masked=10, gen_length=10)).commit.sum() == 1
    # forced step (step index == max_steps_per_block): every non-gated mask, then the block is left
    forced = CADPolicy(threshold=0.99, max_steps_per_block=2, eos_ratio=0.5, eos_ids=(eos,))
    z2 = logits_for([[0.3, 0.4, 0.2]])
    z2[0, 2] = logits_for([[0.9]], token=eos)[0, 0]
    st = state([1, 1, 1], step=2, gen_masked=10, gen_length=10)
    assert forced.select(z2, st).commit.tolist() == [[True, True, False]]
    after = state([0, 0, 1], step=3)
    assert forced.block_done(after).tolist() == [True]
    assert not forced.block_done(state([0, 0, 1], step=2)).item()


def test_cad_global_mode_is_one_block():
    assert CADPolicy(mode="global").blocks(64, 16) == 64
    assert CADPolicy().blocks(64, 16) == 16


def test_dream_schedule_counts():
    """Dream's schedule: int(masks * (1 - s/t)) on linspace(1, eps, steps+1), everything on the last step."""
    p = DreamPolicy(alg="maskgit_plus", steps=4)
    st = state([1] * 8)
    mem = p.start_block(st)
    ts = torch.linspace(1, 1e-3, 5)
    remaining, taken = 8, []
    for i in range(4):
        sel = p.select(
            logits_for([[0.9] * remaining + [0.5] * (8 - remaining)]),
            state([1] * remaining + [0] * (8 - remaining), step=i, memory=mem),
        )
        n = int(sel.commit.sum())
        expect = remaining if i == 3 else int(torch.tensor(float(remaining)) * (1 - ts[i + 1] / ts[i]))
        assert n == expect
        taken.append(n)
        remaining -= n
    assert sum(taken) == 8


def test_dream_confidence_threshold_carries_rejections():
    p = DreamPolicy(alg="confidence_threshold", steps=2, threshold=0.8)
    mem = p.start_block(state([1] * 4))  # quota 2, 2
    z = logits_for([[0.9, 0.5, 0.6, 0.7]])
    first = p.select(z, state([1, 1, 1, 1], step=0, memory=mem))
    assert first.commit.tolist() == [[True, False, False, False]]  # top-1; 0.7 < 0.8 is carried over
    # last scheduled step: all three remaining requested, only rank 0 and c >= 0.8 accepted
    last = p.select(z, state([0, 1, 1, 1], step=1, memory=mem))
    assert last.commit.tolist() == [[False, False, False, True]]


@pytest.mark.parametrize("alg", ["entropy", "topk_margin"])
def test_dream_scores_rank_confident_first(alg):
    p = DreamPolicy(alg=alg, steps=2)  # first step: int(3 * (1 - 0.5005)) = 1 token
    sel = p.select(logits_for([[0.2, 0.99, 0.5]]), state([1, 1, 1], memory=p.start_block(state([1, 1, 1]))))
    assert sel.commit.tolist() == [[False, True, False]]


def test_scores_are_computed_in_chunks(monkeypatch):
    z = torch.randn(1, 16, V)
    ref = ConfidenceThresholdPolicy(0.3).select(z, state([1] * 16))
    monkeypatch.setattr(base, "CHUNK_BYTES", {"cpu": 3 * V * 8, "default": 3 * V * 8})  # 3 rows per chunk
    got = ConfidenceThresholdPolicy(0.3).select(z, state([1] * 16))
    assert torch.equal(ref.commit, got.commit) and torch.equal(ref.tokens, got.tokens)


# -- the "name:args" parser -------------------------------------------------------------------------


def test_parse_policy_forms():
    assert parse_policy("threshold:0.8") == ConfidenceThresholdPolicy(0.8)
    assert parse_policy("llada:64") == LowConfidencePolicy(steps=64)
    assert parse_policy("dream:maskgit_plus") == DreamPolicy(alg="maskgit_plus")
    cad = parse_policy("cad:threshold=0.9,max_tokens=4,eos_ids=508/509,max_steps_per_block=none")
    assert cad == CADPolicy(threshold=0.9, max_tokens=4, eos_ids=(508, 509))
    assert parse_policy("factor:factor=2,quirk_last_rank=true") == FactorPolicy(2.0, quirk_last_rank=True)
    assert parse_policy(cad) is cad
    for name, cls in POLICIES.items():  # every registered name parses to its class with defaults
        assert parse_policy(name) == cls()
        assert parse_policy(cls().describe()) == cls()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nope", "unknown policy 'nope'; valid names: llada, threshold"),
        ("threshold:1.5", r"threshold.threshold must be in \[0.0, 1.0\]; got 1.5"),
        ("threshold:x", "threshold.threshold expects float"),
        ("cad:foo=1", "policy 'cad' has no option 'foo'"),
        ("cad:min_tokens=4,max_tokens=2", r"cad.max_tokens must be in \[4"),
        ("llada:remasking=best", "llada.remasking must be one of low_confidence, random"),
        ("dream:alg=greedy", "dream.alg must be one of entropy, maskgit_plus"),
        ("factor:0", r"factor.factor must be in \(0.0, inf\]"),
        ("entropy:-1", r"entropy.threshold must be in \[0.0, inf\]"),
        ("threshold:0.5,0.6", "expected key=value"),
    ],
)
def test_parse_policy_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_policy(spec)
