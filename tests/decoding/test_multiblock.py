"""Multi-block decoding (d3LLM, ``multiblock`` / ``multiblock-dream``) and the ``eos_fill`` stop in the engine.

Exactness against the reference is the parity suite's (``tests/parity/test_d3llm_sampler.py``); here: every
request gets exactly what it gets alone whatever shares its rounds (random arrivals, both caches, the stop
options, seeded sampling, CFG), the rule's own properties (several blocks open at once; with both gates at
1 it is dParallel's single-block entropy rule; a cache that never fills is no cache), what ``eos_fill``
guarantees for any policy, and the request checks.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from fewstep.decoding import RequestError, generate
from fewstep.decoding.engine import Engine, Quirks, Request
from fewstep.decoding.policies import MultiBlockPolicy
from fewstep.models.loading import load_model, load_tokenizer
from fewstep.tasks import generate_problems
from tests.decoding.test_engine import alone, assert_same, base_prompts, run_with_arrivals
from tests.parity.fixtures import BLOCK_DIRS, DEFAULT_DIRS, model

LLADA, DREAM = DEFAULT_DIRS
SHIPPED = Path(__file__).resolve().parents[2] / "src" / "fewstep" / "assets" / "models" / "dparallel"
ARITH = ["3 + 4 - 2 + 8 - 1 ?", "( 7 + 2 ) - 5 ?", "9 - 3 + 1 ?", "2 + 2 + 2 + 2 + 2 + 2 - 7 ?"]

MULTI = {
    LLADA: [
        "multiblock",
        "multiblock:1.0",
        "multiblock:threshold=0.3,add_threshold=0.25,full_threshold=0.5",
        "multiblock:threshold=0.8,temperature=0.8",  # sampled: needs a seed
        "multiblock:threshold=1.0,cache_delay_iter=1,refresh_interval=2,quirk_stale_candidates=true",
    ],
    DREAM: [
        "multiblock-dream",
        "multiblock-dream:1.0",
        "multiblock-dream:threshold=2.0,cache_delay_iter=0,refresh_interval=4",
        "multiblock-dream:threshold=1.5,temperature=0.7",
    ],
}
OTHERS = {LLADA: ["threshold:0.9", "entropy:0.5", "llada:steps=8"], DREAM: ["entropy-dream:0.5", "threshold:0.9"]}


def multi_requests(rng: random.Random, d: Path, n: int) -> list[Request]:
    """Multi-block requests (and a few of other policies) with random lengths, caches and stop options."""
    out = []
    for i in range(n):
        p = rng.choice(base_prompts(d))
        spec = rng.choice(MULTI[d] * 3 + OTHERS[d])
        multi = spec.startswith("multiblock")
        gen, block = rng.choice([(16, 4), (24, 8), (32, 8), (32, 16), (48, 8)])
        if spec.startswith("llada"):
            gen, block = 16, 8
        out.append(
            Request(
                prompt=p[: rng.randint(3, len(p))],
                policy=spec,
                gen_length=gen,
                block_length=block,
                cache=rng.choice(["none", "prefix"] if multi else ["none", "prefix", "dual"]),
                seed=rng.randint(0, 10**6) if "temperature" in spec or rng.random() < 0.3 else None,
                cfg_scale=rng.choice([0.0, 0.0, 0.0, 0.5]),
                early_stop=rng.random() < 0.3,
                eos_fill=rng.random() < 0.5,
                eos_ids=rng.choice([None, rng.sample(range(40), 3)]),  # frequent ids: the stops really fire
                quirks=Quirks(eos_fill_nfe=rng.random() < 0.2, prefix_own_logit=rng.random() < 0.3),
                id=i,
            )
        )
    return out


@pytest.mark.parametrize(("d", "seed"), [(LLADA, 0), (LLADA, 1), (DREAM, 2)], ids=lambda v: getattr(v, "name", v))
def test_random_arrivals_equal_alone(d, seed):
    """Rows with several blocks open, at different first blocks, window widths and cache plans, share rounds
    with each other and with single-block rows; each gets exactly its tokens, NFE and decode steps alone."""
    m = model(d)
    rng = random.Random(seed)
    reqs = multi_requests(rng, d, 14)
    engine = Engine(m, max_batch=5, max_padding=float("inf"))
    results, _ = run_with_arrivals(engine, reqs, rng)
    for r in reqs:
        assert_same(results[r.id], alone(m, r), f"request {r.id} ({r.policy}, cache {r.cache})")
    assert engine.rounds < sum(results[r.id].nfe for r in reqs) / 2  # rows really share rounds
    fired = [r for r in reqs if r.eos_fill and results[r.id].finished_early]
    assert fired, "no eos_fill stop fired: the test does not exercise it"


def test_batch_equals_single_with_prefix_cache_and_eos_fill():
    """``fewstep.generate`` over a left-padded batch equals each prompt alone (multi-block, cached, stopped)."""
    m = model(LLADA)
    rows = base_prompts(LLADA)
    kw = {"gen_length": 48, "block_length": 8, "cache": "prefix", "eos_fill": True, "eos_ids": [5, 17, 33]}
    batch = generate(m, rows, "multiblock:1.0", **kw)
    for i, r in enumerate(rows):
        single = generate(m, [r], "multiblock:1.0", **kw)
        assert batch.answers[i].tolist() == single.answers[0].tolist()
        assert int(batch.nfe[i]) == int(single.nfe[0])
        assert batch.decode_step[i].tolist() == single.decode_step[0].tolist()


def _blocks_per_forward(out, block: int) -> list[int]:
    """Per forward of row 0: the number of blocks it committed into."""
    steps: dict[int, set] = {}
    for pos, s in enumerate(out.decode_step[0].tolist()):
        if s:
            steps.setdefault(s, set()).add(pos // block)
    return [len(steps.get(s, ())) for s in range(1, int(out.nfe[0]) + 1)]


def test_several_blocks_open_and_fewer_forwards_than_one_block_at_a_time():
    """On the shipped dParallel student: the next block opens long before the current one is done, so
    forwards commit into several blocks; the multi-block rule needs fewer forwards than the same entropy
    rule one block at a time."""
    m, tok = load_model(SHIPPED), load_tokenizer(SHIPPED)
    prompts = [tok.encode(t) for t in ARITH]
    multi = generate(m, prompts, "multiblock", gen_length=64, block_length=16)
    single = generate(m, prompts, "entropy:0.5", gen_length=64, block_length=16)
    assert int(multi.nfe.sum()) < int(single.nfe.sum())
    assert max(_blocks_per_forward(multi, 16)) >= 2
    assert max(_blocks_per_forward(single, 16)) == 1
    assert int((multi.answers == m.config.mask_token_id).sum()) == 0


@pytest.mark.parametrize("threshold", [0.05, 0.5, 2.0])
def test_gates_at_one_are_single_block_entropy_decoding(threshold):
    """δ_add = δ_full = 1: a block opens only when the previous one is complete, so the LLaDA variant is
    dParallel's entropy rule (lowest entropy + every H <= τ, float64, log(p + 1e-12)) block by block."""
    m = model(LLADA)
    rows = base_prompts(LLADA)
    spec = f"multiblock:threshold={threshold},add_threshold=1.0,full_threshold=1.0"
    kw = {"gen_length": 32, "block_length": 8, "quirk_mask_prediction": True}
    multi = generate(m, rows, spec, **kw)
    ref = generate(m, rows, f"entropy:{threshold}", **kw)
    assert multi.sequences.tolist() == ref.sequences.tolist()
    assert multi.nfe.tolist() == ref.nfe.tolist()
    assert multi.decode_step.tolist() == ref.decode_step.tolist()


def _columns(m):
    """A ``denoise`` wrapper counting the canvas columns each forward runs."""
    runs, original = [], m.denoise

    def denoise(input_ids=None, attention_mask=None, **kw):
        cut = 0 if kw.get("cache_mode", "none") == "none" else max(kw["start"] - m.logit_shift, 0)
        runs.append(input_ids.shape[1] - cut)
        return original(input_ids, attention_mask, **kw)

    m.denoise = denoise
    return runs


@pytest.mark.parametrize("d", [LLADA, DREAM], ids=lambda d: d.name)
def test_prefix_cache_runs_fewer_columns_and_a_cache_never_filled_is_no_cache(d):
    m = model(d)
    name = "multiblock" if d is LLADA else "multiblock-dream"
    prompt = base_prompts(d)[2]
    kw = {"gen_length": 64, "block_length": 8}
    none = generate(m, [prompt], f"{name}:1.0", **kw)
    try:
        runs = _columns(m)
        never = generate(m, [prompt], f"{name}:threshold=1.0,cache_delay_iter=100000", cache="prefix", **kw)
        full_runs, runs[:] = list(runs), []
        cached = generate(
            m, [prompt], f"{name}:threshold=1.0,cache_delay_iter=1,refresh_interval=4", cache="prefix", **kw
        )
    finally:
        del m.denoise
    assert never.sequences.tolist() == none.sequences.tolist() and never.nfe.tolist() == none.nfe.tolist()
    assert set(full_runs) == {len(prompt) + 64}  # every forward ran the whole canvas
    assert len(runs) == int(cached.nfe[0]) and min(runs) < len(prompt) + 64
    assert sum(runs) < len(runs) * (len(prompt) + 64)
    assert (cached.answers == m.config.mask_token_id).sum() == 0


def _first_eos(answer: list[int], eos: set[int]) -> int | None:
    return next((i for i, t in enumerate(answer) if t in eos), None)


@pytest.mark.parametrize("spec", ["threshold:0.9", "entropy:0.5", "multiblock", "cad:0.9", "llada:steps=16"])
def test_eos_fill_stops_at_the_first_eos_without_a_forward_for_padding(spec):
    """For any policy: after the first EOS every position is EOS; positions the fill wrote were never
    committed by a forward (decode step 0); the row ends at the forward that decoded its last mask (no
    forward spent on padding), never later than the block-level early stop."""
    m, tok = load_model(SHIPPED), load_tokenizer(SHIPPED)
    prompts = [tok.encode(t) for t in ARITH]
    eos = {int(m.config.eos_token_id)}
    fill = generate(m, prompts, spec, gen_length=64, block_length=16, eos_fill=True)
    block = generate(m, prompts, spec, gen_length=64, block_length=16, early_stop=True)
    free = generate(m, prompts, spec, gen_length=64, block_length=16, early_stop=False)
    for i in range(len(prompts)):
        answer, steps = fill.answers[i].tolist(), fill.decode_step[i].tolist()
        first = _first_eos(answer, eos)
        assert first is not None and bool(fill.finished_early[i])
        assert all(t in eos for t in answer[first:])
        assert max(steps) == int(fill.nfe[i])  # the last forward committed something: it was needed
        assert int(fill.nfe[i]) <= int(block.nfe[i]) <= int(free.nfe[i])
        committed_after = [p for p in range(first + 1, 64) if steps[p]]
        assert all(steps[p] <= int(fill.nfe[i]) for p in committed_after)
    assert int(fill.nfe.sum()) < int(free.nfe.sum())


def test_eos_fill_nfe_quirk_counts_one_forward_that_never_runs():
    m, tok = load_model(SHIPPED), load_tokenizer(SHIPPED)
    prompts = [tok.encode(p.prompt) for p in generate_problems("test", 16, seed=0)]
    plain = generate(m, prompts, "multiblock", gen_length=64, block_length=8, eos_fill=True)
    quirk = generate(m, prompts, "multiblock", gen_length=64, block_length=8, eos_fill=True, quirk_eos_fill_nfe=True)
    assert quirk.sequences.tolist() == plain.sequences.tolist()
    extra = (quirk.nfe - plain.nfe).tolist()
    assert set(extra) <= {0, 1} and 1 in extra  # the fill ended these rows while masks were left


def test_requests_the_multiblock_rule_cannot_run_are_refused():
    m = model(LLADA)
    prompt = base_prompts(LLADA)[0]
    with pytest.raises(RequestError, match="none or prefix") as err:
        generate(m, [prompt], "multiblock", gen_length=16, block_length=8, cache="dual")
    assert err.value.field == "cache"
    block_model = model(BLOCK_DIRS[0])
    with pytest.raises(RequestError, match="full-attention") as err:
        generate(block_model, [[1, 2, 3]], "multiblock", gen_length=16, block_length=8)
    assert err.value.field == "policy"
    with pytest.raises(RequestError, match="eos_fill must be true or false"):
        Engine(m).submit(Request(prompt, policy="multiblock", gen_length=16, block_length=8, eos_fill=1))
    for bad in ("multiblock:add_threshold=1.5", "multiblock:refresh_interval=0", "multiblock-dream:threshold=-1"):
        with pytest.raises(RequestError) as err:
            generate(m, [prompt], bad, gen_length=16, block_length=8)
        assert err.value.field == "policy"


def test_defaults_are_the_official_runs():
    from fewstep.decoding.policies import DreamMultiBlockPolicy

    llada, dream = MultiBlockPolicy(), DreamMultiBlockPolicy()
    assert (llada.threshold, llada.add_threshold, llada.full_threshold) == (0.5, 0.1, 0.95)
    assert (llada.commit_argmin, llada.strict, llada.cache_delay_iter, llada.refresh_interval) == (True, False, 2, 3)
    assert (dream.threshold, dream.add_threshold, dream.full_threshold) == (0.4, 0.1, 0.95)
    assert (dream.commit_argmin, dream.strict, dream.cache_delay_iter, dream.refresh_interval) == (False, True, 1, None)


def test_updates_stream_commits_in_several_blocks_and_the_current_block():
    """Streaming updates carry every committed position (in any open block) and the row's current block."""
    m, tok = load_model(SHIPPED), load_tokenizer(SHIPPED)
    engine = Engine(m)
    rid = engine.submit(
        Request(tok.encode(ARITH[0]), policy="multiblock", gen_length=64, block_length=16, early_stop=False)
    )
    seen: list = []
    while engine.has_work():
        seen += [u for u in engine.step() if u.id == rid]
    last = seen[-1].result
    assert sum(len(u.positions) for u in seen) == sum(last.tokens_per_step)
    assert any(len({p // 16 for p in u.positions}) >= 2 for u in seen)
    blocks = [u.block for u in seen]
    assert blocks == sorted(blocks) and blocks[-1] > 0  # the current block only moves forward
    assert torch.tensor(last.decode_step).max().item() == last.nfe
