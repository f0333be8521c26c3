"""A fresh, trainable copy of the tiny LLaDA fixture for each test that trains."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "llada-tiny-a"


@pytest.fixture
def tiny_llada():
    import fewstep

    return fewstep.load_model(FIXTURE, dtype="float32")


TINY_LLADA = {
    "model_type": "llada",
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "mlp_hidden_size": 64,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "max_sequence_length": 128,
}


@pytest.fixture(scope="session")
def arith_teacher(tmp_path_factory):
    """A random tiny LLaDA checkpoint with the embedded task's word tokenizer (training.json: gen_length 32)."""
    import json

    from fewstep.models.loading import save_model
    from fewstep.tasks.arith import ArithConfig
    from fewstep.tasks.tokenizer import build_word_tokenizer, special_ids
    from fewstep.train.presets import init_model

    folder = tmp_path_factory.mktemp("teacher")
    tok = build_word_tokenizer(ArithConfig().vocabulary(), folder)
    ids = special_ids(tok)
    cfg = {
        **TINY_LLADA,
        "vocab_size": len(tok),
        "mask_token_id": ids["mask"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
    }
    save_model(init_model(cfg, seed=0), folder)
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
