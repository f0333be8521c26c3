"""`fewstep distill` and `fewstep merge-lora`: outputs, LoRA targets, CD4LM teachers, SIGKILL resume, round trip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fewstep
from fewstep.cli import main
from fewstep.distill import frozen_teacher
from fewstep.distill.cd4lm import CD4LMObjective, CD4LMRecipe
from fewstep.models.tokenizer import special_ids
from fewstep.train.config import TrainConfig
from fewstep.train.data import read_jsonl, tokenize_pairs
from fewstep.train.lora import LoraSpec, apply_lora
from fewstep.train.objective import SpecialIds
from fewstep.train.trainer import Trainer
from tests.killpoint import killed_at
from tests.tiny import OFFICIAL_FILES

REPO = Path(__file__).resolve().parents[2]
X = torch.tensor([[5, 9, 12, 2, 4, 4, 17, 20, 3, 3, 8, 11], [7, 7, 30, 4, 4, 4, 13, 6, 2, 2, 25, 19]])


def _distill(teacher, data, out, method, *extra):
    return [
        "distill", "--method", method, "--model", str(teacher), "--data", str(data), "--out", str(out),
        "--batch-size", "8", "--lr", "1e-3", "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


def _logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_dparallel_lora_writes_a_loadable_merged_model_and_the_adapter(arith_teacher, arith_rollouts, tmp_path):
    out = tmp_path / "dp"
    args = _distill(arith_teacher, arith_rollouts, out, "dparallel", "--lora-r", "4", "--lora-targets", "dparallel")
    assert main([*args, "--max-steps", "3"]) == 0
    base, merged = fewstep.load_model(arith_teacher), fewstep.load_model(out)
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    # dParallel's effective LLaDA set: q, k, v, up of every block, nothing else (not attn_out/ff_proj/ff_out)
    assert changed == {f"blocks.{i}.{n}.weight" for i in range(2) for n in ("q_proj", "k_proj", "v_proj", "up_proj")}
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 4 * 2  # lora_A and lora_B of 4 projections x 2 blocks
    assert fewstep.load_tokenizer(out).mask_token_id == fewstep.load_tokenizer(arith_teacher).mask_token_id
    info = json.loads((out / "training.json").read_text())
    assert info["method"] == "dparallel" and info["finetune"] == "lora" and info["steps"] == 3
    assert info["objective_hparams"]["entropy_weight"] == 2.0 and info["objective_hparams"]["block_size"] == 32
    assert info["gen_length"] == 32 and info["n_examples"] == 48  # read from the rollout folder
    assert "fewstep distill --method dparallel" in (out / "README.md").read_text()
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    # merge-lora of the adapter onto the base gives the same model
    assert (
        main(
            [
                "merge-lora",
                "--base",
                str(arith_teacher),
                "--adapter",
                str(out / "adapter"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    torch.testing.assert_close(_logits(fewstep.load_model(tmp_path / "m")), _logits(merged), rtol=0, atol=1e-6)
    # both the distilled student and the merged one are drop-in replacements of the base folder
    for folder in (out, tmp_path / "m"):
        assert_drop_in(arith_teacher, folder)


def assert_drop_in(base, folder):
    """Same config.json (auto_map and every other key), every non-weight file of the base byte for byte."""
    assert json.loads((folder / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    for name in [*OFFICIAL_FILES, "tokenizer.json", "tokenizer_config.json"]:
        assert (folder / name).read_bytes() == (base / name).read_bytes(), name


def test_merge_lora_round_trip(arith_teacher, tmp_path, capsys):
    model = fewstep.load_model(arith_teacher)
    peft_model = apply_lora(model, LoraSpec(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    want = _logits(peft_model)
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(input_ids=X).logits - want).abs().max() > 1e-2  # the adapter matters
    merge = [
        "merge-lora",
        "--base",
        str(arith_teacher),
        "--adapter",
        str(tmp_path / "adapter"),
        "--out",
        str(tmp_path / "m"),
    ]
    assert main(merge) == 0
    merged = fewstep.load_model(tmp_path / "m")
    torch.testing.assert_close(_logits(merged), want, rtol=0, atol=1e-5)
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    assert main(merge) == 2  # the output exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert (
        main(["merge-lora", "--base", str(arith_teacher), "--adapter", str(tmp_path), "--out", str(tmp_path / "n")])
        == 2
    )
    assert "adapter_config.json" in capsys.readouterr().err


def _cd4lm_trainer(teacher_dir, rollouts, out, lora):
    tok = fewstep.load_tokenizer(teacher_dir)
    ids = special_ids(tok)
    examples = tokenize_pairs([r for f in sorted(Path(rollouts).glob("shard-*.jsonl")) for r in read_jsonl(f)], tok)
    obj = CD4LMObjective(SpecialIds(ids["mask"], ids["eos"], ids["pad"]), 96, CD4LMRecipe(), per_sequence=True)
    cfg = TrainConfig(
        out_dir=str(out), max_steps=3, batch_size=8, lr=1e-2, warmup_steps=0, save_every=100, progress=False,
        lora=LoraSpec(r=4, alpha=8) if lora else None,
    )  # fmt: skip
    teacher = None if lora else frozen_teacher(teacher_dir, "float32")  # what `fewstep distill` passes
    return Trainer(fewstep.load_model(teacher_dir), obj, examples, cfg, teacher=teacher)


def _storages(module):
    return {p.untyped_storage().data_ptr() for p in module.parameters()} | {
        b.untyped_storage().data_ptr() for b in module.buffers()
    }


def test_cd4lm_with_lora_holds_no_second_copy(arith_teacher, arith_rollouts, tmp_path):
    original = _logits(fewstep.load_model(arith_teacher))
    trainer = _cd4lm_trainer(arith_teacher, arith_rollouts, tmp_path, lora=True)
    trainer.train()
    assert sum(p.numel() for p in trainer.teacher.parameters()) == 0 and not list(trainer.teacher.buffers())
    assert _storages(trainer.teacher) <= _storages(trainer.model)  # nothing of its own
    torch.testing.assert_close(_logits(trainer.teacher), original, rtol=0, atol=0)
    assert not torch.allclose(_logits(trainer.model), original, atol=1e-4)


def test_cd4lm_full_finetuning_uses_a_separate_frozen_teacher(arith_teacher, arith_rollouts, tmp_path):
    original = _logits(fewstep.load_model(arith_teacher))
    trainer = _cd4lm_trainer(arith_teacher, arith_rollouts, tmp_path, lora=False)
    n = sum(p.numel() for p in trainer.model.parameters())
    assert sum(p.numel() for p in trainer.teacher.parameters()) == n  # a full copy ...
    assert not _storages(trainer.teacher) & _storages(trainer.model)  # ... sharing no storage with the student
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    trainer.train()
    assert not trainer.teacher.training
    torch.testing.assert_close(_logits(trainer.teacher), original, rtol=0, atol=0)
    assert not torch.allclose(_logits(trainer.model), original, atol=1e-4)


RUNS = {
    "dparallel-lora": ("dparallel", "--lora-r", "4"),
    "cd4lm-full": ("cd4lm", "--warmup-steps", "2"),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_sigkill_and_resume_reach_the_uninterrupted_state(arith_teacher, arith_rollouts, tmp_path, run):
    method, *extra = RUNS[run]
    extra = [*extra, "--max-steps", "12", "--save-every", "3", "--log-every", "1"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main(_distill(arith_teacher, arith_rollouts, ref, method, *extra)) == 0
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "fewstep", *_distill(arith_teacher, arith_rollouts, out, method, *extra)]
    # SIGKILL as the step-6 checkpoint is about to be renamed into place: step 3 is the last complete one
    killed = subprocess.run(killed_at({"rename_to": "step-000006"}, *cmd[3:]), env=env, stdout=subprocess.DEVNULL)
    assert killed.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "step-000003" / "trainer_state.json").exists()
    assert not (out / "training.json").exists()
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = ref / "checkpoints" / "step-000012" / "accelerate"
    oa = torch.load(last / "optimizer.bin", weights_only=False)
    ob = torch.load(out / "checkpoints" / "step-000012" / "accelerate" / "optimizer.bin", weights_only=False)
    assert oa["state"].keys() == ob["state"].keys()
    for pid, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][pid][k]), (pid, k)
    log = [json.loads(x) for x in (ref / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == [
        json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()
    ]
    assert len(log) == 12


def test_cli_validation(arith_teacher, arith_rollouts, tmp_path, capsys):
    base = _distill(arith_teacher, arith_rollouts, tmp_path / "o", "dparallel", "--max-steps", "1")
    assert main([*base, "--lora-targets", "q,zz"]) == 2
    assert "unknown role(s) ['zz']" in capsys.readouterr().err
    assert main([*base, "--finetune", "full", "--lora-targets", "dparallel"]) == 2
    assert "applies to --finetune lora" in capsys.readouterr().err
    assert main([*base, "--max-length", "4096"]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err
    assert main(_distill(arith_teacher, tmp_path / "nowhere.jsonl", tmp_path / "o", "cd4lm")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--lora-r", "2"]) == 0
    capsys.readouterr()
    assert main([*base, "--lora-r", "2", "--seed", "3"]) == 2
    assert "different settings (seed" in capsys.readouterr().err


def test_dream_gets_dreams_recipe_and_all_seven_projections(arith_teacher, arith_rollouts, tmp_path):
    dream = REPO / "tests" / "fixtures" / "dream-tiny-a"  # vocabulary 512 covers the arith tokenizer's ids
    out = tmp_path / "dream"
    args = _distill(dream, arith_rollouts, out, "dparallel", "--tokenizer", str(arith_teacher), "--lora-r", "2")
    assert main([*args, "--lora-targets", "dparallel", "--max-steps", "2"]) == 0
    info = json.loads((out / "training.json").read_text())
    hp = info["objective_hparams"]
    assert hp["block_size"] is None and hp["entropy_weight"] == 1.0 and hp["temperature"] == 0.5
    assert info["schedule"] == "cosine" and info["lr"] == 1e-3  # --lr given; the schedule from the Dream recipe
    names = {
        k.split(".lora_")[0].rsplit(".", 1)[-1] for k in load_file(str(out / "adapter" / "adapter_model.safetensors"))
    }
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    fewstep.load_model(out)


@pytest.mark.parametrize("name", ["ddp_8gpu", "fsdp_8gpu", "deepspeed_zero2_8gpu"])
def test_shipped_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert cfg.num_processes == 8 and cfg.num_machines == 1 and str(cfg.mixed_precision) == "bf16"
    kind = {"ddp_8gpu": "MULTI_GPU", "fsdp_8gpu": "FSDP", "deepspeed_zero2_8gpu": "DEEPSPEED"}[name]
    assert str(cfg.distributed_type).endswith(kind)
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] in {"LLaDABlock", "DreamLayer"}
        from fewstep.models import llada

        assert hasattr(llada, cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 2 and cfg.deepspeed_config["gradient_accumulation_steps"] == 1


def test_gradient_checkpointing_and_bf16(arith_teacher, arith_rollouts, tmp_path):
    common = ("--lora-r", "4", "--max-steps", "3", "--log-every", "1", "--save-every", "100")
    logs = {}
    from accelerate.state import AcceleratorState

    for name, extra in {"plain": (), "ckpt": ("--gradient-checkpointing",), "bf16": ("--bf16",)}.items():
        AcceleratorState._reset_state(True)  # accelerate's process-wide state fixes the precision once
        try:
            assert main(_distill(arith_teacher, arith_rollouts, tmp_path / name, "dparallel", *common, *extra)) == 0
        finally:
            AcceleratorState._reset_state(True)
        logs[name] = [json.loads(x)["loss"] for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    # recomputing activations changes nothing (the adapters still get their gradients: same trajectory)
    assert logs["ckpt"] == pytest.approx(logs["plain"], rel=1e-5)
    a, b = (
        load_file(str(tmp_path / "plain" / "model.safetensors")),
        load_file(str(tmp_path / "ckpt" / "model.safetensors")),
    )
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # bf16 autocast: the same trajectory to bf16 precision
    assert logs["bf16"] == pytest.approx(logs["plain"], rel=5e-2)
    assert logs["bf16"] != logs["plain"]
