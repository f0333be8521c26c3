"""Loss-oracle parity: dParallel masking and certainty-forcing loss, CD4LM collator, loss and λ schedule.

Every item of ``oracles.json → loss_oracles`` of every fixture directory is one test; ids, shapes,
seeds and hyper-parameters are read from the json. Directories without loss oracles contribute none.
Masks and batches must match exactly, loss values with rtol 1e-4 (fixtures README, "How to use").
"""

from __future__ import annotations

import copy
import random
import re

import pytest
import torch

from fewstep.distill.cd4lm import PAPER_MAX_LENGTH, CD4LMObjective, CD4LMRecipe, collate_nested, lambda_cosine_schedule
from fewstep.distill.dparallel import DParallelObjective, DParallelRecipe, complementary_masks
from fewstep.train.objective import SpecialIds
from tests.parity.fixtures import model, oracles, params

RTOL = 1e-4


def _loss_oracles(d) -> dict:
    return oracles(d).get("loss_oracles", {})


def _special_ids(d) -> SpecialIds:
    s = oracles(d)["special_ids"]
    return SpecialIds(mask=s["mask"], eos=s["eos"], pad=s.get("pad", s["eos"]))


def _seeds(text: str) -> tuple[int, int]:
    """The Python and torch seeds of an oracle's ``rng`` description."""
    py = re.search(r"random\.seed\((\d+)\)", text)
    th = re.search(r"torch\.manual_seed\((\d+)\)", text)
    if not (py and th):
        raise AssertionError(f"cannot read the seeds from {text!r}")
    return int(py.group(1)), int(th.group(1))


def _close(got: float, want: float, what: str) -> None:
    assert got == pytest.approx(want, rel=RTOL, abs=1e-6), f"{what}: got {got}, oracle {want}"


# -- dParallel -----------------------------------------------------------------------------------------


def _dparallel_items(d):
    spec = _loss_oracles(d).get("dparallel_certainty_forcing")
    for case in (spec or {}).get("cases", []):
        yield f"dparallel-seed{case['seed']}", (spec, case)


def _view_mask_id(raw: torch.Tensor, mask: torch.Tensor, future_id: int) -> int:
    """The id the reference wrote at its span masks (read from its raw output, not assumed)."""
    ids = set(raw[mask].tolist()) - {future_id}
    assert len(ids) <= 1, f"several view mask ids in the raw output: {ids}"
    return ids.pop() if ids else future_id


def _reference_views(spec, case, view_mask_id):
    return complementary_masks(
        torch.tensor(spec["input_ids"]),
        spec["prompt_lengths"],
        mask_id=spec["mask_token_id_arg"],
        rng=random.Random(case["seed"]),
        generator=torch.Generator().manual_seed(case["seed"]),
        block_size=spec["block_size"],
        eps=spec["eps"],
        reference=True,
        view_mask_id=view_mask_id,
    )


@pytest.mark.parametrize(("fixture_dir", "item"), params(_dparallel_items))
def test_dparallel_masks(fixture_dir, item):
    spec, case = item
    mask = torch.tensor(case["masked_indices"]).bool()
    raw = torch.tensor(case["noisy_batch_raw"])
    view_id = _view_mask_id(raw, mask, spec["mask_token_id_arg"])
    got = _reference_views(spec, case, view_id)
    assert torch.equal(got.mask, mask)
    assert torch.equal(got.mask_rev, torch.tensor(case["masked_indices_rev"]).bool())
    assert torch.equal(got.noisy, raw)
    assert torch.equal(got.noisy_rev, torch.tensor(case["noisy_batch_rev_raw"]))
    # With the view mask id set to the model's mask id: the model inputs the harness fed the loss.
    mapped = _reference_views(spec, case, None)
    assert torch.equal(mapped.noisy, torch.tensor(case["noisy_batch_model_input"]))
    assert torch.equal(mapped.noisy_rev, torch.tensor(case["noisy_batch_rev_model_input"]))


@pytest.mark.parametrize(("fixture_dir", "item"), params(_dparallel_items))
def test_dparallel_losses(fixture_dir, item):
    spec, case = item
    hp = spec["trainer_hparams"]
    input_ids = torch.tensor(spec["input_ids"])
    recipe = DParallelRecipe(
        block_size=hp.get("block_size_used", spec["block_size"]),
        temperature=hp["temperature"],
        entropy_weight=hp["entropy_weight"],
        reference_masking=True,
    )
    objective = DParallelObjective(_special_ids(fixture_dir), input_ids.shape[1], recipe)
    batch = {
        "input_ids": input_ids,
        "prompt_lengths": torch.tensor(spec["prompt_lengths"]),
        "noisy": torch.tensor(case["noisy_batch_model_input"]),
        "noisy_rev": torch.tensor(case["noisy_batch_rev_model_input"]),
        "mask": torch.tensor(case["masked_indices"]).bool(),
        "mask_rev": torch.tensor(case["masked_indices_rev"]).bool(),
    }
    with torch.no_grad():
        total, logs = objective.loss(model(fixture_dir), batch, step=0, max_steps=1)
    for ours, theirs in [
        ("ce", "ce_loss"),
        ("ce_rev", "ce_loss_rev"),
        ("entropy", "entropy_loss"),
        ("entropy_rev", "entropy_loss_rev"),
    ]:
        _close(logs[ours], case[theirs], theirs)
    assert logs["num_correct"] == case["num_correct"]
    assert logs["num_correct_rev"] == case["num_correct_rev"]
    _close(float(total), case["total_loss"], "total_loss")
    _close(logs["loss"], case["total_loss"], "logged total")


# -- CD4LM ---------------------------------------------------------------------------------------------


def _cd4lm_items(d):
    spec = _loss_oracles(d).get("cd4lm_consistency")
    if not spec:
        return
    if "batch" in spec:
        yield "cd4lm-collator", spec
    for i, case in enumerate(spec.get("cases", []), start=1):
        yield f"cd4lm-case{i}", (spec, case)


def _lambda_items(d):
    spec = _loss_oracles(d).get("cd4lm_consistency") or {}
    for key, values in spec.get("lambda_cosine_schedule", {}).items():
        yield f"cd4lm-lambda-{key.split('(')[0]}", (key, values)


def _whitespace_ids(text: str) -> list[int]:
    """The oracle's tokenizer: whitespace-separated integer ids, no special tokens added."""
    return [int(t) for t in text.split()]


@pytest.mark.parametrize(
    ("fixture_dir", "item"),
    [p for p in params(_cd4lm_items) if p.id.endswith("cd4lm-collator")],
)
def test_cd4lm_collator(fixture_dir, item):
    spec = item
    collator = spec["collator"]
    if not collator.get("use_nested_masking", True):
        pytest.skip("only the nested-masking collator is implemented (the reference's shipped path)")
    ids = _special_ids(fixture_dir)
    py_seed, torch_seed = _seeds(collator["rng"])
    examples = spec["examples"]
    # The reference tokenizes f"{q} {a}" and takes len(tokenize(f"{q} ")) as the answer start.
    seqs = [_whitespace_ids(f"{ex['question']} {ex['answer']}") for ex in examples]
    conds = [len(_whitespace_ids(f"{ex['question']} ")) for ex in examples]
    got = collate_nested(
        seqs,
        conds,
        mask_id=ids.mask,
        pad_id=ids.pad,
        rng=random.Random(py_seed),
        generator=torch.Generator().manual_seed(torch_seed),
    )
    for key, want in spec["batch"].items():
        assert torch.equal(got[key], torch.tensor(want)), key
    # The nested property on the oracle batch itself: every teacher mask is a student mask.
    student = got["input_ids"] == ids.mask
    teacher = got["teacher_consistency_input_ids"] == ids.mask
    assert not bool((teacher & ~student).any())


def _student_for(case: dict, base: torch.nn.Module) -> torch.nn.Module:
    """The case's student: the model itself, or a copy with the named parameter negated."""
    found = re.search(r"with (\S+) negated", case["case"])
    if not found:
        return base
    student = copy.deepcopy(base)
    named = dict(student.named_parameters())
    name = found.group(1)
    # The name may be the module path or the checkpoint key (e.g. ``model.transformer.ff_out.weight``).
    key = name if name in named else student.module_key(name) or student.module_key(f"model.transformer.{name}")
    if key not in named:
        raise AssertionError(f"the case negates {name!r}, which this model does not have")
    with torch.no_grad():
        named[key].neg_()
    return student


@pytest.mark.parametrize(
    ("fixture_dir", "item"),
    [p for p in params(_cd4lm_items) if not p.id.endswith("cd4lm-collator")],
)
def test_cd4lm_loss(fixture_dir, item):
    spec, case = item
    teacher = model(fixture_dir)
    student = _student_for(case, teacher)
    batch = {k: torch.tensor(v) for k, v in spec["batch"].items()}
    recipe = CD4LMRecipe(temperature=case["temperature"], lam=case["lambda"])
    objective = CD4LMObjective(_special_ids(fixture_dir), PAPER_MAX_LENGTH, recipe)
    with torch.no_grad():
        total, logs = objective.loss(student, batch, step=0, max_steps=1, teacher=teacher)
    _close(float(total), case["total_loss"], "total_loss")
    _close(logs["consistency"], case["loss_consistency"], "loss_consistency (clamped)")
    _close(logs["reconstruction"], case["loss_reconstruction"], "loss_reconstruction (clamped)")
    _close(logs["consistency_unclamped"], case["loss_consistency_unclamped"], "loss_consistency_unclamped")
    _close(logs["reconstruction_unclamped"], case["loss_reconstruction_unclamped"], "loss_reconstruction_unclamped")


@pytest.mark.parametrize(("fixture_dir", "item"), params(_lambda_items))
def test_cd4lm_lambda_schedule(fixture_dir, item):
    key, values = item
    kw = dict(re.findall(r"(\w+)=([-+\d.eE]+)", key))
    for step, want in values:
        got = lambda_cosine_schedule(
            step,
            int(kw["max_steps"]),
            warmup_ratio=float(kw["warmup_ratio"]),
            initial=float(kw["initial"]),
            final=float(kw["final"]),
        )
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), f"step {step}"
