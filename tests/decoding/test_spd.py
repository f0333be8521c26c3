"""DMax's soft parallel decoding (``spd``) on every family, and the engine capabilities it uses.

* the rule itself on crafted logits (confident prefix, revision, convergence, the block-length cap) and the
  norm-preserving soft embedding against a direct transcription;
* the engine's capabilities, each against what it must equal: a window run on its own (hard) embeddings is
  its ids' run bit for bit in every kind of forward (full, prefix, dual, block), soft embeddings reach the
  model at the right columns (padded batches, Dream's shifted logits), and a folded store gives the tokens
  of a separate store forward with one forward less per stored block;
* batch == single: ``spd`` rows mixed with other policies, random arrivals, caches, early stop, on LLaDA,
  Dream, LLaDA2 and SDAR; per-row NFE;
* the revision figures (``revisions``, ``revised``, ``revised_fraction``) and the text layer's final text,
  which never shows a token its open block may still revise.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, replace

import pytest
import torch

import fewstep
from fewstep.decoding import generate
from fewstep.decoding.engine import Engine, Quirks, Request
from fewstep.decoding.forward import Seqs, dual_forward, full_forward, prefix_forward
from fewstep.decoding.policies import LLaDA2Policy, SoftParallelPolicy, StepState
from fewstep.decoding.policies.base import RowRNG
from fewstep.decoding.policies.dmax import soft_embeddings
from fewstep.models.base import KVCache
from tests.decoding.test_engine import alone, assert_same, run_with_arrivals
from tests.parity.fixtures import BLOCK_DIRS, DEFAULT_DIRS, model, oracles

LLADA, DREAM = DEFAULT_DIRS
FAMILIES = DEFAULT_DIRS + BLOCK_DIRS
MASK = 9


def _state(tokens, active, step=0, L=None, embed=None, mask_embedding=None) -> StepState:
    tokens = torch.tensor(tokens)
    R, n = tokens.shape
    return StepState(
        tokens=tokens,
        mask=tokens == MASK,
        step=torch.full((R,), step),
        rows=torch.arange(R),
        block=0,
        num_blocks=1,
        block_length=L or n,
        gen_length=n,
        gen_masked=(tokens == MASK).sum(-1),
        mask_id=MASK,
        eos_ids=(),
        rng=RowRNG(None, torch.device("cpu")),
        memory={"active": torch.tensor(active), "done": torch.zeros(R, dtype=torch.bool)},
        embed=embed,
        mask_embedding=mask_embedding,
    )


def _logits(argmax: list[list[int]], prob: list[list[float]], V: int = 10) -> torch.Tensor:
    """Logits whose argmax is ``argmax`` with probability ``prob`` (the rest spread evenly)."""
    R, L = len(argmax), len(argmax[0])
    p = torch.empty(R, L, V)
    for r in range(R):
        for i in range(L):
            p[r, i] = (1 - prob[r][i]) / (V - 1)
            p[r, i, argmax[r][i]] = prob[r][i]
    return p.log()


# -- the rule ---------------------------------------------------------------------------------------------


def test_confident_prefix_revision_and_convergence():
    policy = SoftParallelPolicy(threshold=0.5, soft=False)
    # row 0: masks at 1..4; the prefix stops at the first mask under 0.5 (position 3): 1, 2 commit, and the
    # active position 0 (decoded earlier) is re-predicted. row 1: nothing confident: the leftmost mask only.
    tokens = [[5, MASK, MASK, MASK, MASK], [MASK, MASK, 1, 1, 1]]
    active = [[True, True, True, True, True], [True, True, False, False, False]]
    z = _logits([[6, 7, 8, 2, 3], [4, 4, 4, 4, 4]], [[0.6, 0.9, 0.55, 0.4, 0.95], [0.2, 0.3, 0.9, 0.9, 0.9]])
    sel = policy.select(z, _state(tokens, active))
    assert sel.commit.tolist() == [[True, True, True, False, False], [True, False, False, False, False]]
    assert sel.tokens.tolist() == [[6, 7, 8, MASK, MASK], [4, MASK, 1, 1, 1]]
    assert sel.memory["done"].tolist() == [False, False]
    assert sel.embeds is None  # soft=False: the next forward takes the ids

    # no mask left: every active position is re-predicted; the block converges when every active max-prob
    # is >= 0.9 (row 0), or when nothing changes (row 1, inactive positions ignored)
    tokens = [[6, 7, 8, 2, 3], [4, 4, 1, 1, 1]]
    z = _logits([[6, 7, 1, 2, 3], [4, 4, 0, 0, 0]], [[0.95, 0.9, 0.91, 0.99, 0.9], [0.3, 0.3, 0.9, 0.9, 0.9]])
    sel = policy.select(z, _state(tokens, active))
    assert sel.commit.tolist() == active
    assert sel.tokens.tolist() == [[6, 7, 1, 2, 3], [4, 4, 1, 1, 1]]
    assert sel.memory["done"].tolist() == [True, True]
    # a changing block stops after block_length forwards
    z = _logits([[1, 1, 1, 1, 1], [5, 5, 0, 0, 0]], [[0.5] * 5, [0.5] * 5])
    last = policy.select(z, _state(tokens, active, step=4, L=5))
    assert last.memory["done"].tolist() == [True, True]
    assert policy.select(z, _state(tokens, active, step=3, L=5)).memory["done"].tolist() == [
        False,
        False,
    ]


def test_soft_embedding_is_the_norm_preserving_mix():
    torch.manual_seed(0)
    E = torch.randn(10, 6)
    embed = torch.nn.functional.embedding
    tokens = [[5, MASK, MASK]]
    active = [[False, True, True]]  # position 0: the prompt tail, never active
    z = _logits([[5, 7, 3]], [[0.99, 0.8, 0.3]])
    st = _state(tokens, active, embed=lambda ids: embed(ids, E), mask_embedding=E[MASK])
    sel = SoftParallelPolicy(threshold=0.5).select(z, st)
    assert sel.tokens.tolist() == [[5, 7, MASK]]
    got = sel.embeds[0]
    c = 0.8
    mix = c * E[7] + (1 - c) * E[MASK]
    want = mix / mix.norm() * (c * E[7].norm() + (1 - c) * E[MASK].norm())
    torch.testing.assert_close(got[1], want, atol=1e-5, rtol=0)
    assert torch.equal(got[0], E[5]) and torch.equal(got[2], E[MASK])  # hard: prompt and still-masked
    hard = soft_embeddings(st, sel.tokens, torch.zeros(1, 3, dtype=torch.bool), sel.tokens, torch.zeros(1, 3))
    assert torch.equal(hard[0], E[[5, 7, MASK]])


# -- the engine's capabilities -------------------------------------------------------------------------


@dataclass
class HardEmbeds(SoftParallelPolicy):
    """SPD with hard embeddings handed over as embeddings (not ids): must be the ids' run bit for bit."""

    name = "spd-hard-embeds"

    def select(self, logits, state):
        sel = super().select(logits, state)
        return sel._replace(embeds=state.embed(sel.tokens))


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("d", FAMILIES, ids=lambda d: d.name)
def test_a_window_on_its_embeddings_is_its_ids(d, cache):
    m = model(d)
    prompts = list(oracles(d)["prompts"].values())
    rows = [prompts[0], prompts[-1][:5], (prompts[-1] + prompts[0])[:13]]  # left-padded batch
    kw = dict(gen_length=16, block_length=8, cache=cache)
    ids = generate(m, rows, SoftParallelPolicy(threshold=0.3, soft=False), **kw)
    seen = []
    handle = m.register_forward_pre_hook(
        lambda _, a, k: seen.append(k.get("inputs_embeds") is not None), with_kwargs=True
    )
    try:
        emb = generate(m, rows, HardEmbeds(threshold=0.3, soft=False), **kw)
    finally:
        handle.remove()
    assert any(seen) and not all(seen)  # the engine ran the embeddings (a block's first forward runs ids)
    assert emb.sequences.tolist() == ids.sequences.tolist()
    assert emb.nfe.tolist() == ids.nfe.tolist() and emb.decode_step.tolist() == ids.decode_step.tolist()
    assert emb.revisions.tolist() == ids.revisions.tolist()


@pytest.mark.parametrize("d", DEFAULT_DIRS, ids=lambda d: d.name)
def test_soft_embeddings_reach_their_columns(d):
    """full / prefix / dual calls over two rows of different lengths, one running its window on random
    embeddings: the logits of running the whole canvas from embeddings, row by row."""
    m = model(d)
    torch.manual_seed(1)
    p = list(oracles(d)["prompts"].values())
    mask, L = m.config.mask_token_id, 8
    x = [torch.tensor([p[0] + [mask] * 16]), torch.tensor([p[-1][:5] + [mask] * 16])]
    starts = [len(p[0]) + 8, 5]  # different blocks
    soft = [m.embed(x[0][0, :L]) + 0.05 * torch.randn(L, m.embed(x[0]).shape[-1]), None]
    want, caches = [], []  # and the caches of the same canvases (prefix and dual calls read them)
    for xi, s, e in zip(x, starts, soft):
        emb = m.embed(xi)
        if e is not None:
            emb[0, s : s + L] = e
        out = m.denoise(None, inputs_embeds=emb, use_cache=True)
        want.append(out.logits[0, s : s + L])
        caches.append(out.past_key_values)
    for kind in ("full", "prefix", "dual"):
        seqs = [Seqs(xi, KVCache(c.layers), s, s + L, e) for xi, c, s, e in zip(x, caches, starts, soft)]
        if kind == "full":
            got = full_forward(m, seqs, 0, False)[0]
        elif kind == "prefix":  # a prefix cache from the row's own canvas: exact for the prefix columns
            seqs = [replace(q, kv=q.kv.truncate(q.start - m.logit_shift)) for q in seqs]
            got = prefix_forward(m, seqs, 0)
        else:
            got = dual_forward(m, seqs, 0)
        for i in range(2):
            torch.testing.assert_close(got[i][0], want[i], atol=2e-5, rtol=0, msg=f"{kind} row {i}")


@dataclass
class FoldedLLaDA2(LLaDA2Policy):
    """LLaDA2's rule with the block store folded into the next block's first forward."""

    name = "llada2-folded"
    folds_store = True


@pytest.mark.parametrize("d", BLOCK_DIRS, ids=lambda d: d.name)
def test_folded_store_is_the_store_forward_without_its_nfe(d):
    m = model(d)
    for prompt in oracles(d)["prompts"].values():
        for B in (4, 8):
            kw = dict(gen_length=24, block_length=B, cache="prefix")
            plain = generate(m, [prompt], LLaDA2Policy(threshold=0.9, steps=4), **kw)
            folded = generate(m, [prompt], FoldedLLaDA2(threshold=0.9, steps=4), **kw)
            assert folded.sequences.tolist() == plain.sequences.tolist()
            blocks = -(-(len(prompt) + 24) // B) - len(prompt) // B  # one store forward each, none when folded
            assert int(plain.nfe[0]) - int(folded.nfe[0]) == blocks


@pytest.mark.parametrize("d", BLOCK_DIRS, ids=lambda d: d.name)
def test_short_prompt_prefill_and_block_keeping_early_stop(d):
    """dInfer's loop quirks: a prompt shorter than a block costs one prefill forward; the early stop keeps
    the finished block whole and fills after it."""
    m = model(d)
    prompt = next(iter(oracles(d)["prompts"].values()))[:3]
    eos = int(m.config.eos_token_id)
    kw = dict(gen_length=29, block_length=8, cache="prefix", eos_ids=(eos,))
    plain = generate(m, [prompt], "spd:0.5", **kw)
    short = generate(m, [prompt], "spd:0.5", quirk_prefill_short_prompt=True, **kw)
    assert int(short.nfe[0]) == int(plain.nfe[0]) + 1 and short.sequences.tolist() == plain.sequences.tolist()
    answer = plain.answers[0].tolist()
    stop_at = answer[2]  # a token of the first block: stopping on it ends the row after that block
    keep = generate(
        m, [prompt], "spd:0.5", early_stop=True, quirk_early_stop_keeps_block=True, **{**kw, "eos_ids": (stop_at,)}
    )
    cut = generate(m, [prompt], "spd:0.5", early_stop=True, **{**kw, "eos_ids": (stop_at,)})
    end = 8 - len(prompt)  # the first block's end, answer-relative
    got = keep.answers[0].tolist()
    assert got[:end] == answer[:end] and set(got[end:]) == {stop_at}
    first = answer.index(stop_at)
    assert cut.answers[0].tolist()[: first + 1] == answer[: first + 1] and set(cut.answers[0].tolist()[first:]) == {
        stop_at
    }
    assert bool(keep.finished_early[0]) and keep.decode_step[0, end:].eq(0).all()


# -- batch == single ------------------------------------------------------------------------------------

OTHERS = {"llada-tiny-a": ["threshold:0.9", "entropy:0.5"], "dream-tiny-a": ["threshold:0.9", "entropy-dream:0.5"]}
SPD = ["spd:0.5", "spd:threshold=0.0", "spd:0.7,soft=false", "spd:threshold=0.3,convergence=0.8"]


def _requests(d, rng: random.Random, n: int) -> list[Request]:
    prompts = list(oracles(d)["prompts"].values())
    block_model = d in BLOCK_DIRS
    others = OTHERS.get(d.name, ["threshold:0.9", "llada2:threshold=0.9,steps=4"])
    out = []
    for i in range(n):
        p = rng.choice(prompts)
        gen, block = rng.choice([(16, 8), (16, 4), (24, 8), (12, 4)] + ([(12, 8), (8, 16)] if block_model else []))
        spec = rng.choice(SPD + SPD + others + (["spd:threshold=0.5,temperature=0.8"] if i % 3 == 0 else []))
        seed = rng.randint(0, 10**6) if "temperature" in spec or rng.random() < 0.3 else None
        out.append(
            Request(
                prompt=p[: rng.randint(2, len(p))],
                policy=spec,
                gen_length=gen,
                block_length=block,
                cache=rng.choice(["none", "prefix", "dual"]),
                seed=seed,
                early_stop=rng.random() < 0.4,
                quirks=Quirks(prefill_short_prompt=rng.random() < 0.3, early_stop_keeps_block=rng.random() < 0.3),
                id=i,
            )
        )
    return out


@pytest.mark.parametrize("d", FAMILIES, ids=lambda d: d.name)
def test_spd_mixed_with_other_policies_equals_alone(d):
    m = model(d)
    rng = random.Random(sum(map(ord, d.name)))
    reqs = _requests(d, rng, 10)
    engine = Engine(m, max_batch=4, max_padding=float("inf"))
    results, _ = run_with_arrivals(engine, reqs, rng)
    assert any(results[r.id].revisions for r in reqs), "no request revised a token"
    for r in reqs:
        one = alone(m, r)
        assert_same(results[r.id], one, f"request {r.id} ({r.policy}, cache {r.cache})")
        assert (results[r.id].revisions, results[r.id].revised) == (one.revisions, one.revised)
    assert engine.rounds < sum(results[r.id].nfe for r in reqs) / 2  # rows really share rounds


# -- figures and text -------------------------------------------------------------------------------------


def test_revised_fraction_figures():
    d = BLOCK_DIRS[0]
    m = model(d)
    out = generate(m, list(oracles(d)["prompts"].values())[:2], "spd:0.5", gen_length=24, block_length=8)
    assert (out.revised > 0).all() and (out.revisions >= out.revised).all()
    committed = (out.decode_step > 0).sum(-1)
    assert torch.allclose(out.revised_fraction, out.revised.double() / committed)
    plain = generate(m, list(oracles(d)["prompts"].values())[:2], "threshold:0.9", gen_length=24, block_length=8)
    assert plain.revisions.tolist() == [0, 0] and plain.revised_fraction.tolist() == [0.0, 0.0]


def test_text_is_final_only_when_its_block_closes():
    """Streamed text is append-only: the deltas of a revising request add up to its final text, and no delta
    ever holds a token of a block that was still open."""
    from fewstep.assets import resolve_model
    from fewstep.decoding.text import Canvas, Delta, GenerationSettings, TextGenerator

    d = resolve_model("dparallel")
    m, tok = fewstep.load_model(d), fewstep.load_tokenizer(d)
    gen = TextGenerator(m, tok)
    events: list = []
    settings = GenerationSettings(policy="spd:0.5", max_tokens=64, block_length=32)
    comp = gen.generate(["5 + 9 - 1 - 7 + 1 ?"], settings, on_event=events.append, canvas=True)[0]
    assert comp.revisions > 0 and comp.stats()["revised_fraction"] > 0
    assert "".join(e.text for e in events if isinstance(e, Delta)) == comp.text
    first_delta = next(i for i, e in enumerate(events) if isinstance(e, Delta))
    block0 = [i for i, e in enumerate(events) if isinstance(e, Canvas) and e.block == 0]
    assert any(events[i].revised for i in block0)  # block 0 revised tokens it had committed ...
    assert first_delta > block0[-1]  # ... and its text became final only once it closed


# -- the trace shows revisions ------------------------------------------------------------------------------


def test_trace_marks_revisions():
    """generate(trace=True), its JSON document and its rendering: a revision is a step's ``revised`` position,
    replacing a decoded token; replaying the trace gives the final answer and the revision count."""
    from rich.color import ColorSystem
    from rich.console import Console
    from rich.style import Style

    from fewstep.decoding.trace import REVISED_STYLE, render_steps, row_steps, trace_json

    d = BLOCK_DIRS[0]
    m = model(d)
    mask = m.config.mask_token_id
    out = generate(
        m, [next(iter(oracles(d)["prompts"].values()))], "spd:0.5", gen_length=24, block_length=8, trace=True
    )
    steps = row_steps(out, 0)
    canvas = [mask] * 24
    events = 0
    for s in steps:
        for p, t in zip(s["positions"], s["tokens"]):
            assert (canvas[p] not in (mask, t)) == (p in s["revised"])  # revised = a decoded token replaced
            canvas[p] = t
        events += len(s["revised"])
    assert canvas == out.answers[0].tolist() and events == int(out.revisions[0]) > 0
    doc = trace_json(out)
    assert doc["rows"][0]["revisions"] == events and doc["rows"][0]["revised"] == int(out.revised[0])
    buf = io.StringIO()
    render_steps(steps, 24, None, mask, Console(file=buf, force_terminal=True, color_system="standard", width=400))
    shown = buf.getvalue()
    assert "~" in shown  # the revision count of a step's header
    assert (
        Style.parse(REVISED_STYLE).render("x", color_system=ColorSystem.STANDARD).split("x")[0] in shown
    )  # revised now
    assert "\x1b[4m" in shown  # changed by a revision earlier: underlined


def test_cli_trace_shows_revisions(tmp_path, capsys):
    from fewstep.cli import main

    trace = tmp_path / "trace.json"
    args = ["generate", "--model", "dparallel", "--prompt", "5 + 9 - 1 - 7 + 1 ?", "--policy", "spd:0.5"]
    assert main([*args, "--gen-length", "64", "--block-length", "32", "--trace", "--trace-json", str(trace)]) == 0
    text = capsys.readouterr().out
    assert "revisions (" in text and "~" in text
    import json

    row = json.loads(trace.read_text())["rows"][0]
    assert row["revisions"] == sum(len(s["revised"]) for s in row["steps"]) > 0
