"""The trainer: learning, schedules, data order, gradient accumulation, LoRA, and kill + resume."""

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
from fewstep.models.tokenizer import special_ids
from fewstep.train.config import TrainConfig
from fewstep.train.data import read_jsonl, tokenize_pairs
from fewstep.train.lora import LoraSpec, target_modules
from fewstep.train.mdm import MaskedDiffusionObjective
from fewstep.train.objective import SpecialIds
from fewstep.train.presets import init_model, model_config
from fewstep.train.trainer import Trainer, global_batch_indices, lr_factor
from tests.killpoint import killed_at
from tests.tiny import AUTO_MAP

REPO = Path(__file__).resolve().parents[2]


def _setup(task_dir, gen_length=32):
    tok = fewstep.load_tokenizer(task_dir / "tokenizer")
    ids = special_ids(tok)
    examples = tokenize_pairs(read_jsonl(task_dir / "train.jsonl"), tok)
    cfg = model_config(str(task_dir / "tiny.json"), ids, len(tok))
    obj = MaskedDiffusionObjective(SpecialIds(ids["mask"], ids["eos"], ids["pad"]), 64, gen_length=gen_length)
    return tok, examples, cfg, obj


def _eval_loss(model, obj, examples):
    batch = obj.collate(examples[:64], torch.Generator().manual_seed(123))
    model.eval()
    with torch.no_grad():
        return float(obj.loss(model, batch, step=0, max_steps=1)[0])


def test_a_few_steps_reduce_the_loss(task_dir, tmp_path):
    tok, examples, cfg, obj = _setup(task_dir)
    model = init_model(cfg, seed=0)
    before = _eval_loss(model, obj, examples)
    tc = TrainConfig(
        out_dir=str(tmp_path), max_steps=80, batch_size=16, lr=3e-3, warmup_steps=5, save_every=80, progress=False
    )
    summary = Trainer(model, obj, examples, tc, tokenizer=tok).train()
    after = _eval_loss(model, obj, examples)
    assert summary["steps"] == 80
    assert after < 0.75 * before, (before, after)
    # the run folder has a loadable HF checkpoint, the log and the loss curve
    hf = tmp_path / "checkpoints" / "step-000080" / "hf"
    reloaded = fewstep.load_model(hf)
    assert abs(_eval_loss(reloaded, obj, examples) - after) < 1e-5
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(10, 81, 10)) and all("loss" in r and "lr" in r for r in log)


def test_lr_schedules():
    c = TrainConfig(out_dir="x", max_steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1)
    assert lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0)
    assert lr_factor(60, c) == pytest.approx(0.55)
    assert lr_factor(110, c) == pytest.approx(0.1)
    c.schedule = "linear"
    assert lr_factor(60, c) == pytest.approx(0.55)
    c.schedule = "constant"
    assert lr_factor(100, c) == 1.0
    w = TrainConfig(out_dir="x", max_steps=100, warmup_steps=10, schedule="wsd", decay_steps=20, min_lr_ratio=0.1)
    assert lr_factor(79, w) == 1.0
    assert lr_factor(89, w) == pytest.approx(0.55)
    assert lr_factor(99, w) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        TrainConfig(out_dir="x", max_steps=10, schedule="step")


def test_data_order_covers_each_epoch_once():
    n, bs = 10, 4
    seen = [i for s in range(5) for i in global_batch_indices(s, n, bs, seed=0)]  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a fresh permutation per epoch
    assert global_batch_indices(3, n, bs, seed=0) == global_batch_indices(3, n, bs, seed=0)


def test_gradient_accumulation_matches_the_full_batch(task_dir, tmp_path):
    _tok, examples, cfg, obj = _setup(task_dir)
    weights = []
    for accum in (1, 4):
        model = init_model(cfg, seed=0)
        tc = TrainConfig(
            out_dir=str(tmp_path / f"a{accum}"),
            max_steps=2,
            batch_size=8,
            grad_accum=accum,
            lr=1e-2,
            warmup_steps=1,
            save_every=100,
            progress=False,
        )
        Trainer(model, obj, examples, tc).train()
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in weights[0]:
        # Adam turns float reassociation in near-zero gradients into up to ~1e-3 of one lr-sized step
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-5)


def test_lora_trains_only_the_adapter_and_exports_a_merged_model(task_dir, tmp_path):
    tok, examples, cfg, obj = _setup(task_dir)
    model = init_model(cfg, seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    assert target_modules(model, ("q", "k", "v", "up")) == [
        f"blocks.{i}.{n}" for i in range(2) for n in ("q_proj", "k_proj", "v_proj", "up_proj")
    ]
    assert "ff_out" not in target_modules(model, ("down",))  # the LM head is never a target
    tc = TrainConfig(
        out_dir=str(tmp_path),
        max_steps=5,
        batch_size=8,
        lr=1e-2,
        warmup_steps=1,
        save_every=5,
        progress=False,
        lora=LoraSpec(r=4, alpha=8, roles=("q", "k", "v", "up")),
    )
    trainer = Trainer(model, obj, examples, tc, tokenizer=tok)
    trainer.train()
    now = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert now.keys() == base.keys()
    for k, v in base.items():  # base weights untouched
        torch.testing.assert_close(now[k], v, rtol=0, atol=0)
    trainer.export(tmp_path / "merged")
    merged = fewstep.load_model(tmp_path / "merged")
    assert (tmp_path / "merged" / "adapter" / "adapter_config.json").is_file()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(any(r in k for r in ("q_proj", "k_proj", "v_proj", "up_proj")) for k in changed)
    # the merged model computes what the adapted model computes
    x = torch.randint(5, 30, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, trainer.model(input_ids=x).logits, rtol=1e-4, atol=1e-5)


def test_teacher_for_lora_is_the_base_without_a_copy(task_dir, tmp_path):
    _tok, examples, cfg, obj = _setup(task_dir)
    obj.needs_teacher = True
    model = init_model(cfg, seed=0)
    x = torch.randint(5, 30, (2, 12))
    with torch.no_grad():
        ref = model(x).logits.clone()
    tc = TrainConfig(
        out_dir=str(tmp_path),
        max_steps=3,
        batch_size=8,
        lr=1e-2,
        warmup_steps=1,
        save_every=100,
        progress=False,
        lora=LoraSpec(r=4, alpha=8),
    )
    trainer = Trainer(model, obj, examples, tc)
    trainer.train()
    assert not any(p is q for p in trainer.teacher.parameters() for q in model.parameters())  # holds no weights
    assert len(list(trainer.teacher.parameters())) == 0
    torch.testing.assert_close(trainer.teacher(input_ids=x).logits, ref)
    with torch.no_grad():
        assert not torch.allclose(trainer.model(input_ids=x).logits, ref)


def _pretrain_cmd(task_dir, out, steps):
    return [
        sys.executable,
        "-m",
        "fewstep",
        "pretrain",
        "--data",
        str(task_dir / "train.jsonl"),
        "--tokenizer",
        str(task_dir / "tokenizer"),
        "--model-config",
        str(task_dir / "tiny.json"),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--batch-size",
        "8",
        "--save-every",
        "4",
        "--gen-length",
        "32",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "3",
        "--schedule",
        "cosine",
        "--threads",
        "1",
        "--no-progress",
    ]


def test_sigkill_and_resume_reach_the_uninterrupted_state(task_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    steps = 24
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_pretrain_cmd(task_dir, ref, steps), check=True, env=env, capture_output=True)
    # SIGKILL as the step-8 checkpoint is about to be renamed into place: step 4 is the last complete one
    killed = subprocess.run(killed_at({"rename_to": "step-000008"}, *_pretrain_cmd(task_dir, run, steps)[3:]), env=env)
    assert killed.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "step-000004" / "trainer_state.json").exists()
    assert not (run / "model.safetensors").exists()
    resumed = subprocess.run(_pretrain_cmd(task_dir, run, steps), check=True, env=env, capture_output=True, text=True)
    assert "resuming" in resumed.stdout
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = f"step-{steps:06d}"
    oa = torch.load(ref / "checkpoints" / last / "accelerate" / "optimizer.bin", weights_only=False)
    ob = torch.load(run / "checkpoints" / last / "accelerate" / "optimizer.bin", weights_only=False)
    for pid, st in oa["state"].items():
        for k, v in st.items():
            assert torch.equal(v, ob["state"][pid][k]), (pid, k)
    ra = torch.load(ref / "checkpoints" / last / "accelerate" / "random_states_0.pkl", weights_only=False)
    rb = torch.load(run / "checkpoints" / last / "accelerate" / "random_states_0.pkl", weights_only=False)
    assert torch.equal(ra["torch_manual_seed"], rb["torch_manual_seed"])
    hist_a = [json.loads(x)["loss"] for x in (ref / "train_log.jsonl").read_text().splitlines()]
    hist_b = [json.loads(x)["loss"] for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert hist_a == hist_b


def test_pretrain_refuses_a_mismatched_run_folder(task_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = _pretrain_cmd(task_dir, tmp_path / "r", 4)
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    # the saved config keeps every key of the --model-config file (auto_map included)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["auto_map"] == AUTO_MAP and saved["d_model"] == 32 and saved["block_type"] == "llama"
    bad = [*cmd[:-3], "--seed", "5", "--threads", "1", "--no-progress"]
    out = subprocess.run(bad, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "different settings (seed)" in out.stderr
