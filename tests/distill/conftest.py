"""A fresh, trainable copy of the tiny LLaDA fixture for each test that trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import add_official_layout, tiny_arith_checkpoint

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "llada-tiny-a"


@pytest.fixture
def tiny_llada():
    import fewstep

    return fewstep.load_model(FIXTURE, dtype="float32")


@pytest.fixture(scope="session")
def arith_teacher(tmp_path_factory):
    """A random tiny LLaDA checkpoint with the embedded task's word tokenizer (training.json: gen_length 32),
    in the official layout (``auto_map``, remote-code files, generation config)."""
    import json

    folder = add_official_layout(tiny_arith_checkpoint(tmp_path_factory.mktemp("teacher")))
    (folder / "training.json").write_text(json.dumps({"gen_length": 32}))
    return folder


@pytest.fixture(scope="session")
def arith_rollouts(arith_teacher, tmp_path_factory):
    """A rollout folder of 48 arith prompts answered by ``arith_teacher`` (every answer kept)."""
    import fewstep
    from fewstep.distill.rollout import RolloutConfig, load_prompts, run_rollout

    out = tmp_path_factory.mktemp("rollouts")
    records, verifier = load_prompts("arith", limit=48)
    cfg = RolloutConfig(
        out_dir=str(out),
        model=str(arith_teacher),
        prompts="arith",
        gen_length=32,
        batch_size=16,
        keep="all",
        verifier=verifier,
        limit=48,
    )
    run_rollout(cfg, fewstep.load_model(arith_teacher), fewstep.load_tokenizer(arith_teacher), records, progress=False)
    return out
