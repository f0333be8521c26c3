"""Fault isolation: an exception while serving one request ends that request only.

Each test injects one fault (a model forward that raises, a policy whose ``select`` or ``start_block``
raises, a seed the generator refuses at admission) into a round while other requests are in flight. The
faulty request ends with ``result.error`` and leaves the live set; every other request gets exactly the
tokens, NFE and decode steps it gets alone; requests submitted afterwards are served the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from fewstep.decoding import Selection
from fewstep.decoding.engine import Engine, Request
from fewstep.decoding.policies import ConfidenceThresholdPolicy, LowConfidencePolicy
from tests.decoding.test_engine import alone, assert_same, base_prompts
from tests.parity.fixtures import BLOCK_DIRS, DEFAULT_DIRS, model, oracles

LLADA = DEFAULT_DIRS[0]
LLADA2 = next(d for d in BLOCK_DIRS if d.name == "llada2-tiny-a")


class FaultyModel:
    """The real model, except that a forward whose batch holds the token ``poison`` raises."""

    def __init__(self, real, poison: int):
        self._real, self.poison, self.faults = real, poison, 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def _check(self, ids: torch.Tensor) -> None:
        if bool((ids == self.poison).any()):
            self.faults += 1
            raise RuntimeError("injected forward fault")

    def denoise(self, ids, *args, **kwargs):
        self._check(ids)
        return self._real.denoise(ids, *args, **kwargs)

    def __call__(self, ids, *args, **kwargs):
        self._check(ids)
        return self._real(ids, *args, **kwargs)


def unused_token(m, reqs: list[Request], results) -> int:
    """A token of the vocabulary that no innocent request's prompt or answer holds (nor a special id)."""
    cfg = m.config
    used = {cfg.mask_token_id, cfg.eos_token_id, getattr(cfg, "pad_token_id", None)}
    for r, res in zip(reqs, results):
        used |= set(r.prompt) | set(res.answer)
    return next(t for t in range(cfg.vocab_size) if t not in used)


def run_to_end(engine: Engine, waves: list[list[Request]]) -> dict:
    """Submit one wave of requests per round (the first before any round) and step until all are done."""
    results, waves = {}, list(waves)
    while waves or engine.has_work():
        for r in waves.pop(0) if waves else []:
            engine.submit(r)
        for u in engine.step():
            if u.done:
                assert u.id not in results, "a request got two last updates"
                results[u.id] = u.result
    return results


def innocents(d, n: int = 5) -> list[Request]:
    prompts = base_prompts(d) if d in DEFAULT_DIRS else list(oracles(d)["prompts"].values())
    specs = ["threshold:0.9", "llada:steps=16", "threshold:threshold=0.8,temperature=0.7", "entropy:0.5", "factor:1.0"]
    caches = ["none", "dual", "prefix", "none", "dual"]
    return [
        Request(
            prompts[i % len(prompts)][: 4 + i],
            policy=specs[i % len(specs)],
            gen_length=16,
            block_length=8,
            cache=caches[i % len(caches)],
            seed=100 + i if "temperature" in specs[i % len(specs)] else None,
            id=f"ok{i}",
        )
        for i in range(n)
    ]


def check_the_others(m, reqs: list[Request], results: dict) -> None:
    for r in reqs:
        assert results[r.id].error is None, results[r.id].error
        assert_same(results[r.id], alone(m, r), f"request {r.id} ({r.policy}, cache {r.cache})")


def check_served_after(engine: Engine, m, d) -> None:
    """The engine serves new requests after the fault, each exactly as alone."""
    later = [replace(r, id=f"later-{r.id}") for r in innocents(d, 3)]
    check_the_others(m, later, run_to_end(engine, [later]))
    assert not engine.has_work() and engine.running == 0


@pytest.mark.parametrize("d", [LLADA, LLADA2], ids=lambda d: d.name)
def test_a_forward_that_raises_fails_its_request_only(d):
    """The batched call that holds the poisoned row raises; the engine runs that call again row by row."""
    m = model(d)
    reqs = innocents(d)
    poison = unused_token(m, reqs, [alone(m, r) for r in reqs])
    culprit = Request([*reqs[0].prompt[:3], poison, *reqs[1].prompt[:2]], "threshold:0.9", 16, 8, id="bad")
    faulty = FaultyModel(m, poison)
    engine = Engine(faulty, max_batch=8, max_padding=float("inf"))  # every row of a kind in one call
    results = run_to_end(engine, [reqs[:3], [culprit], reqs[3:]])  # the fault comes while others decode
    assert results["bad"].error == "the model forward failed: RuntimeError: injected forward fault"
    assert results["bad"].nfe == 0 and faulty.faults >= 2  # the batched call, then the row alone
    check_the_others(m, reqs, results)
    assert engine.failed == 1
    check_served_after(engine, faulty, d)


@dataclass
class Fragile(ConfidenceThresholdPolicy):
    """The threshold rule, sampled, except that ``select`` raises once a row would commit ``trigger``.

    It draws its noise before it raises, so a batched call that fails has used the random streams of
    every row in it: the rows run again alone must draw what they draw alone."""

    name = "fragile"
    uses_block_scalars = False  # rows at every block share one select call
    trigger: int = 0

    def select(self, logits, state):
        sel = super().select(logits, state)
        if bool(((sel.tokens == self.trigger) & sel.commit & state.mask).any()):
            raise ValueError("injected policy fault")
        return sel


def test_a_select_call_that_raises_fails_the_culprit_and_keeps_the_group_exact():
    """One policy instance, one select call for every row; only the row that triggers the fault fails,
    and the seeded rows that shared the failed call keep exactly their random streams."""
    m = model(LLADA)
    prompts = base_prompts(LLADA)
    reqs = [
        Request(prompts[i % 3][: 5 + i], gen_length=16, block_length=8, cache=c, seed=10 + i, id=f"ok{i}")
        for i, c in enumerate(["none", "dual", "prefix", "none"])
    ]
    plain = ConfidenceThresholdPolicy(threshold=0.8, temperature=0.7)
    solo = [alone(m, replace(r, policy=plain)) for r in reqs]
    culprit = Request(prompts[2], gen_length=16, block_length=8, seed=7, id="bad")
    culprit_alone = alone(m, replace(culprit, policy=plain))
    trigger = next(t for t in culprit_alone.answer if not any(t in s.answer for s in solo))
    policy = Fragile(threshold=0.8, temperature=0.7, trigger=trigger)
    reqs = [replace(r, policy=policy) for r in reqs]
    culprit = replace(culprit, policy=policy)
    engine = Engine(m, max_batch=8)
    results = run_to_end(engine, [reqs[:2], [culprit, *reqs[2:]]])
    assert results["bad"].error == f"policy {policy.describe()} failed: ValueError: injected policy fault"
    assert 0 < results["bad"].nfe < culprit_alone.nfe
    for r, want in zip(reqs, solo):
        assert_same(results[r.id], want, f"request {r.id}")
    check_served_after(engine, m, LLADA)


class BrokenStart(LowConfidencePolicy):
    """LLaDA's rule, except that it cannot set up a block."""

    name = "broken-start"

    def start_block(self, state):
        raise KeyError("injected start_block fault")


def test_a_start_block_that_raises_fails_its_request_only():
    m = model(LLADA)
    reqs = innocents(LLADA)
    broken = BrokenStart(steps=16)
    culprit = Request(reqs[0].prompt, broken, 16, 8, id="bad")
    engine = Engine(m, max_batch=8)
    results = run_to_end(engine, [reqs[:2], [culprit, *reqs[2:]]])
    assert results["bad"].error == f"policy {broken.describe()} failed: KeyError: 'injected start_block fault'"
    assert results["bad"].nfe == 0
    check_the_others(m, reqs, results)
    check_served_after(engine, m, LLADA)


def test_a_seed_the_generator_refuses_fails_its_request_at_admission():
    """A seed that slipped past validation (changed after submit) ends its request when its row is built."""
    m = model(LLADA)
    reqs = innocents(LLADA)
    culprit = Request(reqs[2].prompt, "threshold:threshold=0.8,temperature=0.7", 16, 8, seed=1, id="bad")
    engine = Engine(m, max_batch=3)  # the culprit waits for a free row, then fails as it is admitted
    for r in [*reqs[:3], culprit, *reqs[3:]]:
        engine.submit(r)
    culprit.seed = 2**64
    results = run_to_end(engine, [])
    assert results["bad"].error.startswith("the request could not start: ")
    assert "Overflow" in results["bad"].error and results["bad"].nfe == 0
    assert results["bad"].answer == [m.config.mask_token_id] * 16
    check_the_others(m, reqs, results)
    check_served_after(engine, m, LLADA)


def test_a_policy_returning_a_bad_selection_fails_its_request_only():
    """A selection of the wrong shape (a bug in a policy) fails when it is committed, before any write."""

    class Misshapen(LowConfidencePolicy):
        name = "misshapen"

        def select(self, logits, state):
            sel = super().select(logits, state)
            return Selection(sel.tokens[:, :-1], sel.commit)

    m = model(LLADA)
    reqs = innocents(LLADA)
    culprit = Request(reqs[1].prompt, Misshapen(steps=16), 16, 8, id="bad")
    engine = Engine(m, max_batch=8)
    results = run_to_end(engine, [[culprit, *reqs]])
    assert results["bad"].error.startswith("policy misshapen:steps=16 failed: RuntimeError")
    assert results["bad"].nfe == 0
    check_the_others(m, reqs, results)
