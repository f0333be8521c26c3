"""Shipped model names resolve at every entry point, and saved checkpoints are drop-in replacements of
their base folder (issue 15: config keys and ``auto_map`` kept, every non-weight file copied, same sharding)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.assets import MODELS_DIR, resolve_model, shipped_models
from fewstep.models import load_model, load_tokenizer, save_model
from fewstep.models.saving import cast_weights, save_checkpoint
from fewstep.models.tokenizer import build_word_tokenizer
from tests.tiny import AUTO_MAP, OFFICIAL_FILES, add_official_layout

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "llada-tiny-a"
X = torch.tensor([[5, 9, 12, 2, 4, 4, 17, 20, 3, 3]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


# -- the resolver --------------------------------------------------------------------------------------------


def test_resolver_names_paths_and_errors(tmp_path, monkeypatch):
    shipped = dict(shipped_models())
    assert list(shipped) == ["teacher", "cd4lm", "d3llm", "dmax", "dparallel", "dparallel-control"]
    assert all(resolve_model(name) == MODELS_DIR / name for name in shipped)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()  # an existing path wins over a shipped name
    assert resolve_model("teacher") == Path("teacher")
    with pytest.raises(
        FileNotFoundError, match="shipped models: teacher, cd4lm, d3llm, dmax, dparallel, dparallel-control"
    ):
        resolve_model("no-such-model")


def test_python_api_loads_shipped_models_by_name():
    """``fewstep.load_model("teacher")`` / ``load_tokenizer``: the same model as its folder."""
    by_name, by_path = fewstep.load_model("dparallel"), load_model(MODELS_DIR / "dparallel")
    assert by_name.checkpoint_path == str(MODELS_DIR / "dparallel")
    torch.testing.assert_close(_logits(by_name), _logits(by_path), rtol=0, atol=0)
    assert fewstep.load_tokenizer("teacher").mask_token_id == load_tokenizer(MODELS_DIR / "teacher").mask_token_id


def test_merge_lora_takes_a_shipped_base(tmp_path, capsys):
    """The CLI's model arguments go through the same resolver (``merge-lora --base teacher``)."""
    from peft import LoraConfig, get_peft_model

    from fewstep.cli import main

    peft_model = get_peft_model(
        load_model("teacher"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    assert (
        main(["merge-lora", "--base", "teacher", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")])
        == 0
    )
    merged = load_model(tmp_path / "m")
    torch.testing.assert_close(_logits(merged), _logits(peft_model.merge_and_unload()), rtol=0, atol=1e-5)
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (MODELS_DIR / "teacher" / "tokenizer.json").read_bytes()


# -- drop-in checkpoints -------------------------------------------------------------------------------------


@pytest.fixture
def official_base(tmp_path):
    """The LLaDA fixture (its config carries ``auto_map``) with remote code, a generation config, a tokenizer
    and a chat template: the layout of LLaDA-8B-Instruct's folder."""
    base = tmp_path / "base"
    shutil.copytree(FIXTURE, base)
    add_official_layout(base)
    build_word_tokenizer(["a", "b", "c"], base)
    (base / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return base


def _non_weight_files(folder: Path) -> dict[str, bytes]:
    return {
        f.name: f.read_bytes()
        for f in folder.iterdir()
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", INDEX, "README.md")
    }


INDEX = "model.safetensors.index.json"


def test_a_saved_checkpoint_is_a_drop_in_replacement_of_its_base(official_base, tmp_path):
    model = load_model(official_base)
    with torch.no_grad():
        model.blocks[0].q_proj.weight.add_(0.5)  # "training" changed the weights, not the config
    save_model(model, tmp_path / "student")
    base_cfg = json.loads((official_base / "config.json").read_text())
    saved_cfg = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved_cfg == base_cfg and saved_cfg["auto_map"] == AUTO_MAP and saved_cfg["use_cache"] is False
    files = _non_weight_files(official_base)
    assert {*OFFICIAL_FILES, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(files)
    assert _non_weight_files(tmp_path / "student") == files  # every non-weight file, byte for byte
    torch.testing.assert_close(_logits(load_model(tmp_path / "student")), _logits(model), rtol=0, atol=0)
    # only what changed differs: a dtype cast records the new torch_dtype, nothing else
    save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert {k for k in cfg if cfg[k] != base_cfg.get(k)} == {"torch_dtype"} and cfg["torch_dtype"] == "bfloat16"


def test_a_sharded_base_is_saved_with_its_own_shards(official_base, tmp_path):
    sharded = tmp_path / "sharded"
    save_checkpoint(load_model(official_base), sharded, max_shard_bytes=60_000)
    base_index = json.loads((sharded / INDEX).read_text())
    assert len(set(base_index["weight_map"].values())) > 1
    model = load_model(sharded)
    save_checkpoint(model, tmp_path / "student")
    index = json.loads((tmp_path / "student" / INDEX).read_text())
    assert index["weight_map"] == base_index["weight_map"]  # the same file names and key grouping
    assert _non_weight_files(tmp_path / "student") == _non_weight_files(official_base)
    cast_weights(tmp_path / "student", torch.bfloat16)  # shard-aware
    back = load_model(tmp_path / "student")
    assert back.blocks[0].q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(back).float(), _logits(model.to(torch.bfloat16)).float(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt-ids", "1", "--model"],
        ["eval", "--task", "arith", "--limit", "1", "--model"],
        ["sweep", "--task", "arith", "--policy", "threshold", "--values", "0.9", "--model"],
        ["rollout", "--prompts", "arith", "--limit", "1", "--out", "{tmp}/r", "--model"],
        ["distill", "--method", "dparallel", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/o", "--model"],
        ["merge-lora", "--adapter", "{tmp}/a", "--out", "{tmp}/m", "--base"],
    ],
)
def test_every_command_resolves_its_model_argument(argv, tmp_path, capsys):
    """Each command's model argument goes through the one resolver: an unknown name fails with its message
    (the list of shipped models), before any work."""
    from fewstep.cli import main

    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*args, "no-such-model"]) == 2
    assert "shipped models: teacher, cd4lm, d3llm, dmax, dparallel, dparallel-control" in capsys.readouterr().err
