"""The continuous-batching engine: every request gets exactly the tokens and NFE it gets alone.

Requests with mixed policies, prompt/answer/block lengths, cache modes, CFG and seeded sampling arrive
at random rounds (submitted between steps) into a small running set (``max_batch`` queueing); each is
compared token for token and NFE for NFE with the same request decoded alone. Plus cancellation,
``max_nfe``, FIFO admission, the update stream, per-request errors and policy grouping.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from fewstep.decoding import Policy, Selection, StepState, generate, parse_policy
from fewstep.decoding.engine import Engine, Quirks, Request, RowResult
from fewstep.models.loading import load_model, load_tokenizer
from tests.parity.fixtures import BLOCK_DIRS, DEFAULT_DIRS, model, oracles

LLADA, DREAM = DEFAULT_DIRS
SHIPPED = Path(__file__).resolve().parents[2] / "src" / "fewstep" / "assets" / "models" / "dparallel"

LLADA_POLICIES = [
    "threshold:0.9",
    "llada:steps=8",
    "entropy:0.5",
    "cad:threshold=0.9,max_tokens=4,eos_ratio=0.5",
    "factor:1.0",
    "threshold:threshold=0.8,temperature=0.7",  # sampled: needs a seed
    "llada:steps=16,remasking=random",
]
DREAM_POLICIES = ["dream:alg=confidence_threshold,steps=16", "dream:maskgit_plus", "entropy-dream:0.5", "threshold:0.9"]
SAMPLING = ("temperature", "random")


def base_prompts(d: Path) -> list[list[int]]:
    p = list(oracles(d)["prompts"].values())
    return [p[0], p[1], p[-1] + p[0]]


def random_requests(rng: random.Random, prompts, policies, n: int, cfg: bool = False) -> list[Request]:
    """``n`` requests with random prompt lengths, answer/block lengths, policies and cache modes."""
    out = []
    for i in range(n):
        p = rng.choice(prompts)
        prompt = p[: rng.randint(3, len(p))]
        gen, block = rng.choice([(8, 8), (16, 4), (16, 8), (24, 8), (32, 8), (32, 16)])
        spec = rng.choice(policies)
        try:
            parse_policy(spec).validate(gen, block)
        except ValueError:  # a fixed number of steps that does not split over these blocks
            gen, block = 16, 8
        seed = rng.randint(0, 10**6) if any(k in spec for k in SAMPLING) or rng.random() < 0.3 else None
        out.append(
            Request(
                prompt=prompt,
                policy=spec,
                gen_length=gen,
                block_length=block,
                cache=rng.choice(["none", "prefix", "dual"]),
                seed=seed,
                cfg_scale=rng.choice([0.0, 0.0, 0.5]) if cfg else 0.0,
                id=i,
            )
        )
    return out


def alone(m, req: Request, **kw) -> RowResult:
    """The request decoded by itself (a fresh engine, nothing else in the batch)."""
    return Engine(m, **kw).run([replace(req, id=None)])[0]


def assert_same(got: RowResult, want: RowResult, what: str = "") -> None:
    assert got.answer == want.answer, f"{what}: tokens differ"
    assert got.nfe == want.nfe, f"{what}: NFE differs ({got.nfe} vs {want.nfe})"
    assert got.tokens_per_step == want.tokens_per_step, what
    assert got.decode_step == want.decode_step, what


def run_with_arrivals(engine: Engine, reqs: list[Request], rng: random.Random) -> tuple[dict, dict]:
    """Submit ``reqs`` a few at a time between rounds; returns results and every request's updates."""
    queue, results, updates = list(reqs), {}, {}
    shared = 0  # rounds in which rows at different blocks or lengths shared the step
    while queue or engine.has_work():
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            if queue:
                engine.submit(queue.pop(0))
        ups = engine.step()
        fwd = [u for u in ups if u.positions or not u.done]
        shared += len({(u.block, len(u.answer)) for u in fwd}) > 1
        for u in ups:
            updates.setdefault(u.id, []).append(u)
            if u.done:
                results[u.id] = u.result
    assert shared > 0, "the test never mixed rows at different blocks/lengths in one round"
    return results, updates


@pytest.mark.parametrize(("seed", "max_padding"), [(0, float("inf")), (1, float("inf")), (2, 0.25)])
def test_random_arrivals_mixed_policies_lengths_caches_equal_alone(seed, max_padding):
    """``max_padding=inf``: one call per kind of forward per round (every length padded together)."""
    m = model(LLADA)
    rng = random.Random(seed)
    reqs = random_requests(rng, base_prompts(LLADA), LLADA_POLICIES, 12, cfg=True)
    engine = Engine(m, max_batch=5, max_padding=max_padding)
    results, _ = run_with_arrivals(engine, reqs, rng)
    assert sorted(results) == list(range(12))
    for r in reqs:
        assert_same(results[r.id], alone(m, r), f"request {r.id} ({r.policy}, cache {r.cache})")
    assert engine.rounds < sum(results[r.id].nfe for r in reqs) / 3  # rows really share rounds
    if max_padding == float("inf"):
        assert engine.forward_calls <= 3 * engine.rounds


def test_dream_fixture_random_arrivals_equal_alone():
    m = model(DREAM)
    rng = random.Random(7)
    reqs = random_requests(rng, base_prompts(DREAM), DREAM_POLICIES, 10)
    results, _ = run_with_arrivals(Engine(m, max_batch=4, max_padding=float("inf")), reqs, rng)
    for r in reqs:
        assert_same(results[r.id], alone(m, r), f"request {r.id} ({r.policy}, cache {r.cache})")


def test_shipped_student_equal_alone_and_generate():
    """The shipped dparallel student on arith prompts (confident: many tokens per step, rows at
    different blocks); each request also equals ``fewstep.generate`` on that prompt alone."""
    m, tok = load_model(SHIPPED), load_tokenizer(SHIPPED)
    texts = ["3 + 4 - 2 + 8 - 1 ?", "( 7 + 2 ) - 5 ?", "9 - 3 + 1 ?", "2 + 2 + 2 + 2 + 2 + 2 - 7 ?"]
    prompts = [tok.encode(t) for t in texts]
    rng = random.Random(3)
    reqs = [
        Request(
            p,
            policy=rng.choice(["entropy:0.45", "threshold:0.9", "llada:steps=64"]),
            gen_length=64,
            block_length=rng.choice([16, 32]),
            cache=c,
            id=i,
        )
        for i, (p, c) in enumerate(
            zip(prompts * 2, ["none", "dual", "prefix", "dual", "none", "prefix", "dual", "none"])
        )
    ]
    results, _ = run_with_arrivals(Engine(m, max_batch=8), reqs, rng)
    for r in reqs:
        g = generate(m, [r.prompt], r.policy, gen_length=64, block_length=r.block_length, cache=r.cache)
        assert results[r.id].answer == g.answers[0].tolist() and results[r.id].nfe == int(g.nfe[0]), r.id
    assert max(results[r.id].tokens_per_step[0] for r in reqs) > 1


def test_seeded_sampling_is_batch_invariant_and_reproducible():
    m = model(LLADA)
    prompts = base_prompts(LLADA)
    reqs = [
        Request(
            prompts[i % 3][: 4 + i],
            policy="dream:alg=maskgit_plus,temperature=0.6,top_p=0.9",
            gen_length=16,
            block_length=8,
            cache=["none", "prefix", "dual"][i % 3],
            seed=100 + i,
            id=i,
        )
        for i in range(6)
    ]
    results = {r.id: r for r in Engine(m, max_batch=6).run(reqs)}
    for r in reqs:
        assert_same(results[r.id], alone(m, r), f"request {r.id}")
    greedy = alone(m, replace(reqs[0], policy="dream:alg=maskgit_plus"))
    assert results[0].answer != greedy.answer  # the temperature really samples


def test_cancellation_of_pending_and_running_requests():
    m = model(LLADA)
    prompts = base_prompts(LLADA)
    reqs = [Request(prompts[i % 3], policy="llada:steps=16", gen_length=16, block_length=8, id=i) for i in range(5)]
    engine = Engine(m, max_batch=3)
    for r in reqs:
        engine.submit(r)
    engine.step()
    engine.step()
    engine.cancel(1)  # running
    engine.cancel(4)  # still waiting (max_batch 3)
    ups = engine.step()
    cancelled = {u.id: u for u in ups if u.done}
    assert set(cancelled) == {1, 4} and all(u.result.cancelled for u in cancelled.values())
    assert cancelled[1].result.nfe == 2 and cancelled[4].result.nfe == 0
    assert 1 not in {u.id for u in ups if not u.done}  # the cancelled row took no part in the round
    results = {}
    while engine.has_work():
        results.update({u.id: u.result for u in engine.step() if u.done})
    assert sorted(results) == [0, 2, 3]
    for i in (0, 2, 3):
        assert_same(results[i], alone(m, reqs[i]), f"request {i}")


def test_cancel_keeps_nothing_for_finished_or_unknown_ids_and_has_work_lasts_to_the_last_update():
    """A stale cancel (an id not pending or running) is ignored at once, so it can never cancel a later
    request that reuses the id; ``has_work`` stays True until the round that emits the last update."""
    m = model(LLADA)
    req = Request(base_prompts(LLADA)[0], policy="llada:steps=8", gen_length=8, block_length=8, id=7)
    want = alone(m, req)
    engine = Engine(m)
    assert engine.cancel(7) is False and not engine.has_work()  # unknown: nothing kept
    engine.submit(replace(req))
    ups = []
    while engine.has_work():
        assert not (ups and ups[-1].done)  # work left means no last update yet
        ups += engine.step()
    assert ups[-1].done and not ups[-1].result.cancelled and [u.done for u in ups].count(True) == 1
    assert_same(ups[-1].result, want, "the id cancelled before it was submitted")
    assert engine.cancel(7) is False  # finished: nothing kept
    assert_same(engine.run([replace(req)])[0], want, "the id reused after a stale cancel")
    engine.submit(replace(req, id=9))
    with pytest.raises(ValueError, match="request id 9 is already pending or running") as err:
        engine.submit(replace(req, id=9))
    assert err.value.field == "id"
    assert engine.cancel(9) is True
    (last,) = engine.step()
    assert last.done and last.result.cancelled and not engine.has_work()


def test_max_nfe_stops_a_row_and_leaves_the_others_exact():
    m = model(LLADA)
    prompts = base_prompts(LLADA)
    capped = Request(prompts[0], policy="llada:steps=16", gen_length=16, block_length=8, cache="dual", max_nfe=5, id=0)
    other = Request(prompts[1], policy="threshold:0.9", gen_length=16, block_length=8, cache="prefix", id=1)
    res = {r.id: r for r in Engine(m).run([capped, other])}
    assert res[0].nfe == 5 and res[0].stopped_by_max_nfe
    full = alone(m, replace(capped, max_nfe=None))
    mask = m.config.mask_token_id
    assert res[0].answer == [t if 0 < d <= 5 else mask for t, d in zip(full.answer, full.decode_step)]
    assert_same(res[1], alone(m, other), "uncapped request")
    assert not res[1].stopped_by_max_nfe


def test_max_batch_caps_the_running_set_fifo():
    m = model(LLADA)
    prompts = base_prompts(LLADA)
    reqs = [Request(prompts[i % 3], policy="threshold:0.9", gen_length=8, block_length=8, id=i) for i in range(7)]
    engine = Engine(m, max_batch=2)
    for r in reqs:
        engine.submit(r)
    first_seen, results, most = [], {}, 0
    while engine.has_work():
        ups = engine.step()
        most = max(most, len(ups))
        for u in ups:
            if u.id not in first_seen:
                first_seen.append(u.id)
            if u.done:
                results[u.id] = u.result
        assert engine.running <= 2
    assert most <= 2 and first_seen == list(range(7))  # never more than 2 rows; admitted in FIFO order
    for r in reqs:
        assert_same(results[r.id], alone(m, r), f"request {r.id}")


def test_updates_stream_the_canvas():
    m = model(LLADA)
    req = Request(base_prompts(LLADA)[2], policy="entropy:0.5", gen_length=16, block_length=8, cache="dual")
    engine = Engine(m)
    rid = engine.submit(req)
    ups = []
    while engine.has_work():
        ups += engine.step()
    assert [u.nfe for u in ups] == list(range(1, len(ups) + 1)) and all(u.id == rid for u in ups)
    assert [u.done for u in ups] == [False] * (len(ups) - 1) + [True]
    canvas = [m.config.mask_token_id] * 16
    for u in ups:
        for p, t in zip(u.positions, u.tokens):
            canvas[p] = t
        assert canvas == u.answer
    assert canvas == ups[-1].result.answer and [u.block for u in ups] == sorted(u.block for u in ups)


@dataclass
class Counting(Policy):
    """Left to right, one token per step; records the batch size of every select call."""

    name = "counting"
    calls: list | None = None

    def select(self, logits: torch.Tensor, state: StepState) -> Selection:
        self.calls.append(logits.shape[0])
        return Selection(logits.argmax(-1), state.mask & (state.mask.cumsum(-1) == 1))


@dataclass
class CountingAnyBlock(Counting):
    """The same rule, declared not to read the block scalars: rows at any block share a call."""

    name = "counting-any-block"
    uses_block_scalars = False


def test_rows_of_different_answer_lengths_share_a_select_call():
    m = model(LLADA)
    prompts = base_prompts(LLADA)
    pol, ref = CountingAnyBlock(calls=[]), Counting(calls=[])
    specs = [(8, 8, "none"), (16, 8, "dual"), (24, 8, "prefix")]
    for p in (pol, ref):
        engine = Engine(m)
        reqs = [Request(prompts[i], policy=p, gen_length=g, block_length=b, cache=c, id=i)
                for i, (g, b, c) in enumerate(specs)]  # fmt: skip
        res = {r.id: r for r in engine.run(reqs)}
        for r in reqs:
            assert_same(res[r.id], alone(m, replace(r, policy=type(p)(calls=[]))), f"request {r.id}")
    assert pol.calls[:8] == [3] * 8 and pol.calls[8:16] == [2] * 8  # answers of 8, 16, 24 tokens, rows at blocks 0-2
    assert max(ref.calls) == 1  # a rule that reads the block scalars: one call per block geometry


class Broken(Policy):
    name = "broken"

    def select(self, logits, state):
        raise IndexError("a bug in a policy")


class Stuck(Policy):
    name = "stuck"

    def select(self, logits, state):
        return Selection(state.tokens, torch.zeros_like(state.mask))


def test_one_select_call_per_policy_and_errors_stay_per_request():
    m = model(LLADA)
    prompts = base_prompts(LLADA)
    pol = Counting(calls=[])
    reqs = [
        Request(prompts[i], policy=pol, gen_length=8, block_length=8, cache=c, id=i)
        for i, c in enumerate(["none", "prefix", "dual"])
    ]
    reqs.append(Request(prompts[0], policy=Stuck(), gen_length=8, block_length=8, max_steps_per_block=3, id=3))
    reqs.append(Request(prompts[1], policy=Broken(), gen_length=8, block_length=8, id=4))
    engine = Engine(m)
    for r in reqs:
        engine.submit(r)
    results = {}
    while engine.has_work():
        results.update({u.id: u.result for u in engine.step() if u.done})
    assert pol.calls == [3] * 8  # three prompt lengths and cache modes, one select call per round
    assert "made no progress on block 0 within 3 forwards" in results[3].error
    assert results[4].error == "policy broken failed: IndexError: a bug in a policy" and results[4].nfe == 0
    assert all(results[i].error is None and results[i].nfe == 8 for i in range(3))
    with pytest.raises(RuntimeError, match="made no progress"):
        Engine(m).run([replace(reqs[3], id=None)])


def test_submit_validates_and_is_thread_safe():
    m = model(LLADA)
    engine = Engine(m, max_batch=4)
    with pytest.raises(ValueError, match=r"gen_length \(30\) must be a multiple of block_length \(8\)"):
        engine.submit(Request([1, 2, 3], gen_length=30, block_length=8))
    with pytest.raises(ValueError, match="unknown policy"):
        engine.submit(Request([1, 2, 3], policy="nope"))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.submit(Request([1, 2, 3], gen_length=8192))
    with pytest.raises(ValueError, match="max_nfe must be") as err:
        engine.submit(Request([1, 2, 3], gen_length=8, max_nfe=0))
    assert err.value.field == "max_nfe"  # a RequestError naming the field, for API errors
    with pytest.raises(ValueError, match="the prompt has 4096 tokens") as err:
        engine.validate(Request([1] * 4096, gen_length=8))
    assert err.value.field == "prompt" and not engine.has_work()  # validate enqueues nothing
    prompts = base_prompts(LLADA)
    reqs = [Request(prompts[i % 3][: 5 + i], policy="threshold:0.9", gen_length=16, block_length=8) for i in range(8)]
    threads = [threading.Thread(target=engine.submit, args=(r,)) for r in reqs]
    results = {}
    for t in threads:
        t.start()
        results.update({u.id: u.result for u in engine.step() if u.done})
    for t in threads:
        t.join()
    while engine.has_work():
        results.update({u.id: u.result for u in engine.step() if u.done})
    assert len({r.id for r in reqs}) == 8 and sorted(results) == sorted(r.id for r in reqs)
    for r in reqs:
        assert_same(results[r.id], alone(m, r), f"request {r.id}")


# -- block-diffusion models (LLaDA2-MoE, SDAR) -----------------------------------------------------------

BLOCK_POLICIES = [
    "threshold:0.9",
    "llada:steps=8",
    "entropy:0.5",
    "cad:threshold=0.9,max_tokens=4,eos_ratio=0.5",
    "factor:1.0",
    "llada2",
    "sdar:low_confidence_dynamic",
    "sdar:remasking_strategy=entropy_bounded,quirk_iteration_cap=True,quirk_row_entropy=True",
    "sdar:remasking_strategy=low_confidence_static,quirk_uncapped_topk=True",
    "threshold:threshold=0.8,temperature=0.7",
]


def block_requests(rng: random.Random, prompts, n: int) -> list[Request]:
    """Block-model requests: prompt tails at every offset in their block (and none), block lengths that do
    not divide the answer or exceed it, both caches, EOS stops and the official samplers' quirks."""
    out = []
    for i in range(n):
        p = rng.choice(prompts)
        gen, block = rng.choice([(8, 4), (16, 4), (16, 8), (12, 8), (8, 16), (24, 8)])
        spec = rng.choice(BLOCK_POLICIES)
        seed = rng.randint(0, 10**6) if "temperature" in spec or rng.random() < 0.3 else None
        out.append(
            Request(
                prompt=p[: rng.randint(2, len(p))],
                policy=spec,
                gen_length=gen,
                block_length=block,
                cache=rng.choice(["none", "prefix", "dual"]),
                seed=seed,
                cfg_scale=rng.choice([0.0, 0.0, 0.0, 0.5]),
                early_stop=rng.random() < 0.4,
                eos_early_stop=rng.random() < 0.3,
                quirks=Quirks(unstored_blocks="quirk_iteration_cap" in spec),
                id=i,
            )
        )
    return out


@pytest.mark.parametrize("fixture", ["llada2-tiny-a", "sdar-tiny-a"])
def test_block_models_random_arrivals_equal_alone(fixture):
    """Block-model rows at different blocks, block lengths, phases (prefill, denoise, store) and caches
    share one call per round; each gets exactly the tokens, NFE and decode steps it gets alone."""
    d = next(d for d in BLOCK_DIRS if d.name == fixture)
    m = model(d)
    rng = random.Random(11)
    reqs = block_requests(rng, list(oracles(d)["prompts"].values()), 10)
    engine = Engine(m, max_batch=4, max_padding=float("inf"))
    results, _ = run_with_arrivals(engine, reqs, rng)
    for r in reqs:
        assert_same(results[r.id], alone(m, r), f"request {r.id} ({r.policy}, cache {r.cache})")
    assert engine.forward_calls == engine.rounds  # one block-causal call per round, whatever the rows do
    assert engine.rounds < sum(results[r.id].nfe for r in reqs) / 2


@pytest.mark.parametrize("fixture", ["llada2-tiny-a", "sdar-tiny-a"])
def test_block_cache_is_exact_and_counts_prefill_and_stores(fixture):
    """The exact cache of committed blocks gives the tokens of recomputing the canvas; its NFE adds one
    prefill (complete prompt blocks) and one store forward per decoded block."""
    d = next(d for d in BLOCK_DIRS if d.name == fixture)
    m = model(d)
    for prompt in oracles(d)["prompts"].values():
        for policy, B in (("threshold:0.9", 4), ("llada2", 8), ("sdar", 16)):
            P, G = len(prompt), 32
            none = generate(m, [prompt], policy, gen_length=G, block_length=B, cache="none", early_stop=False)
            pre = generate(m, [prompt], policy, gen_length=G, block_length=B, cache="prefix", early_stop=False)
            assert pre.sequences.tolist() == none.sequences.tolist(), (policy, B, P)
            blocks = -(-(P + G) // B) - P // B
            assert int(pre.nfe[0]) == int(none.nfe[0]) + (P >= B) + blocks, (policy, B, P)
