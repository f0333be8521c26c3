"""A very small LLaDA config and random checkpoints with the embedded task's tokenizer, shared by test packages."""

from __future__ import annotations

import json
from pathlib import Path

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


def tiny_arith_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Write a random-weight ``TINY_LLADA`` checkpoint with the arith word tokenizer into ``folder``."""
    from fewstep.models.loading import save_model
    from fewstep.tasks.arith import ArithConfig
    from fewstep.tasks.tokenizer import build_word_tokenizer, special_ids
    from fewstep.train.presets import init_model, model_config

    folder = Path(folder)
    tok = build_word_tokenizer(ArithConfig().vocabulary(), folder)
    spec = folder / "tiny.json"
    spec.write_text(json.dumps(TINY_LLADA))
    cfg = model_config(str(spec), special_ids(tok), len(tok))
    spec.unlink()
    save_model(init_model(cfg, seed=seed).eval(), folder)
    return folder
