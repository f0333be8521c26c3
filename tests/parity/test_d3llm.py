"""d3LLM parity: teacher trajectories, trajectory noisy states, ``DLMTrainer.compute_loss`` and curricula.

Every case of the ``trajectory_oracles``, ``noisy_state_oracles``, ``loss_oracles`` sections of every
fixture directory's ``oracles_d3llm.json`` is one test (directories without the file contribute none;
:func:`test_every_case_is_collected` fails if a case of the file is not collected). Ids, prompts, shapes,
seeds and hyper-parameters come from the json. Trajectories, draws, spans and masks must match exactly;
losses within 1e-5 relative (issue 20; the fixtures README allows 1e-4).
"""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch

import fewstep
from fewstep.decoding.policies import LowConfidencePolicy, Selection, parse_policy
from fewstep.decoding.policies.base import gumbel_argmax, quota_at, scatter, token_probs, top_k_mask
from fewstep.distill.d3llm import (
    D3LLMObjective,
    D3LLMRecipe,
    block_size_at,
    commit_rank,
    draw_mask_ratio,
    mask_ratio_floor,
    rank_table,
    reference_noisy_states,
    teacher_policy,
)
from fewstep.train.objective import SpecialIds
from tests.parity.fixtures import d3llm_oracles, fixture_dirs, model, params

RTOL = 1e-5
#: sections of oracles_d3llm.json that this module runs, and those test_d3llm_sampler.py runs (multi-block decoding)
SECTIONS = ("trajectory_oracles", "noisy_state_oracles", "loss_oracles")
ELSEWHERE = ("sampler_cases",)


def _file(d) -> dict:
    return d3llm_oracles(d) or {}


def _mask_id(d) -> int:
    return int(_file(d)["special_ids"]["mask"])


class LoggedRandom(random.Random):
    """``random.Random`` that records its ``randint`` draws as the oracles list them."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.calls: list[list] = []

    def randint(self, a: int, b: int) -> int:
        v = super().randint(a, b)
        self.calls.append(["randint", a, b, v])
        return v


def _positions(mask: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in mask]


# -- teacher trajectories --------------------------------------------------------------------------------


def _trajectory_items(d):
    for case in _file(d).get("trajectory_oracles", []):
        yield case["id"], case


@dataclasses.dataclass
class _CanvasNoiseLowConfidence(LowConfidencePolicy):
    """LLaDA low confidence whose Gumbel noise is the reference's: one ``torch.rand_like(logits, float64)``
    over the whole canvas per forward from torch's global RNG, read at the block's masked positions
    (fewstep's own policies draw per candidate from per-row streams)."""

    prompt_length: int = 0

    def select(self, logits: torch.Tensor, state) -> Selection:
        assert state.rows.numel() == 1, "one row: the reference's noise covers one canvas"
        noise = torch.rand((self.prompt_length + state.gen_length, logits.shape[-1]), dtype=torch.float64)
        lo = self.prompt_length + state.block * state.block_length
        z = logits[state.mask]
        x0 = gumbel_argmax(z, self.temperature, noise[lo : lo + state.block_length][state.mask[0]])
        conf = scatter(token_probs(z, x0, torch.float64), state.mask, float("-inf"))
        k = quota_at(state.memory["quota"], state.step, state.counts)
        return Selection(scatter(x0, state.mask, state.mask_id), top_k_mask(conf, k, state.mask))


def _teacher(d, case):
    a = case["args"]
    assert a["steps"] == a["gen_length"] and a["remasking"] == "low_confidence", "one token per forward"
    assert a["mask_id"] == _mask_id(d)
    pol = dataclasses.replace(parse_policy(teacher_policy("llada", a["gen_length"])), temperature=a["temperature"])
    if not case.get("rng_dependent"):
        return pol
    assert re.search(r"torch\.manual_seed\((\d+)\)", case["rng"]) and "rand_like" in case["rng"], case["rng"]
    prompt = _file(d)["prompts"][case["prompt"]]
    return _CanvasNoiseLowConfidence(**dataclasses.asdict(pol), prompt_length=len(prompt))


@pytest.mark.parametrize(("fixture_dir", "case"), params(_trajectory_items))
def test_teacher_trajectory(fixture_dir, case):
    a = case["args"]
    prompt = _file(fixture_dir)["prompts"][case["prompt"]]
    policy = _teacher(fixture_dir, case)
    if case.get("rng_dependent"):
        torch.manual_seed(case["seed"])
    out = fewstep.generate(
        model(fixture_dir),
        torch.tensor([prompt]),
        policy,
        gen_length=a["gen_length"],
        block_length=a["block_length"],
        quirk_mask_prediction=True,  # the reference's argmax may pick the mask id
    )
    assert out.sequences[0].tolist() == case["final_output_ids"]
    pi = commit_rank(out.decode_step[0].tolist())
    assert pi == case["commit_rank_pi"]
    if "model_calls" in case:
        assert int(out.nfe[0]) == case["model_calls"]
    final = torch.tensor(case["final_output_ids"])
    for s, snap in enumerate(case.get("snapshots", [])):  # trajectory[s] masks exactly π > s
        want = final.clone()
        want[len(prompt) :][torch.tensor(pi) > s] = _mask_id(fixture_dir)
        assert want.tolist() == snap, f"snapshot {s}"


# -- noisy states ----------------------------------------------------------------------------------------


def _rows(d, batch: str) -> list[dict]:
    rows = _file(d)["training_rows"]["rows"]
    picked = [rows[k] for k in rows if re.fullmatch(rf"{re.escape(batch)}_\d+", k)]
    assert picked, f"no training rows for batch {batch!r}"
    return picked


def _greedy_trajectory(d, prompt: str) -> dict:
    found = [
        t
        for t in _file(d)["trajectory_oracles"]
        if t["prompt"] == prompt and not t.get("rng_dependent") and t["args"]["temperature"] == 0
    ]
    assert len(found) == 1, f"{len(found)} greedy trajectories for {prompt!r}"
    return found[0]


def _row_trajectory(d, row: dict, length: int, *, reference: bool) -> tuple[torch.Tensor | None, int]:
    """The rank table and snapshot count of a training row (its teacher trajectory, checked against it)."""
    traj = _greedy_trajectory(d, row["trajectory"])
    p_traj = len(_file(d)["prompts"][row["trajectory"]])
    assert p_traj == row["P_traj"]
    p, full = row["prompt_length"], row["full_length"]
    generated = traj["final_output_ids"][p_traj:]
    assert row["input_ids"][p : full - 1] == generated[: full - 1 - p], "the row's response is the teacher's"
    pi = traj["commit_rank_pi"]
    table = rank_table(
        pi, length, p, trajectory_prompt_length=p_traj, past_canvas="masked", reference_offsets=reference
    )
    return table, len(pi)


def _noisy_items(d):
    for case in _file(d).get("noisy_state_oracles", []):
        yield case["id"], case


def _noisy_batch(d, case, *, reference: bool):
    batch = case["batch"].split(",")[0].strip()
    rows = _rows(d, batch)
    fallback = {int(r) for r in re.findall(r"row (\d+)", case.get("fallback", ""))}
    assert not case.get("fallback") or fallback, f"cannot read the fallback rows of {case['id']}"
    length = len(rows[0]["input_ids"])
    tables, steps = [], []
    for i, row in enumerate(rows):
        table, n = _row_trajectory(d, row, length, reference=reference)
        tables.append(None if i in fallback else table)
        steps.append(n)
    rng = LoggedRandom(case["seed"])
    views, spans = reference_noisy_states(
        torch.tensor([r["input_ids"] for r in rows]),
        [r["prompt_length"] for r in rows],
        [r["full_length"] for r in rows],
        tables,
        steps,
        block_size=case["block_size"],
        mask_ratio=case["mask_ratio"],
        mask_id=_mask_id(d),
        rng=rng,
        generator=torch.Generator().manual_seed(case["seed"]),
    )
    return rows, views, spans, rng.calls


@pytest.mark.parametrize(("fixture_dir", "case"), params(_noisy_items))
def test_noisy_states(fixture_dir, case):
    rows, views, spans, calls = _noisy_batch(fixture_dir, case, reference=True)
    assert calls == case["rng_calls"]
    if "segments" in case:  # the fallback cases record the selections only
        assert [[s.start, s.end] for s in spans] == case["segments"]
    for row, span, sel in zip(rows, spans, case["selections"]):
        p = row["prompt_length"]
        assert (span.start - p, span.end - p) == (sel["block_start_rel"], sel["block_end_rel"])
        assert span.snapshot in (None, sel["snapshot_index"])  # None: this row falls back to Bernoulli masks
    assert _positions(views.mask) == case["masked_positions"]
    assert _positions(views.mask_rev) == case["masked_positions_rev"]
    if "noisy_batch" in case:
        assert views.noisy.tolist() == case["noisy_batch"]
    # view 2's input: the clean row with the complementary positions and everything after the span masked
    clean = torch.tensor([r["input_ids"] for r in rows])
    want_rev = clean.masked_fill(views.mask_rev, _mask_id(fixture_dir))
    for i, span in enumerate(spans):
        want_rev[i, span.end :] = _mask_id(fixture_dir)
    assert torch.equal(views.noisy_rev, want_rev)
    variant = case.get("response_offset_variant_NOT_OFFICIAL")
    if variant is not None:
        _, intended, _, _ = _noisy_batch(fixture_dir, case, reference=False)
        assert _positions(intended.mask) == variant["masked_positions"]
        assert _positions(intended.mask_rev) == variant["masked_positions_rev"]
        same = _positions(intended.mask) == case["masked_positions"]
        assert same == variant["equals_official"]


# -- DLMTrainer.compute_loss -----------------------------------------------------------------------------


def _loss_items(d):
    for case in _file(d).get("loss_oracles", {}).get("dlm_trainer_compute_loss", []):
        yield case["id"], case


def _trajectory_dataset(d) -> list[dict]:
    """The trainer's trajectory dataset: the training rows in file order (the stand-in's description)."""
    spec = _file(d)["loss_oracles"]["stand_in_self"]["trajectory_dataset"]
    rows = list(_file(d)["training_rows"]["rows"].values())
    assert f"rows 0..{len(rows) - 1}" in spec, spec
    return rows


def _close(got: float, want: float, what: str) -> float:
    err = abs(got - want) / max(abs(want), 1e-12)
    assert err <= RTOL or abs(got - want) <= 1e-7, f"{what}: got {got}, oracle {want} (rel {err:.2e})"
    return err


@pytest.mark.parametrize(("fixture_dir", "case"), params(_loss_items))
def test_compute_loss(fixture_dir, case):
    hp = _file(fixture_dir)["loss_oracles"]["stand_in_self"]
    assert hp["use_complementary_loss"] and not hp["use_naive_random_mask"]
    state = case["trainer_state"]
    rng = LoggedRandom(case["seed"])
    floor = mask_ratio_floor(state["global_step"], state["max_steps"], hp["min_mask_ratio"], hp["max_mask_ratio"])
    ratio = draw_mask_ratio(rng.random(), floor, hp["max_mask_ratio"])  # random.uniform(floor, max)
    assert case["rng_calls"][0] == ["uniform", floor, hp["max_mask_ratio"], ratio]
    assert ratio == case["mask_ratio_drawn"]
    block = block_size_at(state["epoch"], hp["progressive_block_sizes"])
    assert block == case["block_size_used"]
    input_ids = torch.tensor(case["input_ids"])
    length = input_ids.shape[1]
    dataset = _trajectory_dataset(fixture_dir)
    tables, steps = [], []
    for idx in case["sample_idx"]:
        if idx >= len(dataset):  # past the dataset: no trajectory, Bernoulli fallback
            tables.append(None)
            steps.append(0)
            continue
        table, n = _row_trajectory(fixture_dir, dataset[idx], length, reference=True)
        tables.append(table)
        steps.append(n)
    views, spans = reference_noisy_states(
        input_ids,
        case["prompt_lengths"],
        case["full_lengths"],
        tables,
        steps,
        block_size=block,
        mask_ratio=ratio,
        mask_id=hp["mask_token_id"],
        rng=rng,
        generator=torch.Generator().manual_seed(case["seed"]),
    )
    assert rng.calls == case["rng_calls"][1:]
    assert [[s.start, s.end] for s in spans] == case["segments"]
    assert views.noisy.tolist() == case["noisy_batch"]
    assert _positions(views.mask) == case["masked_positions"]
    assert _positions(views.mask_rev) == case["masked_positions_rev"]
    ids = SpecialIds(mask=hp["mask_token_id"], eos=_file(fixture_dir)["special_ids"]["eos"], pad=0)
    recipe = D3LLMRecipe(temperature=hp["temperature"], entropy_weight=hp["entropy_weight"], entropy_views="first")
    objective = D3LLMObjective(ids, length, recipe, per_sequence=False)  # the reference's micro-batch means
    with torch.no_grad():
        total, logs = objective.views_loss(model(fixture_dir), input_ids, views)
    _close(logs["ce"], case["ce_loss"], "ce_loss")
    _close(logs["ce_rev"], case["ce_loss_rev"], "ce_loss_rev")
    _close(logs["entropy"], case["entropy_loss"], "entropy_loss")
    assert logs["num_correct"] == case["num_correct"]
    _close(float(total), case["total_loss"], "total_loss")


# -- curricula -------------------------------------------------------------------------------------------


def _curricula_items(d):
    spec = _file(d).get("loss_oracles", {}).get("curricula")
    for key in ("get_current_mask_ratio", "get_current_block_size"):
        if spec and key in spec:
            yield f"curricula-{key}", (key, spec[key])


@pytest.mark.parametrize(("fixture_dir", "item"), params(_curricula_items))
def test_curricula(fixture_dir, item):
    key, spec = item
    if key == "get_current_mask_ratio":
        lo, hi = spec["min_mask_ratio"], spec["max_mask_ratio"]
        for step, want in spec["values"]:  # listed rounded (10 digits); the loss cases check the exact floor
            assert mask_ratio_floor(step, spec["max_steps"], lo, hi) == pytest.approx(want, abs=1e-12), f"step {step}"
        if "max_steps_0_fallback" in spec:
            assert mask_ratio_floor(0, 0, lo, hi) == spec["max_steps_0_fallback"]
        return
    sizes = spec["progressive_block_sizes"]
    for epoch, want in spec["values"]:
        assert block_size_at(epoch, sizes) == want, f"epoch {epoch}"
    assert block_size_at(None, sizes) == spec["epoch_None"]
    # the objective spreads the list over the run: at max_steps = len(sizes) epochs of one step each, the
    # fractional epoch of step t is t
    objective = D3LLMObjective(SpecialIds(mask=0, eos=1, pad=1), 8, D3LLMRecipe(block_sizes=sizes))
    for step in range(len(sizes)):
        assert objective.curricula(step, len(sizes))[0] == block_size_at(float(step), sizes)


# -- completeness ----------------------------------------------------------------------------------------


def test_every_case_is_collected():
    """Each case of each fixture's oracles_d3llm.json is one collected test of this module (none filtered,
    none skipped), and the file holds no section this suite does not know."""
    collected = {
        "trajectory_oracles": params(_trajectory_items),
        "noisy_state_oracles": params(_noisy_items),
        "dlm_trainer_compute_loss": params(_loss_items),
        "curricula": params(_curricula_items),
    }
    for d in fixture_dirs():
        f = d3llm_oracles(d)
        if f is None:
            continue
        mine = {k: [p for p in v if p.values[0] == d] for k, v in collected.items()}
        losses = f.get("loss_oracles", {})
        want = {
            "trajectory_oracles": len(f.get("trajectory_oracles", [])),
            "noisy_state_oracles": len(f.get("noisy_state_oracles", [])),
            "dlm_trainer_compute_loss": len(losses.get("dlm_trainer_compute_loss", [])),
            "curricula": len([k for k in losses.get("curricula", {}) if k.startswith("get_current_")]),
        }
        assert {k: len(v) for k, v in mine.items()} == want, d.name
        known = {"dlm_trainer_compute_loss", "curricula", "stand_in_self"}
        assert set(losses) <= known, f"{d.name}: unknown loss oracles {set(losses) - known}"
        case_lists = {k for k, v in f.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        assert case_lists <= set(SECTIONS) | set(ELSEWHERE), f"{d.name}: unknown case lists {case_lists}"
