"""Logit and KV-cache parity with the official implementations (atol 1e-4, float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.parity.fixtures import arrays, block_length_of, model, oracles, params

ATOL = 1e-4


def _logit_items(d):
    for key in sorted(arrays(d)):
        if key.startswith("logits_") and not key.endswith("_input_ids"):
            yield key.removeprefix("logits_"), key


def _cache_items(d):
    spec = oracles(d).get("cache_logits")
    for mode in ("prefix", "dual"):
        key = f"cache_{mode}_logits"
        if key in arrays(d):
            if spec is None:
                raise AssertionError(f"{d.name}: {key} present but oracles.json has no cache_logits spec")
            yield f"cache_{mode}", (mode, spec)


@pytest.mark.parametrize(("fixture_dir", "key"), params(_logit_items))
def test_logits(fixture_dir, key):
    a = arrays(fixture_dir)
    seq = key.rsplit("_", 1)[-1] if f"{key}_input_ids" not in a else key.removeprefix("logits_")
    ids = torch.from_numpy(a[f"logits_{seq}_input_ids"]).long()
    block = block_length_of(fixture_dir, key)
    kwargs = {} if block is None else {"block_length": block}  # block-diffusion: block-causal or full
    with torch.no_grad():
        got = model(fixture_dir)(ids, **kwargs).logits.numpy()
    np.testing.assert_allclose(got, a[key], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("fixture_dir", "item"), params(_cache_items))
def test_cache_logits(fixture_dir, item):
    mode, spec = item
    a = arrays(fixture_dir)
    ids = torch.from_numpy(a[f"logits_{spec['input']}_input_ids"]).long()
    start, end = spec["block_start"], spec["block_end"]
    m = model(fixture_dir)
    with torch.no_grad():
        cache = m(ids, use_cache=True).past_key_values
        if mode == "prefix":
            got = m(ids[:, start:], past_key_values=cache.truncate(start), use_cache=True).logits
        else:
            replace = torch.zeros(ids.shape, dtype=torch.bool)
            replace[:, start:end] = True
            got = m(ids[:, start:end], past_key_values=cache, use_cache=True, replace_position=replace).logits
    np.testing.assert_allclose(got.numpy(), a[f"cache_{mode}_logits"], atol=ATOL, rtol=0)
