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
    from fewstep.models.tokenizer import build_word_tokenizer, special_ids
    from fewstep.tasks.arith import ArithConfig
    from fewstep.train.presets import init_model, model_config

    folder = Path(folder)
    tok = build_word_tokenizer(ArithConfig().vocabulary(), folder)
    spec = folder / "tiny.json"
    spec.write_text(json.dumps(TINY_LLADA))
    cfg = model_config(str(spec), special_ids(tok), len(tok))
    spec.unlink()
    save_model(init_model(cfg, seed=seed).eval(), folder)
    return folder


#: LLaDA-8B-Instruct's ``auto_map`` (its remote code), as the fixtures' configs carry it.
AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModel": "modeling_llada.LLaDAModelLM",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
}
#: Non-weight files of an official checkpoint folder besides config.json and the tokenizer.
OFFICIAL_FILES = {
    "configuration_llada.py": "# remote code: configuration\nclass LLaDAConfig: ...\n",
    "modeling_llada.py": "# remote code: modeling\nclass LLaDAModelLM: ...\n",
    "generation_config.json": '{\n  "bos_token_id": 1,\n  "eos_token_id": 2,\n  "_from_model_config": true\n}\n',
}


def add_official_layout(folder: Path) -> Path:
    """Give a checkpoint folder the official layout: ``auto_map`` and an extra key in config.json, remote-code
    files and a generation config (what a student must carry over to be a drop-in replacement)."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(auto_map=AUTO_MAP, transformers_version="4.46.3", use_cache=False)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for name, text in OFFICIAL_FILES.items():
        (folder / name).write_text(text)
    return folder
