"""Parity of the block-diffusion families (LLaDA2-MoE, SDAR) beyond the plain logits (``test_logits.py``).

* cache logits: the exact cache of committed blocks (``denoise(cache_mode="prefix")``) against the
  recorded official cached forwards (atol 1e-4);
* dFactory's LLaDA2 dParallel losses: the noised batch (exact) and the certainty-forcing losses over the
  ``[noisy | clean]`` block-diffusion input (rtol 1e-4);
* the official samplers (``LLaDA2Policy``, ``SDARPolicy`` with their ``quirk_*`` options and the loop
  options ``eos_early_stop``, ``quirk_early_stop_scans_prompt``, ``quirk_unstored_blocks``) through
  :func:`fewstep.generate`, the one generation loop: identical output ids, NFE and decode steps on every
  recorded case (see ``docs/models.md``, "Block-diffusion decoding").

Every id, shape and setting is read from ``config.json`` / ``oracles.json`` / ``oracle_arrays.npz``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fewstep
from fewstep.decoding.policies import LLaDA2Policy, SDARPolicy
from fewstep.distill.blockdiff import block_diffusion_logits, mdm_noise
from fewstep.distill.dparallel import block_certainty_forcing_loss
from tests.parity.fixtures import arrays, model, oracles, params

ATOL, RTOL = 1e-4, 1e-4
BLOCK_SAMPLERS = ("dfactory.generate", "sdar.block_diffusion_generate")


# -- cache logits ----------------------------------------------------------------------------------------


def _cache_items(d):
    spec = oracles(d).get("cache_logits") or {}
    if "block_length" not in spec:
        return
    blocks = spec.get("blocks") or [spec["block"]]
    names = ["cache_block_logits", "cache_next_block_logits"][: len(blocks)]
    for name, (lo, hi) in zip(names, blocks):
        if name in arrays(d):
            yield name, (spec, lo, hi, name)


@pytest.mark.parametrize(("fixture_dir", "item"), params(_cache_items))
def test_block_cache_logits(fixture_dir, item):
    spec, lo, hi, name = item
    ids = torch.from_numpy(arrays(fixture_dir)[f"logits_{spec['input']}_input_ids"]).long()
    m = model(fixture_dir)
    saved, m.block_length = m.block_length, spec["block_length"]
    try:
        with torch.no_grad():
            cache = m(ids[:, : spec["prefix"]], use_cache=True).past_key_values
            if lo > spec["prefix"]:  # the blocks before this one were stored (SDAR's store_kv=True call)
                cache = m.denoise(ids[:, :lo], start=spec["prefix"], cache=cache, cache_mode="prefix", use_cache=True)
                cache = cache.past_key_values
            got = m.denoise(ids[:, :hi], start=lo, cache=cache, cache_mode="prefix").logits
            full = m(ids[:, :hi]).logits[:, lo:hi]
    finally:
        m.block_length = saved
    np.testing.assert_allclose(got.numpy(), arrays(fixture_dir)[name], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.numpy(), full.numpy(), atol=1e-5, rtol=0)  # the cache is exact


# -- dFactory certainty-forcing losses -------------------------------------------------------------------


def _loss_items(d):
    spec = (oracles(d).get("loss_oracles") or {}).get("dfactory_llada2_certainty_forcing")
    for case in (spec or {}).get("cases", []):
        yield f"dfactory-seed{case['seed']}", (spec, case)


@pytest.mark.parametrize(("fixture_dir", "item"), params(_loss_items))
def test_dfactory_noise(fixture_dir, item):
    spec, case = item
    noisy, labels = mdm_noise(
        torch.tensor(spec["input_ids"]),
        spec["prompt_lengths"],
        spec["mask_token_id_arg"],
        torch.Generator().manual_seed(case["seed"]),
        tuple(spec["noise_range"]),
    )
    assert noisy.tolist() == case["noisy_input_ids"]
    assert labels.tolist() == case["labels"]


@pytest.mark.parametrize(("fixture_dir", "item"), params(_loss_items))
def test_dfactory_losses(fixture_dir, item):
    spec, case = item
    m = model(fixture_dir)
    clean, noisy, labels = (torch.tensor(x) for x in (spec["input_ids"], case["noisy_input_ids"], case["labels"]))
    with torch.no_grad():
        logits = block_diffusion_logits(m, noisy, clean, spec["block_size"])
        plain = m(clean, block_length=0).logits  # block_diffusion_mode=false: clean input, no mask
    same = block_certainty_forcing_loss(logits, labels)
    shifted = block_certainty_forcing_loss(logits, labels, same_token=False)
    assert same["num_correct"] == case["num_correct_argmax"]
    assert float(same["consistency"]) == pytest.approx(case["consistency_loss_same_token"], rel=RTOL)
    assert float(shifted["consistency"]) == pytest.approx(case["consistency_loss_shifted"], rel=RTOL)
    assert float(same["confidence"]) == pytest.approx(case["confidence_loss"], rel=RTOL, abs=1e-7)
    for key, want in case["combined_loss"].items():
        beta = float(key.removeprefix("beta_"))
        got = block_certainty_forcing_loss(logits, labels, confidence_beta=beta)["total"]
        assert float(got) == pytest.approx(want, rel=RTOL)
    nbd = block_certainty_forcing_loss(plain, labels)
    assert float(nbd["consistency"]) == pytest.approx(
        case["non_block_diffusion_mode"]["consistency_loss_same_token"], rel=RTOL
    )
    assert float(nbd["confidence"]) == pytest.approx(case["non_block_diffusion_mode"]["confidence_loss"], abs=1e-7)


# -- the official samplers' rules ------------------------------------------------------------------------


def _sampler_items(d):
    for case in oracles(d).get("sampler_cases", []):
        if case["sampler"] in BLOCK_SAMPLERS and not case.get("rng_dependent"):
            yield case["id"], case


def _policy(case: dict) -> LLaDA2Policy | SDARPolicy:
    a = case["args"]
    if case["sampler"] == "dfactory.generate":
        return LLaDA2Policy(threshold=a["threshold"], steps=a["steps"], minimal_topk=a.get("minimal_topk", 1))
    eb = a.get("eb_threshold")
    return SDARPolicy(
        remasking_strategy=a["remasking_strategy"],
        denoising_steps=a["denoising_steps"],
        confidence_threshold=a["confidence_threshold"],
        eb_threshold=0.35 if eb is None else eb,
        quirk_uncapped_topk=True,
        quirk_row_entropy=True,
        quirk_iteration_cap=True,
    )


def _skip_tie_break(d, case) -> None:
    if case.get("tie_break_dependent") and oracles(d).get("torch") != torch.__version__:
        pytest.skip("tie_break_dependent: torch.topk/sort tie order of another torch version")


@pytest.mark.parametrize(("fixture_dir", "case"), params(_sampler_items))
def test_official_sampler_engine(fixture_dir, case):
    """Every recorded case through fewstep.generate (LLaDA2: no cache, as the official; SDAR: the exact cache)."""
    _skip_tie_break(fixture_dir, case)
    a, m = case["args"], model(fixture_dir)
    prompt = torch.tensor([oracles(fixture_dir)["prompts"][case["prompt"]]])
    P = prompt.shape[1]
    if case["sampler"] == "dfactory.generate":
        opts = dict(cache="none", eos_ids=(a["eos_id"],), early_stop=True, eos_early_stop=a["eos_early_stop"])
        opts["quirk_early_stop_scans_prompt"] = True
        want, stop_ids = case["output_ids"], (a["eos_id"],)
    else:
        stop = a["stopping_criteria_idx"]
        opts = dict(cache="prefix", eos_ids=tuple(stop or ()), early_stop=bool(stop), quirk_unstored_blocks=True)
        want, stop_ids = case["output_ids"][: P + a["gen_length"]], tuple(stop or ())
    out = fewstep.generate(m, prompt, _policy(case), gen_length=a["gen_length"], block_length=a["block_length"], **opts)
    seq = out.sequences[0].tolist()
    cut = next((i + 1 for i in range(P, len(want)) if want[i] in stop_ids), len(want))
    assert seq[:cut] == want[:cut]
    assert int(out.nfe[0]) == case["nfe"]
    never = [0 if s is None else s for s in case["decode_step"]]  # fewstep: 0 = never committed
    assert out.decode_step[0].tolist()[: cut - P] == never[: cut - P]


@pytest.mark.parametrize(("fixture_dir", "item"), params(_loss_items))
def test_dfactory_objective(fixture_dir, item):
    """The trainer-facing objective on the oracle batch gives the recorded combined losses."""
    from fewstep.distill.dparallel import BlockDiffusionDParallelObjective, BlockDParallelRecipe
    from fewstep.train.objective import SpecialIds

    spec, case = item
    s = oracles(fixture_dir)["special_ids"]
    batch = {
        "input_ids": torch.tensor(spec["input_ids"]),
        "noisy_input_ids": torch.tensor(case["noisy_input_ids"]),
        "labels": torch.tensor(case["labels"]),
    }
    for key, want in case["combined_loss"].items():
        low, high = spec["noise_range"]
        recipe = BlockDParallelRecipe(
            block_size=spec["block_size"],
            confidence_beta=float(key.removeprefix("beta_")),
            noise_range_low=low,
            noise_range_high=high,
        )
        ids = SpecialIds(mask=s["mask"], eos=s["eos"], pad=s.get("pad", s["eos"]))
        obj = BlockDiffusionDParallelObjective(ids, spec["max_seq_len"], recipe)
        with torch.no_grad():
            total, logs = obj.loss(model(fixture_dir), batch)
        assert float(total) == pytest.approx(want, rel=RTOL)
        assert logs["num_correct"] == case["num_correct_argmax"]
