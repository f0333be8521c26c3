"""DMax's soft parallel decoding through ``fewstep.generate`` against dInfer's ``decode_uniform`` (``oracles_dmax.json``, ``spd``).

Every recorded case of every fixture directory that has the file runs (``FEWSTEP_FIXTURES``), with the prompt,
threshold, block length, special ids, cache and early-stop setting read from the case. Each is decoded by
:class:`~fewstep.decoding.policies.SoftParallelPolicy` with dInfer's loop quirks (the argmax may be the mask
id; a prompt shorter than a block still costs a prefill forward; the early stop keeps the finished block whole)
and ``gen_length`` = the length dInfer decodes (``generated_ids``: it rounds the answer up to the last block's end).

The fixtures README's comparison rule: the tiny model's predictions at decoded positions are close to arbitrary,
so only the cases of ``robustness_probe.robust_cases`` are compared **exactly** at the end (canvas, NFE, decode
steps, revision events, committed tokens changed by revision); every case is compared exactly **up to its
``stable_through_call``**: per call the block, the commits and the revisions (each ``[call, position, old,
new]``), every decode step up to that call, and the min max-probability over the active set of the forwards
that run token ids (atol 1e-4). ``soft_embedding_probe``: the exact ``inputs_embeds`` of the recorded call
(atol 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fewstep
from fewstep.decoding.policies import SoftParallelPolicy
from tests.parity.fixtures import dmax_oracles, fixture_dirs, model, params

ATOL = 1e-4


def _case_items(d):
    for case in ((dmax_oracles(d) or {}).get("spd") or {}).get("sampler_cases", []):
        yield case["id"], case


CASES = params(_case_items)


class _Recorder(SoftParallelPolicy):
    """The policy, recording per step the min max-probability over the block's active set (the oracle's
    ``call_trace`` column): the probabilities the rule reads, recomputed from the same logits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_prob: list[float] = []
        self.hard: list[bool] = []

    def select(self, logits, state):
        p = torch.softmax(logits.float(), -1).amax(-1)
        active = state.memory["active"]
        self.min_prob.append(float(p[active].min()) if bool(active.any()) else float("nan"))
        self.hard.append(bool(state.step[0] == 0))  # the block's first forward runs token ids
        return super().select(logits, state)


def _generate(d, case: dict, policy: SoftParallelPolicy, **kw):
    a = case["args"]
    prompt = dmax_oracles(d)["prompts"][case["prompt"]]
    return fewstep.generate(
        model(d),
        [prompt],
        policy,
        gen_length=len(case["generated_ids"]),
        block_length=a["block_length"],
        cache=a["cache"],
        mask_id=a["mask_id"],
        eos_ids=(a["eos_id"],),
        early_stop=a["early_stop"],
        quirk_mask_prediction=True,
        quirk_prefill_short_prompt=True,
        quirk_early_stop_keeps_block=True,
        **kw,
    )


def _policy(case: dict, cls=SoftParallelPolicy) -> SoftParallelPolicy:
    a = case["args"]
    return cls(threshold=a["threshold"], temperature=float(a["temperature"]))


def _replay(out, mask_id: int) -> tuple[list[tuple[int, int, int]], list[list[int]]]:
    """Per model call (1-based, the prefill included): ``(call, commits, revisions)``, and every revision
    event ``[call, answer position, old token, new token]``, replayed from the trace."""
    canvas = [mask_id] * out.answers.shape[1]
    calls, events = [], []
    for call, step in enumerate(out.trace, start=1):
        assert step["rows"] == [0]
        pos, tok, rev = step["positions"][0], step["tokens"][0], set(step["revised"][0])
        for p, t in zip(pos, tok):
            if p in rev:
                events.append([call, p, canvas[p], t])
            canvas[p] = t
        calls.append((call, len(pos) - len(rev), len(rev)))
    return calls, events


@pytest.mark.parametrize(("fixture_dir", "case"), CASES)
def test_spd_case(fixture_dir, case):
    """Every case up to its stable call; the robust ones exactly to the end."""
    oracle = dmax_oracles(fixture_dir)
    robust = case["id"] in oracle["spd"]["robustness_probe"]["robust_cases"]
    policy = _policy(case, _Recorder)
    out = _generate(fixture_dir, case, policy, trace=True)
    stable, mask_id = case["stable_through_call"], case["args"]["mask_id"]
    P, B = len(oracle["prompts"][case["prompt"]]), case["args"]["block_length"]

    # the trajectory up to the stable call: commits, revisions and min max-prob per call; the decode steps
    calls, events = _replay(out, mask_id)
    assert len(calls) == int(out.nfe[0])
    prefill = len(calls) - len(policy.min_prob)  # the forwards without a policy step come first
    assert prefill == case["prefill_calls"]
    got_trace = {c: (n, r) for c, n, r in calls}
    # the min max-prob of the forwards that run token ids (each block's first); a soft forward's input carries
    # the previous forward's probabilities, so float rounding compounds there (the discrete trajectory and
    # the soft embedding probe check those forwards)
    probs = {prefill + i + 1: p for i, (p, h) in enumerate(zip(policy.min_prob, policy.hard)) if h}
    for call, start, commits, revisions, min_prob in case["call_trace"]:
        if call > stable:
            break
        assert got_trace[call] == (commits, revisions), f"call {call}"
        assert (out.trace[call - 1]["block"] + P // B) * B == start, f"call {call}: block start"
        if call in probs:
            assert probs[call] == pytest.approx(min_prob, abs=ATOL), f"call {call}: min max-prob"
    want_events = [e for e in events if e[0] <= stable][: len(case["revisions_through_stable_call_first_40"])]
    assert want_events == case["revisions_through_stable_call_first_40"]
    ours = out.decode_step[0].tolist()
    theirs = [0 if s is None else s for s in case["decode_step"]]
    early = [i for i, s in enumerate(theirs) if 0 < s <= stable]
    assert [ours[i] for i in early] == [theirs[i] for i in early]
    assert {i for i, s in enumerate(ours) if 0 < s <= stable} == set(early)

    if robust:  # the end of the run, exactly
        assert out.sequences[0].tolist() == case["canvas"]
        assert out.answers[0].tolist() == case["generated_ids"]
        assert int(out.nfe[0]) == case["nfe"] == case["model_calls"]
        assert ours == theirs
        assert int(out.revisions[0]) == case["revision_events"]
        assert int(out.revised[0]) == case["committed_tokens_changed_by_revision"]
        assert bool(out.finished_early[0]) == (case["early_stop_after_block"] is not None)


def test_every_case_is_collected():
    """No case is skipped or missing: the parametrisation holds exactly the file's cases, robust ones included."""
    want = 0
    for d in fixture_dirs():
        spd = ((dmax_oracles(d) or {}).get("spd")) or {}
        cases = spd.get("sampler_cases", [])
        if not cases:
            continue
        ids = [c["id"] for c in cases]
        assert len(ids) == len(set(ids)) == spd["stats"]["cases"]
        assert set(spd["robustness_probe"]["robust_cases"]) <= set(ids)
        assert len(spd["robustness_probe"]["robust_cases"]) == spd["stats"]["robust_cases"]
        want += len(ids)
    assert len(CASES) == want


def _probe_items(d):
    spd = ((dmax_oracles(d) or {}).get("spd")) or {}
    if "soft_embedding_probe" in spd:
        yield "soft_embedding_probe", spd["soft_embedding_probe"]


@pytest.mark.parametrize(("fixture_dir", "probe"), params(_probe_items))
def test_soft_embedding_probe(fixture_dir, probe):
    """The exact ``inputs_embeds`` the engine hands the model at the recorded call (the block's rows)."""
    case = next(c for c in dmax_oracles(fixture_dir)["spd"]["sampler_cases"] if c["id"] == probe["case_id"])
    m = model(fixture_dir)
    seen: dict[int, torch.Tensor | None] = {}

    def hook(_module, args, kwargs):
        seen[len(seen) + 1] = kwargs.get("inputs_embeds")

    handle = m.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _generate(fixture_dir, case, _policy(case))
    finally:
        handle.remove()
    mask = torch.tensor([case["args"]["mask_id"]])
    assert float(m.embed(mask).norm()) == pytest.approx(probe["mask_embedding_norm"], abs=ATOL)
    for call, rows in probe["embeds"].items():
        got = seen[int(call)]
        assert got is not None, f"call {call} ran on token ids"
        np.testing.assert_allclose(got[0].numpy(), np.array(rows), atol=ATOL, rtol=0)
    for call, norms in probe["row_norms"].items():
        got = seen[int(call)]
        np.testing.assert_allclose(got[0].norm(dim=-1).numpy(), np.array(norms), atol=ATOL, rtol=0)
