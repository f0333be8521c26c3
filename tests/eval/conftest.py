"""A tiny random-weight LLaDA checkpoint with the embedded task's tokenizer, for `fewstep eval` tests."""

from __future__ import annotations

import json

import pytest

TINY = {
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
def tiny_model_dir(tmp_path_factory):
    from fewstep.models.loading import save_model
    from fewstep.tasks.arith import ArithConfig
    from fewstep.tasks.tokenizer import build_word_tokenizer, special_ids
    from fewstep.train.presets import init_model, model_config

    d = tmp_path_factory.mktemp("tiny-arith-model")
    tok = build_word_tokenizer(ArithConfig().vocabulary(), d)
    (d / "tiny.json").write_text(json.dumps(TINY))
    cfg = model_config(str(d / "tiny.json"), special_ids(tok), len(tok))
    model = init_model(cfg, seed=0)
    save_model(model.eval(), d)
    return d
