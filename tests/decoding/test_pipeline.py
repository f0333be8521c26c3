"""The generation loop on the tiny fixture models: batch == single for every policy x cache mode,
early stop, classifier-free guidance, trace/callbacks, custom policies and argument validation."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

import fewstep
from fewstep.decoding import POLICIES, Policy, Selection, StepState, generate, parse_policy
from tests.parity.fixtures import DEFAULT_DIRS, model, oracles

LLADA, DREAM = DEFAULT_DIRS  # the repo's fixture copies (this file tests the engine, not parity)

# one spec per registered policy (settings that make rows progress at different speeds)
SPECS = {
    "llada": "llada:steps=16",
    "threshold": "threshold:0.9",
    "factor": "factor:1.0",
    "entropy": "entropy:0.5",
    "entropy-dream": "entropy-dream:0.5",
    "cad": "cad:threshold=0.9,max_tokens=4,eos_ratio=0.5",
    "dream": "dream:alg=confidence_threshold,steps=16",
    "llada2": "llada2:threshold=0.9,steps=4",
    "sdar": "sdar:denoising_steps=4,confidence_threshold=0.6",
    "spd": "spd:0.5",
    "multiblock": "multiblock:1.0",
    "multiblock-dream": "multiblock-dream:threshold=1.0,cache_delay_iter=2,refresh_interval=3",
}
EXTRA_SPECS = [
    "llada:steps=32,remasking=random",
    "cad:mode=global,threshold=0.8",
    "dream:maskgit_plus",
    "dream:topk_margin",
    "sdar:sequential",
    "sdar:entropy_bounded",
    "sdar:low_confidence_static",
    "spd:threshold=0.7,soft=false",
]


def test_every_policy_has_a_batch_spec():
    assert set(SPECS) == set(POLICIES)


def prompts(d) -> list[list[int]]:
    """Three prompts of different lengths (so the batch is left-padded)."""
    p = list(oracles(d)["prompts"].values())
    return [p[0], p[1][:6], (p[-1] + p[0])[:13]]


def assert_batch_equals_single(m, rows, spec, **kw):
    batch = generate(m, rows, spec, **kw)
    for i, r in enumerate(rows):
        single = generate(m, [r], spec, **{**kw, **({"seed": [kw["seed"][i]]} if "seed" in kw else {})})
        assert batch.answers[i].tolist() == single.answers[0].tolist(), f"row {i}: tokens differ"
        assert int(batch.nfe[i]) == int(single.nfe[0]), f"row {i}: NFE differs"
        assert batch.tokens_per_step[i] == single.tokens_per_step[0]
        assert batch.decode_step[i].tolist() == single.decode_step[0].tolist()
    return batch


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("spec", list(SPECS.values()) + EXTRA_SPECS)
@pytest.mark.parametrize("d", [LLADA, DREAM], ids=lambda d: d.name)
def test_batch_equals_single(d, spec, cache):
    if parse_policy(spec).spans_blocks and cache == "dual":  # later blocks stay open: no dual cache
        with pytest.raises(fewstep.decoding.RequestError, match="cache"):
            generate(model(d), prompts(d), spec, gen_length=32, block_length=8, cache=cache)
        return
    seeds = {"seed": [1, 2, 3]} if "random" in spec else {}  # random remasking needs per-row streams
    out = assert_batch_equals_single(model(d), prompts(d), spec, gen_length=32, block_length=8, cache=cache, **seeds)
    assert out.sequences.shape == (3, 13 + 32)
    if not spec.startswith(
        ("llada", "dream:maskgit", "dream:topk", "sdar:sequential", "sdar:low_confidence_static")
    ):  # adaptive rules: rows really progress at different speeds
        assert len({tuple(t) for t in out.tokens_per_step}) > 1


@pytest.mark.parametrize("cache", ["none", "dual"])
@pytest.mark.parametrize(
    "spec",
    [
        "threshold:threshold=0.9,temperature=0.7",
        "llada:steps=16,remasking=random,temperature=1",
        "cad:temperature=0.8",
        "dream:alg=maskgit_plus,temperature=0.6,top_p=0.9,alg_temp=0.5",
        "spd:threshold=0.5,temperature=0.8",
    ],
)
def test_sampling_batch_equals_single_with_row_seeds(spec, cache):
    m = model(LLADA)
    rows = prompts(LLADA)
    out = assert_batch_equals_single(m, rows, spec, gen_length=32, block_length=8, cache=cache, seed=[11, 22, 33])
    greedy = generate(
        m, rows, replace(parse_policy(spec), temperature=0.0), gen_length=32, block_length=8, seed=[11, 22, 33]
    )
    assert not torch.equal(out.answers, greedy.answers)  # the temperature really samples
    again = generate(m, rows, spec, gen_length=32, block_length=8, cache=cache, seed=[11, 22, 33])
    assert torch.equal(again.sequences, out.sequences)  # seeded: reproducible


def test_cfg_matches_a_direct_implementation_and_counts_one_nfe():
    """LLaDA fixed steps with CFG, checked against a direct transcription of the rule (one block)."""
    m = model(LLADA)
    prompt = torch.tensor([prompts(LLADA)[0]])
    mask_id, G, steps, w = m.config.mask_token_id, 16, 8, 1.5
    x = torch.cat([prompt, torch.full((1, G), mask_id)], 1)
    P = prompt.shape[1]
    quota = [2] * steps
    with torch.no_grad():
        for k in range(steps):
            un = x.clone()
            un[:, :P] = mask_id
            z = m(torch.cat([x, un])).logits
            z = z[1:] + (w + 1) * (z[:1] - z[1:])
            x0 = z.argmax(-1)
            conf = torch.where(x == mask_id, F.softmax(z, -1).gather(-1, x0[..., None])[..., 0], -torch.inf)
            idx = conf[0].topk(quota[k]).indices
            x[0, idx] = x0[0, idx]
    out = generate(m, prompt, f"llada:steps={steps}", gen_length=G, block_length=G, cfg_scale=w)
    assert out.sequences.tolist() == x.tolist()
    assert out.nfe.tolist() == [steps]
    plain = generate(m, prompt, f"llada:steps={steps}", gen_length=G, block_length=G)
    assert not torch.equal(plain.sequences, out.sequences)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_cfg_batch_equals_single(cache):
    assert_batch_equals_single(
        model(LLADA), prompts(LLADA), "threshold:0.9", gen_length=32, block_length=8, cache=cache, cfg_scale=0.5
    )


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_early_stop(cache):
    m = model(LLADA)
    rows = prompts(LLADA)
    eos = (m.config.eos_token_id, oracles(LLADA)["special_ids"]["eot"])
    kw = dict(gen_length=64, block_length=16, cache=cache, eos_ids=eos)
    full = generate(m, rows, "threshold:0.9", **kw)
    stop = generate(m, rows, "threshold:0.9", early_stop=True, **kw)
    assert stop.finished_early.all()
    assert (stop.nfe < full.nfe).any() and (stop.nfe <= full.nfe).all()
    for i in range(len(rows)):
        ans, ref = stop.answers[i].tolist(), full.answers[i].tolist()
        first = min(j for j, t in enumerate(ans) if t in eos)
        assert ans[: first + 1] == ref[: first + 1]  # same trajectory up to the stop
        assert set(ans[first + 1 :]) <= {eos[0]}  # the rest is EOS
        # NFE stops with the block holding the first EOS: it equals the NFE spent up to that block
        block_end = (first // 16 + 1) * 16
        assert int(stop.nfe[i]) == max(full.decode_step[i, :block_end].tolist()) or cache != "none"
        assert len(stop.tokens_per_step[i]) == int(stop.nfe[i])
    one = generate(m, rows[1:2], "threshold:0.9", early_stop=True, **kw)
    assert one.nfe.tolist() == stop.nfe[1:2].tolist() and torch.equal(one.answers[0], stop.answers[1])


def test_trace_and_callback_reconstruct_the_answer():
    m = model(LLADA)
    rows = prompts(LLADA)
    events = []
    out = generate(m, rows, "entropy:0.5", gen_length=32, block_length=8, trace=True, callback=events.append)
    assert len(out.trace) == len(events) >= max(out.nfe.tolist())
    canvas = torch.full((3, 32), m.config.mask_token_id)
    per_row_steps = [0, 0, 0]
    for step in out.trace:
        for r, pos, tok in zip(step["rows"], step["positions"], step["tokens"]):
            per_row_steps[r] += 1
            for p, t in zip(pos, tok):
                canvas[r, p] = t
                assert out.decode_step[r, p] == per_row_steps[r]
    assert per_row_steps == out.nfe.tolist()
    assert torch.equal(canvas, out.answers)
    assert [sum(t) for t in out.tokens_per_step] == [32, 32, 32]
    assert torch.allclose(out.positions_per_forward, 32 / out.nfe.double())
    eos = set(out.eos_ids)
    before = [next((i for i, t in enumerate(a) if t in eos), 32) for a in out.answers.tolist()]
    assert torch.allclose(out.tokens_per_forward, torch.tensor(before) / out.nfe.double())


@dataclass
class LeftToRight(Policy):
    """A policy written in a test: commit the leftmost masked position (autoregressive order)."""

    name = "left-to-right"
    seen: list | None = None

    def select(self, logits: torch.Tensor, state: StepState) -> Selection:
        if self.seen is not None:
            self.seen.append(tuple(logits.shape))
        first = state.mask & (state.mask.cumsum(-1) == 1)
        return Selection(logits.argmax(-1), first)


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_custom_policy_sees_only_the_block(cache):
    m = model(DREAM)
    seen: list = []
    out = generate(m, prompts(DREAM), LeftToRight(seen=seen), gen_length=16, block_length=8, cache=cache)
    assert out.nfe.tolist() == [16, 16, 16]
    assert set(seen) == {(3, 8, m.config.vocab_size)}  # logits of the block only, never the canvas
    assert (out.decode_step == torch.arange(1, 17)).all()


class Stuck(Policy):
    name = "stuck"

    def select(self, logits, state):
        return Selection(state.tokens, torch.zeros_like(state.mask))


def test_a_policy_that_never_commits_raises():
    with pytest.raises(RuntimeError, match="made no progress on block 0 within 5 forwards"):
        generate(model(LLADA), prompts(LLADA), Stuck(), gen_length=8, block_length=8, max_steps_per_block=5)


def test_list_prompts_equal_padded_tensor():
    m = model(LLADA)
    rows = prompts(LLADA)
    P = max(map(len, rows))
    ids = torch.tensor([[m.config.pad_token_id] * (P - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])
    a = generate(m, rows, "threshold:0.9", gen_length=16, block_length=8)
    b = generate(m, ids, "threshold:0.9", gen_length=16, block_length=8, attention_mask=am)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.nfe, b.nfe)


def test_public_api():
    assert fewstep.generate is generate
    out = fewstep.generate(model(LLADA), prompts(LLADA)[:1], gen_length=32)  # defaults: threshold 0.9, blocks of 32
    assert out.policy == "threshold" and out.cache == "none" and out.answers.shape == (1, 32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gen_length": 30, "block_length": 8}, r"gen_length \(30\) must be a multiple of block_length \(8\)"),
        ({"policy": "llada:steps=6", "gen_length": 32, "block_length": 8}, r"llada.steps \(6\) must be divisible"),
        ({"policy": "threshold:1.2"}, r"threshold.threshold must be in \[0.0, 1.0\]"),
        ({"mask_id": 10**6}, r"mask_id must be in \[0, 511\]"),
        ({"gen_length": 4096}, r"exceeds the model's context \(max_sequence_length 4096\); valid gen_length: <= 4086"),
        ({"cache": "full"}, "cache must be one of none, prefix, dual"),
        ({"block_length": 0}, r"block_length must be in \[1, gen_length=32\]"),
        ({"gen_length": 0}, "gen_length must be an integer >= 1"),
        ({"cfg_scale": -1.0}, "cfg_scale must be >= 0"),
        ({"attention_mask": torch.tensor([[1] * 9 + [0]])}, "attention_mask must describe left padding"),
        ({"seed": [1, 2]}, "seed must be an int or one int per row"),
        ({"input_ids": [[1, 2, 10**6]]}, r"input_ids must be token ids in \[0, 511\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    kw = {"policy": "threshold", "gen_length": 32, "input_ids": torch.tensor([prompts(LLADA)[0]]), **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model(LLADA), **kw)
