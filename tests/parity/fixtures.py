"""Discovery of parity fixture directories and of their oracle items.

By default the suite runs over the repo's copies of the shared fixtures (``tests/fixtures``). When
``FEWSTEP_FIXTURES`` is set (directories separated by ``os.pathsep``) it runs over those instead.
Nothing here hard-codes an id or a shape: everything is read from ``config.json``, ``oracles.json``
and ``oracle_arrays.npz`` of each directory.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest

_HERE = Path(__file__).resolve().parent.parent / "fixtures"
DEFAULT_DIRS = [_HERE / n for n in ("llada-tiny-a", "dream-tiny-a")]
#: the block-diffusion fixtures (LLaDA2-MoE, SDAR); part of the default parity run
BLOCK_DIRS = [_HERE / n for n in ("llada2-tiny-a", "sdar-tiny-a")]


def fixture_dirs() -> list[Path]:
    env = os.environ.get("FEWSTEP_FIXTURES")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return DEFAULT_DIRS + BLOCK_DIRS


@functools.cache
def oracles(d: Path) -> dict:
    return json.loads((d / "oracles.json").read_text())


@functools.cache
def config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


@functools.cache
def arrays(d: Path) -> dict[str, np.ndarray]:
    f = d / "oracle_arrays.npz"
    if not f.is_file():
        return {}
    with np.load(f) as z:
        return {k: z[k] for k in z.files}


@functools.cache
def dmax_oracles(d: Path) -> dict | None:
    """``oracles_dmax.json`` of a fixture directory (DMax's SPD and OPUT oracles), or None where it has none."""
    f = d / "oracles_dmax.json"
    return json.loads(f.read_text()) if f.is_file() else None


@functools.cache
def model(d: Path):
    import fewstep

    return fewstep.load_model(d, dtype="float32")


def block_length_of(d: Path, key: str) -> int | None:
    """The attention a ``logits_*`` array was recorded with: None for a full-attention family (no
    ``logits_inputs`` block lengths), the ``mask_block_length`` of ``logits_seqN``, and 0 (full
    bidirectional) for the ``logits_nomask_*`` / ``logits_fullattn_*`` variants of block-diffusion fixtures."""
    spec = oracles(d).get("logits_inputs") or {}
    name = key.removeprefix("logits_")
    if not any("mask_block_length" in v for v in spec.values()):
        return None
    if name in spec:
        return int(spec[name]["mask_block_length"])
    variant, _, seq = name.partition("_")
    if variant in ("nomask", "fullattn") and seq in spec:
        return 0
    raise AssertionError(f"{d.name}: cannot tell which attention {key} was recorded with")


def params(items_of) -> list:
    """``pytest.param(dir, item, id=f"{dir.name}-{item_id}")`` for every item of every fixture directory.

    ``items_of(dir)`` yields ``(item_id, item)`` pairs.
    """
    out = []
    for d in fixture_dirs():
        for item_id, item in items_of(d):
            out.append(pytest.param(d, item, id=f"{d.name}-{item_id}"))
    return out


#: d3LLM oracle file of a fixture directory (decoding, trajectories, noisy states, losses, curricula)
D3LLM_FILE = "oracles_d3llm.json"


@functools.cache
def d3llm_oracles(d: Path) -> dict | None:
    """``oracles_d3llm.json`` of ``d``, or None when the directory has none (it then contributes no items)."""
    f = d / D3LLM_FILE
    return json.loads(f.read_text()) if f.is_file() else None
