"""d3LLM multi-block decoding parity: every ``sampler_cases`` entry of every ``oracles_d3llm.json`` is one test.

The cases were recorded with d3LLM's own samplers (LLaDA ``generate_multi_block`` / ``_kv_cache``, Dream
``generate_multi_block`` with and without its KV cache; ``tests/fixtures/README.md``). Each runs through
``fewstep.generate`` with the ``multiblock`` / ``multiblock-dream`` policy, ``eos_fill`` for the reference's
``early_stop`` and ``cache="prefix"`` for its KV cache, and must give the recorded ``output_ids``,
``generated_ids``, ``nfe`` and ``decode_step`` exactly (a field the fixture flags ``*_fragile`` under a 1e-5
weight perturbation is not compared; the case still runs). The KV cases must also run the reference's
schedule of forwards: per model call the columns run and the columns taken from the cache (``forward_kinds``).

The reference behaviours reproduced for parity (all off by default, ``docs/decoding.md``):
``quirk_stale_candidates`` (candidates taken before the EOS fill), ``quirk_eos_fill_nfe`` (a fill that ends the
row counts a forward), ``quirk_prefix_own_logit`` (Dream's cached forward predicts its first column from
itself), ``quirk_mask_prediction`` (the mask id may win the argmax). Where a quirk changes only the count,
the intended run is checked too: without ``quirk_eos_fill_nfe`` the NFE is the number of forwards run.

Ids, prompts, lengths, thresholds and stop ids come from the json (the Dream stop id, when a case does not
name one, from the fixture's ``generation_config.json``, as the reference's config does);
:func:`test_every_sampler_case_is_collected` fails if a case of the file is not collected.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.decoding.policies import DreamMultiBlockPolicy, MultiBlockPolicy, Policy
from tests.parity.fixtures import d3llm_oracles, fixture_dirs, model, params

NO_CACHE = 10000  # the reference's "never" for cache_delay_iter / refresh_interval
LLADA_ARGS = {"steps", "max_new_tokens", "block_size", "temperature", "remasking", "mask_id", "threshold"}
LLADA_ARGS |= {"block_add_threshold", "decoded_token_threshold", "eos_token_id", "early_stop"}
KV_ARGS = {"cache_delay_iter", "refresh_interval", "lazy_cache_refresh_num"}
DREAM_ARGS = {"max_new_tokens", "steps", "temperature", "alg", "threshold", "block_size", "block_add_threshold"}
DREAM_ARGS |= {"decoded_token_threshold", "cache_delay_iter", "refresh_interval", "early_stop", "eos_token_id"}
SAMPLERS = {
    "d3llm.llada.generate_multi_block": ("llada", False, LLADA_ARGS),
    "d3llm.llada.generate_multi_block_kv_cache": ("llada", True, LLADA_ARGS | KV_ARGS),
    "d3llm.dream.generate_multi_block": ("dream", False, DREAM_ARGS),
    "d3llm.dream.generate_multi_block(kv_cache)": ("dream", True, DREAM_ARGS),
}


def _cases(d: Path):
    for case in (d3llm_oracles(d) or {}).get("sampler_cases", []):
        yield case["id"], case


def _stop_id(d: Path, family: str, a: dict) -> int | None:
    if "eos_token_id" in a:
        return a["eos_token_id"]
    if family == "dream":  # DreamGenerationConfig without one falls back to the checkpoint's generation_config
        return json.loads((d / "generation_config.json").read_text()).get("eos_token_id")
    return None


def mapping(d: Path, case: dict) -> tuple[Policy, dict]:
    """The fewstep policy and ``generate`` options of a reference call."""
    assert case["sampler"] in SAMPLERS, f"no fewstep mapping for reference sampler {case['sampler']!r}"
    family, kv, known = SAMPLERS[case["sampler"]]
    a = case["args"]
    assert set(a) <= known, f"arguments this suite does not map: {set(a) - known}"
    assert a.get("remasking", "low_confidence") == "low_confidence" and a.get("alg", "entropy_threshold") == (
        "entropy_threshold"
    )
    assert not a.get("lazy_cache_refresh_num"), "lazy cache refresh is not implemented"
    G, L = a["max_new_tokens"], a["block_size"]
    assert G % L == 0, "the reference never decodes a remainder block"
    cached = kv and a["cache_delay_iter"] < NO_CACHE
    cls = DreamMultiBlockPolicy if family == "dream" else MultiBlockPolicy
    kw = {
        "threshold": a["threshold"],
        "add_threshold": a["block_add_threshold"],
        "full_threshold": a["decoded_token_threshold"],
        "temperature": a["temperature"],
        "quirk_stale_candidates": True,
    }
    if cached:
        kw["cache_delay_iter"] = a["cache_delay_iter"]
        kw["refresh_interval"] = None if a["refresh_interval"] >= NO_CACHE else a["refresh_interval"]
    stop = _stop_id(d, family, a)
    opts = {
        "gen_length": G,
        "block_length": L,
        "cache": "prefix" if cached else "none",
        "early_stop": False,  # the reference has no block-level early stop: eos_fill is its only stop
        "eos_fill": bool(a["early_stop"]) and stop is not None,
        "quirk_eos_fill_nfe": True,
        "quirk_prefix_own_logit": family == "dream" and cached,
        "quirk_mask_prediction": True,  # the reference's argmax runs over the whole vocabulary
    }
    if stop is not None:
        opts["eos_ids"] = [stop]
    if "mask_id" in a:
        opts["mask_id"] = a["mask_id"]
    return cls(**kw), opts


@contextmanager
def recorded_forwards(m):
    """Record ``[columns run, columns from the cache]`` for every ``denoise`` call of ``m``."""
    calls, original = [], m.denoise

    def denoise(input_ids=None, attention_mask=None, **kw):
        n = input_ids.shape[1]
        mode = kw.get("cache_mode", "none")
        cut = 0 if mode == "none" else max(kw["start"] - m.logit_shift, 0)
        calls.append([n - cut, cut])
        return original(input_ids, attention_mask, **kw)

    m.denoise = denoise
    try:
        yield calls
    finally:
        del m.denoise


@pytest.mark.parametrize(("fixture_dir", "case"), params(_cases))
def test_multiblock_sampler(fixture_dir, case):
    f = d3llm_oracles(fixture_dir)
    policy, opts = mapping(fixture_dir, case)
    prompt = f["prompts"][case["prompt"]]
    m = model(fixture_dir)
    with recorded_forwards(m) as calls:
        out = fewstep.generate(m, torch.tensor([prompt]), policy, **opts)
    if not case.get("output_fragile"):
        assert out.sequences[0].tolist() == case["output_ids"]
        assert out.answers[0].tolist() == case["generated_ids"]
    if not case.get("nfe_fragile"):
        assert int(out.nfe[0]) == case["nfe"]
        assert len(calls) == case["model_calls"]
    if not case.get("decode_step_fragile"):
        assert out.decode_step[0].tolist() == [0 if s is None else s for s in case["decode_step"]]
        assert out.tokens_per_step[0] == case["commits_per_forward"][: len(out.tokens_per_step[0])]
    if "forward_kinds" in case and not case.get("nfe_fragile"):
        # [input length, update_kvcache, cache_position[0], past given, cache length] per reference call
        want = [[k[0], k[2] if k[3] else 0] for k in case["forward_kinds"]]
        assert calls == want, "the forwards' schedule (columns run, columns cached) differs"


def _fill_counted(d: Path):
    for case_id, case in _cases(d):
        if case.get("nfe_minus_model_calls") and not case.get("nfe_fragile") and not case.get("output_fragile"):
            yield case_id, case


@pytest.mark.parametrize(("fixture_dir", "case"), params(_fill_counted))
def test_eos_fill_counts_only_forwards_that_run(fixture_dir, case):
    """The reference counts a forward before its loop-head EOS fill; when that fill ends the row, the count is
    one more than the forwards it ran. Without ``quirk_eos_fill_nfe`` fewstep's NFE is the forwards it ran,
    with the same answer."""
    policy, opts = mapping(fixture_dir, case)
    prompt = d3llm_oracles(fixture_dir)["prompts"][case["prompt"]]
    out = fewstep.generate(model(fixture_dir), torch.tensor([prompt]), policy, **{**opts, "quirk_eos_fill_nfe": False})
    assert out.sequences[0].tolist() == case["output_ids"]
    assert int(out.nfe[0]) == case["model_calls"] == case["nfe"] - case["nfe_minus_model_calls"]


def test_every_sampler_case_is_collected():
    """Each ``sampler_cases`` entry of each fixture's oracles_d3llm.json is one collected test (none filtered
    or skipped; fragile fields are compared less, never skipped), with a unique id."""
    collected = params(_cases)
    seen = 0
    for d in fixture_dirs():
        f = d3llm_oracles(d)
        if f is None:
            continue
        cases = f.get("sampler_cases", [])
        mine = [p for p in collected if p.values[0] == d]
        assert len(mine) == len(cases), f"{d.name}: {len(mine)} of {len(cases)} sampler cases collected"
        assert len({c["id"] for c in cases}) == len(cases), f"{d.name}: duplicate case ids"
        if "stats" in f:
            assert f["stats"]["cases"] == len(cases), f"{d.name}: the file's own count differs"
        seen += len(cases)
    if any(d3llm_oracles(d) for d in fixture_dirs()):
        assert seen > 0
