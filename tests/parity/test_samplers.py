"""Sampler parity: every ``sampler_cases`` entry of every fixture's ``oracles.json`` is one test.

Each case was produced by an official reference sampler (see ``tests/fixtures/README.md``). The table
``SAMPLERS`` maps a reference sampler name and its keyword arguments to a fewstep policy plus the
loop options of :func:`fewstep.generate`; the quirk options it turns on are documented on the policy
classes and in ``docs/decoding.md``. Asserted: identical ``output_ids`` (prompt + answer) and ``nfe``,
and identical ``decode_step`` (the 1-based forward that unmasked each answer position) unless the case
is flagged ``decode_step_fragile``. Nothing here hard-codes an id or a shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import fewstep
from fewstep.decoding.policies import (
    CADPolicy,
    ConfidenceThresholdPolicy,
    DreamEntropyThresholdPolicy,
    DreamPolicy,
    EntropyThresholdPolicy,
    LowConfidencePolicy,
    Policy,
)
from tests.parity.fixtures import model, oracles, params

Mapping = Callable[[dict[str, Any], dict[str, Any]], tuple[Policy, dict[str, Any]]]


def _blocks(a: dict) -> dict:
    return {
        "gen_length": a["gen_length"],
        "block_length": a.get("block_length", a["gen_length"]),
        "mask_id": a["mask_id"],
    }


def _llada(a: dict, case: dict) -> tuple[Policy, dict]:
    # ML-GSAI generate: a for-loop of exactly steps/num_blocks forwards, softmax in the logits' dtype
    pol = LowConfidencePolicy(
        steps=a["steps"],
        remasking=a["remasking"],
        temperature=a["temperature"],
        probs_dtype="logits",
        quirk_fixed_forwards=True,
    )
    return pol, {**_blocks(a), "cfg_scale": a["cfg_scale"]}


def _fastdllm(cache: str) -> Mapping:
    def build(a: dict, case: dict) -> tuple[Policy, dict]:
        if a["threshold"] is None:  # fixed quota, float64 confidence, while-loop until the block is done
            pol: Policy = LowConfidencePolicy(
                steps=a["steps"], remasking=a["remasking"], temperature=a["temperature"], probs_dtype="float64"
            )
        else:
            pol = ConfidenceThresholdPolicy(a["threshold"], temperature=a["temperature"], remasking=a["remasking"])
        return pol, {**_blocks(a), "cache": cache, "quirk_cache_extra_nfe": cache != "none"}

    return build


def _dparallel(cache: str) -> Mapping:
    def build(a: dict, case: dict) -> tuple[Policy, dict]:
        pol = EntropyThresholdPolicy(a["threshold"], temperature=a["temperature"], remasking=a["remasking"])
        return pol, {**_blocks(a), "cache": cache, "quirk_cache_extra_nfe": cache != "none"}

    return build


def _cdlm(mode: str) -> Mapping:
    def build(a: dict, case: dict) -> tuple[Policy, dict]:
        pol = CADPolicy(
            threshold=a["confidence_threshold"],
            entropy_threshold=a["entropy_threshold"],
            min_tokens=a["min_tokens_per_step"],
            max_tokens=a["max_tokens_per_step"],
            max_steps_per_block=a["max_steps_per_block"] if mode == "block" else a["max_steps"],
            eos_ratio=a["eos_threshold_ratio"],
            eos_ids=tuple(case["eos_token_ids_used"]),  # the EOS list the reference ran with
            selection=a["selection_method"],
            remasking=a["remasking"],
            mode=mode,
            temperature=a["temperature"],
            quirk_gated_fallback_topk=True,
        )
        return pol, {**_blocks(a), "cfg_scale": a["cfg_scale"]}

    return build


def _dream(a: dict, case: dict) -> tuple[Policy, dict]:
    kw = {k: a[k] for k in ("temperature", "top_p", "top_k") if k in a}
    if a["alg"] == "confidence_threshold":
        pol = DreamPolicy(alg=a["alg"], steps=a["steps"], threshold=a["threshold"], **kw)
    else:
        pol = DreamPolicy(alg=a["alg"], steps=a["steps"], alg_temp=a.get("alg_temp") or 0.0, **kw)
    return pol, {"gen_length": a["max_new_tokens"], "block_length": a["max_new_tokens"]}


def _dream_semiar(a: dict, case: dict) -> tuple[Policy, dict]:
    pol = DreamEntropyThresholdPolicy(a["threshold"], temperature=a["temperature"])
    G = a["max_new_tokens"]
    # its `steps` only has to be divisible by the number of blocks; the loop runs until each block is done
    assert a["steps"] % (G // (a.get("block_length") or G)) == 0
    return pol, {"gen_length": G, "block_length": a.get("block_length") or G}


SAMPLERS: dict[str, Mapping] = {
    "llada.generate": _llada,
    "fastdllm.generate": _fastdllm("none"),
    "fastdllm.generate_with_prefix_cache": _fastdllm("prefix"),
    "fastdllm.generate_with_dual_cache": _fastdllm("dual"),
    "dparallel.generate": _dparallel("none"),
    "dparallel.generate_with_prefix_cache": _dparallel("prefix"),
    "dparallel.generate_with_dual_cache": _dparallel("dual"),
    "cdlm.generate_block": _cdlm("block"),
    "cdlm.generate": _cdlm("global"),
    "dream.diffusion_generate": _dream,
    "dparallel_dream_semiar.diffusion_generate": _dream_semiar,
}


#: block-diffusion samplers: their cases run in test_blockdiff.py
BLOCK_SAMPLERS = ("dfactory.generate", "sdar.block_diffusion_generate")


def _cases(d):
    for case in oracles(d).get("sampler_cases", []):
        if case["sampler"] not in BLOCK_SAMPLERS:
            yield case["id"], case


@pytest.mark.parametrize(("fixture_dir", "case"), params(_cases))
def test_sampler(fixture_dir, case):
    if case.get("tie_break_dependent") and oracles(fixture_dir).get("torch") != torch.__version__:
        # Steps where every candidate was EOS-gated: the reference takes torch.topk over a vector of -inf,
        # whose winner is torch's CPU tie order. CADPolicy(quirk_gated_fallback_topk=True) calls topk on the
        # same vector, so these cases run whenever the torch that made the oracle is the one installed.
        pytest.skip(
            f"tie_break_dependent: the reference picks among -inf scores by torch.topk tie order, which may "
            f"differ between torch {oracles(fixture_dir).get('torch')} (oracle) and {torch.__version__}"
        )
    assert case["sampler"] in SAMPLERS, f"no fewstep mapping for reference sampler {case['sampler']!r}"
    policy, options = SAMPLERS[case["sampler"]](case["args"], case)
    prompt = torch.tensor([oracles(fixture_dir)["prompts"][case["prompt"]]])
    # every reference sampler lets the mask token itself win the argmax (fewstep's default forbids it) and
    # decodes every block (fewstep's default stops after the block holding the EOS)
    options = {"early_stop": False, **options}
    out = fewstep.generate(model(fixture_dir), prompt, policy, quirk_mask_prediction=True, **options)
    assert out.sequences[0].tolist() == case["output_ids"]
    assert int(out.nfe[0]) == case["nfe"]
    mask_id = model(fixture_dir).config.mask_token_id
    assert sum(out.tokens_per_step[0]) == sum(t != mask_id for t in case["generated_ids"])
    if "decode_step" in case and not case.get("decode_step_fragile"):
        assert out.decode_step[0].tolist() == case["decode_step"]
