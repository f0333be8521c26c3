"""DMax's On-Policy Uniform Training against the official code (``oracles_dmax.json``, ``oput``).

Every case of every fixture directory that has the file runs (``FEWSTEP_FIXTURES``; a directory without it
contributes nothing), with ids, shapes, seeds, block sizes and flags read from the file:

* the data: ``input_ids`` (EOS-padded), ``labels`` (32-EOS rule) and ``noisy_input_ids`` from the recorded
  seed (dFactory's draws: ``torch.rand(1)`` then ``torch.rand(max_seq_len)``), exactly;
* the on-policy rollout (``[x_t ; x_0]``, eval mode, no grad, argmax at every mask): ``x_t_after_rollout``
  exactly, plus the argmax at the masks and the counts;
* the loss with same-token and with shifted labels, rtol 1e-4 (the fixtures README's tolerance).
"""

from __future__ import annotations

import pytest
import torch

from fewstep.distill.dmax import BlockDiffusionDMaxObjective, BlockDMaxRecipe
from fewstep.train.objective import SpecialIds
from tests.parity.fixtures import dmax_oracles, fixture_dirs, model, params

RTOL = 1e-4


def _oput_items(d):
    oracle = dmax_oracles(d)
    for case in (oracle or {}).get("oput", {}).get("cases", []):
        yield case["id"], case


CASES = params(_oput_items)


def _objective(d, case: dict, same_token: bool = True) -> BlockDiffusionDMaxObjective:
    oput, special = dmax_oracles(d)["oput"], dmax_oracles(d)["special_ids"]
    # data_transform.py's end token is the tokenizer's pad id (the stand-in's: the fixture's EOS)
    end = oput["tokenizer_stand_in"]["pad_token_id"]
    ids = SpecialIds(mask=special["mask"], eos=end, pad=special["pad"])
    low, high = oput["noise_range"]
    recipe = BlockDMaxRecipe(
        block_size=case["block_size"], noise_range_low=low, noise_range_high=high, shifted_labels=not same_token
    )
    # per_sequence False: one micro-batch of one row, the official mean over its labels
    return BlockDiffusionDMaxObjective(ids, oput["max_seq_len"], recipe, per_sequence=False)


def _example(d, case: dict) -> dict:
    ex = dmax_oracles(d)["oput"]["examples"][case["example"]]
    return {"prompt_ids": ex["question"], "response_ids": ex["answer"], "flag": case["flag"]}


def _recorded_batch(case: dict, mask_id: int) -> dict[str, torch.Tensor]:
    """The recorded micro-batch (the noised view as the official transform drew it)."""
    noisy = torch.tensor([case["noisy_input_ids"]])
    flag = torch.tensor([case["flag"]])
    return {
        "input_ids": torch.tensor([case["input_ids"]]),
        "noisy_input_ids": noisy,
        "labels": torch.tensor([case["labels"]]),
        "fill": (noisy == mask_id) & flag[:, None],
        "flag": flag,
    }


def test_every_oput_case_is_collected():
    want = sum(len((dmax_oracles(d) or {}).get("oput", {}).get("cases", [])) for d in fixture_dirs())
    assert len(CASES) == want
    assert all(dmax_oracles(d) is None or len(dmax_oracles(d)["oput"]["cases"]) > 0 for d in fixture_dirs())


@pytest.mark.parametrize("fixture_dir,case", CASES)
def test_oput_data(fixture_dir, case):
    """Padding, labels and σ-noise of ``process_mdm_sft_example``, from the recorded seed."""
    objective = _objective(fixture_dir, case)
    batch = objective.collate([_example(fixture_dir, case)], torch.Generator().manual_seed(case["seed"]))
    assert batch["input_ids"][0].tolist() == case["input_ids"]
    assert batch["labels"][0].tolist() == case["labels"]
    assert batch["noisy_input_ids"][0].tolist() == case["noisy_input_ids"]
    assert int((batch["labels"] != -100).sum()) == case["num_label_positions"]
    masked = (batch["noisy_input_ids"][0] == objective.ids.mask).nonzero().squeeze(1).tolist()
    assert masked == case["masked_positions"]
    assert bool(batch["fill"].any()) == (case["flag"] and bool(masked))


@pytest.mark.parametrize("fixture_dir,case", CASES)
def test_oput_rollout_and_loss(fixture_dir, case):
    m = model(fixture_dir)
    m.train()  # the trainer's state: the rollout switches to eval mode and back
    objective = _objective(fixture_dir, case)
    batch = _recorded_batch(case, objective.ids.mask)
    x_t = objective.on_policy_input(m, batch)
    assert m.training
    assert x_t[0].tolist() == case["x_t_after_rollout"]
    clean, noisy = batch["input_ids"][0], batch["noisy_input_ids"][0]
    if case["flag"]:
        at = noisy == objective.ids.mask
        assert x_t[0][at].tolist() == case["rollout_argmax_at_masked"]
        assert int((x_t[0][at] != clean[at]).sum()) == case["filled_tokens_differ_from_clean"]
    loss, logs = objective.loss(m, batch)
    assert float(loss) == pytest.approx(case["loss_same_token_labels"], rel=RTOL)
    assert logs["on_policy_rows"] == float(case["flag"])
    shifted, _ = _objective(fixture_dir, case, same_token=False).loss(m, batch)
    assert float(shifted) == pytest.approx(case["loss_shifted_labels"], rel=RTOL)
