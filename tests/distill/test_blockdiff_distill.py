"""Distillation on the block-diffusion families (LLaDA2-MoE, SDAR): the ``[noisy | clean]`` views, both
objectives through ``fewstep distill`` (LoRA and full fine-tuning), ``merge-lora``, drop-in students."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fewstep
from fewstep.cli import main
from fewstep.distill import build_objective
from fewstep.distill.blockdiff import block_diffusion_logits
from fewstep.train.config import TrainConfig
from fewstep.train.data import read_jsonl, tokenize_pairs
from fewstep.train.lora import ROLES, target_modules
from fewstep.train.objective import SpecialIds
from fewstep.train.trainer import Trainer
from tests.distill.blockdata import FAMILIES, block_checkpoint, teacher_answers, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """``{family: (checkpoint folder, JSONL of the model's own answers)}``."""
    root = tmp_path_factory.mktemp("block")
    return {f: (block_checkpoint(f, root / f), write_jsonl(teacher_answers(f), root / f"{f}.jsonl")) for f in FAMILIES}


def _ids(folder: Path, model) -> SpecialIds:
    return SpecialIds.from_tokenizer(fewstep.load_tokenizer(folder), model.config)


def _canvas(model, ids: SpecialIds, n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 40, (2, n), generator=g)
    noisy = clean.masked_fill(torch.rand(2, n, generator=g) < 0.5, ids.mask)
    return noisy, clean


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_views_are_the_decoding_states(bases, family):
    """Noisy block b of the ``[noisy | clean]`` forward = block b decoded after the clean blocks before it;
    ``key_valid`` hides a row's right padding exactly as if the row were shorter."""
    model = fewstep.load_model(bases[family][0])
    noisy, clean = _canvas(model, _ids(bases[family][0], model))
    bs, n = 8, noisy.shape[1]
    with torch.no_grad():
        views = block_diffusion_logits(model, noisy, clean, bs)
        for b in range(n // bs):
            state = torch.cat((clean[:, : b * bs], noisy[:, b * bs : (b + 1) * bs]), dim=1)
            decoded = model(state, block_length=bs).logits[:, b * bs :]
            torch.testing.assert_close(views[:, b * bs : (b + 1) * bs], decoded, atol=2e-5, rtol=0)
        valid = torch.arange(n)[None] < torch.tensor([[n], [19]])
        padded = block_diffusion_logits(model, noisy, clean, bs, valid)
        short = block_diffusion_logits(model, noisy[1:, :19], clean[1:, :19], bs)
    torch.testing.assert_close(padded[0], views[0], atol=0, rtol=0)
    torch.testing.assert_close(padded[1, :19], short[0], atol=2e-5, rtol=0)
    assert not torch.allclose(views[1, 16:19], short[0, 16:19], atol=1e-3)  # without it the padding is seen


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_objectives_numbers(bases, family):
    folder, data = bases[family]
    model = fewstep.load_model(folder)
    ids = _ids(folder, model)
    examples = tokenize_pairs(read_jsonl(data), fewstep.load_tokenizer(folder))[:4]
    # dParallel: the per-sequence loss of a batch is the mean of each sequence's loss alone (batch invariance)
    dp = build_objective("dparallel", family, ids, 64)
    batch = dp.collate(examples, torch.Generator().manual_seed(1))
    with torch.no_grad():
        total, logs = dp.loss(model, batch)
        rows = [dp.loss(model, {k: v[i : i + 1] for k, v in batch.items()})[0] for i in range(len(examples))]
    assert float(total) == pytest.approx(float(sum(rows)) / len(rows), rel=1e-5)
    assert logs["consistency"] > 0 and 0 < logs["confidence"] < logs["loss"]
    # CD4LM: a teacher that sees the student's own view is matched exactly: KL 0, loss = (1 - λ)·CE
    cd = build_objective("cd4lm", family, ids, 64, lam=0.25)
    batch = cd.collate(examples, torch.Generator().manual_seed(2))
    assert torch.equal(
        batch["clean_input_ids"].masked_fill(batch["input_ids"] == ids.mask, ids.mask), batch["input_ids"]
    )
    same = dict(batch, teacher_consistency_input_ids=batch["input_ids"])
    with torch.no_grad():
        _, logs = cd.loss(model, same, teacher=model)
        _, nested = cd.loss(model, batch, teacher=model)
    assert logs["consistency_unclamped"] == pytest.approx(0.0, abs=1e-6)
    assert logs["loss"] == pytest.approx(0.75 * logs["reconstruction"], rel=1e-6)
    assert nested["consistency_unclamped"] > 0.01 and nested["reconstruction"] == pytest.approx(logs["reconstruction"])


def test_block_objectives_refuse_a_full_attention_model(bases, tiny_llada):
    ids = SpecialIds(mask=126336, eos=126081, pad=126081)
    obj = build_objective("dparallel", "llada2", ids, 16)
    batch = obj.collate([{"prompt_ids": [1, 2, 3], "response_ids": [4, 5]}], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="block-causal model"):
        obj.loss(tiny_llada, batch)


def _eval_loss(method: str, family: str, folder: Path, data: Path, model, teacher, info: dict) -> float:
    """The objective on three fixed batches of the training data (fixed masks): comparable across models."""
    ids = _ids(folder, teacher)
    examples = tokenize_pairs(read_jsonl(data), fewstep.load_tokenizer(folder))
    kw = {"lam": 0.5} if method == "cd4lm" else {}
    obj = build_objective(method, family, ids, info["max_length"], gen_length=info["gen_length"], **kw)
    total = 0.0
    for seed in range(3):
        with torch.no_grad():
            total += float(
                obj.loss(model, obj.collate(examples, torch.Generator().manual_seed(100 + seed)), teacher=teacher)[0]
            )
    return total / 3


def assert_drop_in(base: Path, folder: Path) -> None:
    """Same config keys, the same safetensors key set, every non-weight file of the base copied unchanged."""
    base_cfg, cfg = (json.loads((f / "config.json").read_text()) for f in (base, folder))
    assert set(cfg) == set(base_cfg) and cfg["auto_map"] == base_cfg["auto_map"]
    assert {k: v for k, v in cfg.items() if k != "torch_dtype"} == {
        k: v for k, v in base_cfg.items() if k != "torch_dtype"
    }
    assert set(load_file(str(folder / "model.safetensors"))) == set(load_file(str(base / "model.safetensors")))
    for f in base.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            assert (folder / f.name).read_bytes() == f.read_bytes(), f.name


RUNS = [
    ("llada2", "dparallel", "lora"),
    ("llada2", "cd4lm", "full"),
    ("sdar", "dparallel", "full"),
    ("sdar", "cd4lm", "lora"),
]


@pytest.mark.parametrize(("family", "method", "finetune"), RUNS)
def test_distill_on_block_models(bases, tmp_path, capsys, family, method, finetune):
    """A few steps of ``fewstep distill`` lower the objective on fixed batches; the student is a drop-in
    replacement of the base; LoRA adapts attention and experts, never the router, and merges back exactly."""
    folder, data = bases[family]
    out = tmp_path / "student"
    lr = ["--lora-r", "8", "--lr", "3e-3"] if finetune == "lora" else ["--lr", "3e-4"]
    args = ["distill", "--method", method, "--model", str(folder), "--data", str(data), "--out", str(out),
            "--finetune", finetune, "--batch-size", "8", "--max-steps", "8", "--warmup-steps", "0",
            "--schedule", "constant", "--threads", "1", "--no-progress", *lr]  # fmt: skip
    extra = ["--lambda", "0.5"] if method == "cd4lm" else ["--entropy-weight", "3"]  # not a block-model flag
    assert main([*args, *extra]) == 0
    printed = capsys.readouterr()
    assert (f"--entropy-weight does not apply to dparallel on {family} (ignored" in printed.err) == (
        method == "dparallel"
    )  # --lambda is a CD4LM field on every family: no warning
    info = json.loads((out / "training.json").read_text())
    assert (info["method"], info["finetune"], info["steps"]) == (method, finetune, 8)
    base, student = fewstep.load_model(folder), fewstep.load_model(out)
    before = _eval_loss(method, family, folder, data, base, base, info)
    after = _eval_loss(method, family, folder, data, student, base, info)
    assert after < 0.98 * before, (before, after)
    assert_drop_in(folder, out)
    if finetune == "lora":
        adapted = target_modules(base, ROLES)
        assert f"({len(adapted)} modules)" in printed.out and len(adapted) == {"llada2": 63, "sdar": 21}[family]
        keys = set(load_file(str(out / "adapter" / "adapter_model.safetensors")))
        assert any(".self_attn." in k or ".attention." in k for k in keys)
        assert any(".mlp." in k and "_proj" in k for k in keys) and not any(".mlp.gate.lora" in k for k in keys)
        if family == "llada2":
            assert any(".experts." in k for k in keys) and any(".shared_experts." in k for k in keys)
        merged = tmp_path / "merged"
        assert main(["merge-lora", "--base", str(folder), "--adapter", str(out / "adapter"), "--out", str(merged)]) == 0
        assert_drop_in(folder, merged)
        x = torch.tensor([[36, 3, 35, 28, 1, 20, 16, 23, 6, 11, *[_ids(folder, base).mask] * 14]])
        with torch.no_grad():
            torch.testing.assert_close(fewstep.load_model(merged)(x).logits, student(x).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_block_student_reloads_with_identical_logits(bases, tmp_path, family):
    """The Python API: train, run the student (LLaDA2 then computes with the stacked expert views), export,
    reload with ``fewstep.load_model``: the same logits, bit for bit."""
    folder, data = bases[family]
    model = fewstep.load_model(folder)
    examples = tokenize_pairs(read_jsonl(data), fewstep.load_tokenizer(folder))
    objective = build_objective("dparallel", family, _ids(folder, model), 48)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, lr=1e-3, warmup_steps=0, progress=False)
    trainer = Trainer(model, objective, examples, cfg)
    trainer.train()
    model.eval()
    x = torch.tensor([[36, 3, 35, 28, 1, 20, 16, 23, 6, 11, *[objective.ids.mask] * 14]])
    with torch.no_grad():
        want = model(x).logits
    trainer.export(tmp_path / "student")
    with torch.no_grad():
        got = fewstep.load_model(tmp_path / "student")(x).logits
        base = fewstep.load_model(folder)(x).logits
    assert torch.equal(got, want) and not torch.allclose(got, base, atol=1e-4)
    assert_drop_in(folder, tmp_path / "student")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rollout_then_distill_on_block_models(bases, tmp_path, family):
    """The user flow on a block model: ``fewstep rollout`` decodes with the model's own block (as ``fewstep
    generate``), each record is ``fewstep.generate``'s answer for its prompt alone (batched, sorted by length);
    ``fewstep distill`` trains on the folder; the student reloads with the logits of the trained model."""
    from fewstep.decoding import stop_ids

    folder = bases[family][0]
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 13, (6,), generator=g).tolist()
    prompts = [" ".join(f"t{t}" for t in torch.randint(0, 40, (n,), generator=g).tolist()) for n in lengths]
    data, student = tmp_path / "rollouts", tmp_path / "student"
    common = ["--model", str(folder), "--out", str(data), "--no-progress", "--threads", "1"]
    roll = ["rollout", *common, "--prompts", str(write_jsonl([{"prompt": p} for p in prompts], tmp_path / "p.jsonl"))]
    assert (
        main([*roll, "--policy", "threshold:0.5", "--gen-length", "12", "--cache", "prefix", "--batch-size", "4"]) == 0
    )
    model, tok = fewstep.load_model(folder), fewstep.load_tokenizer(folder)
    manifest = json.loads((data / "rollout.json").read_text())
    assert manifest["config"]["block_length"] == model.block_length == {"llada2": 32, "sdar": 4}[family]
    records = read_jsonl(next(data.glob("shard-*.jsonl")))
    assert sorted(r["prompt"] for r in records) == sorted(prompts)  # keep all: no verifier
    stops = stop_ids(model, tok)
    for rec in records:
        ids = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
        want = fewstep.generate(model, [ids], "threshold:0.5", gen_length=12, cache="prefix", tokenizer=tok)
        answer = want.answers[0].tolist()
        answer = answer[: next((i for i, t in enumerate(answer) if t in stops), len(answer))]
        assert (rec["response"], rec["nfe"]) == (tok.decode(answer, skip_special_tokens=True), int(want.nfe[0]))
    train = ["--method", "dparallel", "--data", str(data), "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3"]
    assert main(["distill", *common[:2], "--out", str(student), *train, "--threads", "1", "--no-progress"]) == 0
    info = json.loads((student / "training.json").read_text())
    assert (info["steps"], info["n_examples"], info["gen_length"], info["finetune"]) == (2, len(records), 12, "full")
    x = torch.tensor([tok(prompts[0], add_special_tokens=False)["input_ids"] + [_ids(folder, model).mask] * 8])
    with torch.no_grad():
        assert not torch.allclose(fewstep.load_model(student)(x).logits, model(x).logits, atol=1e-4)
    assert_drop_in(folder, student)
