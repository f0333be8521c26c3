"""DMax's On-Policy Uniform Training beyond the oracles: the data (flags, 32-EOS labels, σ-noise, the semi-AR
view), numeric properties of the loss, the rollout (eval mode, no grad, only masks change, x_0 untouched),
row independence, the recipes, and training through ``fewstep distill`` on both layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewstep
from fewstep.cli import main
from fewstep.distill import build_objective, objective_class, recipe_for
from fewstep.distill.blockdiff import block_diffusion_logits
from fewstep.distill.dmax import (
    IGNORE,
    BlockDiffusionDMaxObjective,
    DMaxObjective,
    DMaxRecipe,
    oput_examples,
    oput_labels,
    oput_loss,
    semi_ar_view,
    sigma_noise,
)
from fewstep.distill.dparallel import masked_cross_entropy
from fewstep.train.config import TrainConfig
from fewstep.train.objective import SpecialIds, align_logits
from fewstep.train.trainer import Trainer
from tests.distill.blockdata import block_checkpoint, teacher_answers, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FAMILY_DIRS = {"llada": "llada-tiny-a", "dream": "dream-tiny-a", "llada2": "llada2-tiny-a", "sdar": "sdar-tiny-a"}


def _ids(model) -> SpecialIds:
    cfg = model.config
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else 508
    return SpecialIds(mask=cfg.mask_token_id, eos=eos, pad=eos)


@pytest.fixture(scope="module", params=list(FAMILY_DIRS))
def family_model(request):
    return request.param, fewstep.load_model(FIXTURES / FAMILY_DIRS[request.param])


def _examples(n: int = 4, seed: int = 0, answer=(6, 14)) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = 5 + int(torch.randint(0, 6, (1,), generator=g))
        a = answer[0] + int(torch.randint(0, answer[1] - answer[0], (1,), generator=g))
        out.append({"prompt_ids": torch.randint(0, 40, (p,), generator=g).tolist(),
                    "response_ids": torch.randint(0, 40, (a,), generator=g).tolist()})  # fmt: skip
    return out


def _objective(family: str, model, max_length: int = 40, **kw):
    return build_objective("dmax", family, _ids(model), max_length, overrides={"block_size": 8, **kw})


# -- data ----------------------------------------------------------------------------------------------


def test_every_example_once_per_view():
    ex = [{"prompt_ids": [1], "response_ids": [2]}, {"prompt_ids": [3], "response_ids": [4]}]
    both = oput_examples(ex, "both")
    assert [(e["prompt_ids"], e["flag"]) for e in both] == [([1], True), ([1], False), ([3], True), ([3], False)]
    assert [e["flag"] for e in oput_examples(ex, "on-policy")] == [True, True]
    assert [e["flag"] for e in oput_examples(ex, "mdm")] == [False, False]
    assert "flag" not in ex[0]  # the caller's examples are not modified
    with pytest.raises(ValueError, match="views must be one of"):
        oput_examples(ex, "all")
    ids = SpecialIds(mask=9, eos=8, pad=8)
    with pytest.raises(ValueError, match="training_examples"):
        DMaxObjective(ids, 8, DMaxRecipe()).collate(ex, torch.Generator())
    mdm = DMaxObjective(ids, 8, DMaxRecipe(views="mdm")).collate(ex, torch.Generator().manual_seed(0))
    assert not bool(mdm["fill"].any()) and mdm["flag"].tolist() == [False, False]


def test_labels_keep_the_first_32_trailing_eos():
    eos, L = 8, 50
    rows = [
        [1, 2, 3, 4, 5, 6] + [eos] * 44,  # prompt 2, answer 4, trailing run of 44
        [1, 2, eos, 4, 5, 6] + [7] * 44,  # an EOS inside the answer keeps its label; no trailing run
        [eos] * L,  # all EOS: the run starts at 0
    ]
    labels = oput_labels(torch.tensor(rows), [2, 2, 3], eos)
    assert labels[0].tolist() == [IGNORE] * 2 + [3, 4, 5, 6] + [eos] * 32 + [IGNORE] * 12
    assert labels[1].tolist() == [IGNORE] * 2 + rows[1][2:]
    assert labels[2].tolist() == [IGNORE] * 3 + [eos] * 29 + [IGNORE] * 18
    assert (
        oput_labels(torch.tensor(rows[:1]), [2], eos, eos_labels=0)[0].tolist()
        == [IGNORE, IGNORE, 3, 4, 5, 6] + [IGNORE] * 44
    )


def test_sigma_noise_masks_the_answer_iid():
    x = torch.arange(1, 2001).view(2, 1000) % 40
    g = torch.Generator().manual_seed(0)
    noisy = sigma_noise(x, [10, 300], 99, g, (0.75, 0.75))
    assert torch.equal(noisy[0, :10], x[0, :10]) and torch.equal(noisy[1, :300], x[1, :300])
    assert not bool((noisy[noisy != 99] != x[noisy != 99]).any())  # only masks are written
    share = float((noisy[0, 10:] == 99).float().mean())
    assert 0.70 < share < 0.80
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sigma_noise(x, [10, 10], 99, g1), sigma_noise(x, [10, 10], 99, g2))
    assert torch.equal(sigma_noise(x, [10, 10], 99, g, (0.0, 0.0)), x)
    assert bool((sigma_noise(x, [10, 10], 99, g, (1.0, 1.0))[:, 10:] == 99).all())


def test_semi_ar_view_is_the_decoding_state_of_one_block():
    eos, mask, b, L = 8, 99, 6, 40
    x = torch.tensor([[1] * 5 + list(range(10, 23)) + [eos] * 22])  # prompt 5, answer 13, then EOS
    labels = oput_labels(x, [5], eos, eos_labels=4)  # labelled up to position 21
    starts = set()
    for seed in range(60):
        noisy, block_labels, span = semi_ar_view(x, labels, [5], mask, b, torch.Generator().manual_seed(seed))
        a, e = (int(i) for i in span[0].nonzero()[[0, -1]].squeeze(1))
        e += 1
        starts.add(a)
        assert (a - 5) % b == 0 and e == min(a + b, L)
        assert torch.equal(noisy[0, :a], x[0, :a])  # clean prefix
        assert bool((noisy[0, e:] == mask).all())  # all-mask future
        inside = noisy[0, a:e]
        assert bool(((inside == mask) | (inside == x[0, a:e])).all())
        assert torch.equal(block_labels[0, a:e], labels[0, a:e]) and bool((block_labels[0, ~span[0]] == IGNORE).all())
        assert bool((block_labels[0] != IGNORE).any())  # the block always holds a label
    assert starts == {5, 11, 17}  # every block that holds a label (positions 5..21), none past them
    noisy, _, span = semi_ar_view(x, labels, [5], mask, None, torch.Generator().manual_seed(0))
    assert bool(span[0, 5:].all()) and not bool(span[0, :5].any())  # no block: the whole answer


# -- the loss and the rollout ----------------------------------------------------------------------------


def _view_logits(family: str, model, noisy, clean, block: int):
    if family in ("llada2", "sdar"):
        return block_diffusion_logits(model, noisy, clean, block)
    return align_logits(model(noisy).logits, model.logit_shift)


def test_mdm_view_is_the_ce_on_masked_and_clean_positions(family_model):
    """Flag False: no rollout; the loss is the CE over every labelled position, masked and clean alike, i.e.
    the count-weighted mean of the masked-position CE and the clean-position CE."""
    family, model = family_model
    obj = _objective(family, model, views="mdm")
    batch = obj.collate(obj.training_examples(_examples(2)), torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(obj.on_policy_input(model, batch), batch["noisy_input_ids"])
        loss, _ = obj.loss(model, batch)
        logits = _view_logits(family, model, batch["noisy_input_ids"], batch["input_ids"], 8)
    for i in range(2):
        labels, noisy = batch["labels"][i : i + 1], batch["noisy_input_ids"][i : i + 1]
        lab = labels != IGNORE
        masked, clean = lab & (noisy == obj.ids.mask), lab & (noisy != obj.ids.mask)
        assert bool(masked.any()) and bool(clean.any())
        safe = labels.clamp_min(0)
        ce_m = masked_cross_entropy(logits[i : i + 1], safe, masked)
        ce_c = masked_cross_entropy(logits[i : i + 1], safe, clean)
        want = (masked.sum() * ce_m + clean.sum() * ce_c) / lab.sum()
        assert float(oput_loss(logits[i : i + 1], labels)) == pytest.approx(float(want), rel=1e-5)
    rows = [float(oput_loss(logits[i : i + 1], batch["labels"][i : i + 1])) for i in range(2)]
    assert float(loss) == pytest.approx(sum(rows) / 2, rel=1e-5)


def test_rollout_fills_only_masks_with_the_argmax_and_never_touches_x0(family_model):
    family, model = family_model
    obj = _objective(family, model)
    batch = obj.collate(obj.training_examples(_examples(3, seed=1)), torch.Generator().manual_seed(4))
    before = {k: v.clone() for k, v in batch.items()}
    with torch.no_grad():
        x_t = obj.on_policy_input(model, batch)
        obj.loss(model, batch)
        argmax = _view_logits(family, model, batch["noisy_input_ids"], batch["input_ids"], 8).argmax(-1)
    assert all(torch.equal(batch[k], before[k]) for k in batch)  # x_0 and the noisy view untouched
    noisy, fill, flag = batch["noisy_input_ids"], batch["fill"], batch["flag"]
    assert flag.tolist() == [True, False] * 3 and bool(fill[flag].any()) and not bool(fill[~flag].any())
    assert torch.equal(x_t[~fill], noisy[~fill])  # everything else, MDM rows included, is unchanged
    assert torch.equal(x_t[fill], argmax[fill])  # each mask is the one-shot argmax of the view (Dream: shifted)
    left = x_t[flag] == obj.ids.mask
    if family in ("llada2", "sdar"):
        assert not bool(left.any()) and torch.equal(fill, (noisy == obj.ids.mask) & flag[:, None])
    else:  # semi-AR: the block's masks are filled, the future stays masked
        assert bool(left.any()) and not bool((left & fill[flag]).any())


class _Spy(nn.Module):
    """Records ``(training, grad enabled)`` at every forward of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.logit_shift, self.block_diffusion = model.logit_shift, getattr(model, "block_diffusion", False)
        self.block_length = getattr(model, "block_length", None)

    def forward(self, *args, **kwargs):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("family", ["llada", "llada2"])
def test_rollout_runs_in_eval_mode_without_grad(family):
    model = fewstep.load_model(FIXTURES / FAMILY_DIRS[family]).requires_grad_(True)
    spy = _Spy(model).train()
    obj = _objective(family, model)
    batch = obj.collate(obj.training_examples(_examples(1)), torch.Generator().manual_seed(0))
    loss, logs = obj.loss(spy, batch)
    assert spy.calls == [(False, False), (True, True)] and spy.training and model.training
    loss.backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    assert logs["on_policy_rows"] == 0.5 and 0.0 <= logs["filled_wrong"] <= 1.0
    spy.calls.clear()
    spy.eval()
    with torch.no_grad():
        obj.loss(spy, batch)
    assert spy.calls == [(False, False), (False, False)] and not spy.training  # eval state restored


def test_each_row_gets_what_it_gets_alone(family_model):
    family, model = family_model
    obj = _objective(family, model)
    batch = obj.collate(obj.training_examples(_examples(2, seed=2)), torch.Generator().manual_seed(5))
    with torch.no_grad():
        x_t = obj.on_policy_input(model, batch)
        total, _ = obj.loss(model, batch)
        alone = []
        for i in range(4):
            row = {k: v[i : i + 1] for k, v in batch.items()}
            assert torch.equal(obj.on_policy_input(model, row), x_t[i : i + 1])
            alone.append(float(obj.loss(model, row)[0]))
    assert float(total) == pytest.approx(sum(alone) / 4, rel=1e-5)
    token_mean = _objective(family, model, views="both")
    token_mean.per_sequence = False
    with torch.no_grad():
        pooled, _ = token_mean.loss(model, batch)
        logits = _view_logits(family, model, x_t, batch["input_ids"], 8)
    lab = batch["labels"]
    want = F.cross_entropy(logits[lab != IGNORE], lab[lab != IGNORE])
    assert float(pooled) == pytest.approx(float(want), rel=1e-5)


def test_loss_edge_cases():
    logits = torch.randn(1, 6, 11, requires_grad=True)
    labels = torch.tensor([[IGNORE, 3, 4, IGNORE, 5, 6]])
    shifted = oput_loss(logits, labels, same_token=False).detach()
    assert float(shifted) == pytest.approx(
        float(F.cross_entropy(logits.detach()[0, [0, 1, 3, 4]], labels[0, [1, 2, 4, 5]]))
    )
    empty = oput_loss(logits, torch.full_like(labels, IGNORE))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


# -- recipes and training ------------------------------------------------------------------------------


def test_recipes():
    official = recipe_for("dmax", "llada2")
    assert (official.finetune, official.lr, official.schedule, official.warmup_ratio, official.epochs) == (
        "full",
        2e-6,
        "cosine",
        0.03,
        2.0,
    )
    assert official.warmup_for(1000) == 30 and official.block_size == 32 and not official.shifted_labels
    assert (official.noise_range_low, official.noise_range_high, official.views, official.eos_labels) == (
        0.75,
        0.75,
        "both",
        32,
    )
    ids = SpecialIds(mask=9, eos=8, pad=8)
    for family in FAMILY_DIRS:
        obj = build_objective("dmax", family, ids, 2048)
        assert type(obj) is objective_class("dmax", family) and obj.name == "dmax"
        assert obj.recipe.noise_range == (0.75, 0.75) and obj.per_sequence and obj.recipe.views == "both"
    assert type(build_objective("dmax", "sdar", ids, 64)) is BlockDiffusionDMaxObjective
    assert build_objective("dmax", "sdar", ids, 64).recipe.block_size is None  # SDAR: the model's block length
    assert type(build_objective("dmax", "dream", ids, 64)) is DMaxObjective
    assert (
        build_objective("dmax", "llada", ids, 64, block_size=0).recipe.block_size or None
    ) is None  # 0: whole answer
    assert not build_objective("dmax", "llada2", ids, 64, shifted_labels=True).same_token_labels


def _fixed_loss(obj, model, examples) -> float:
    with torch.no_grad():
        return sum(
            float(obj.loss(model, obj.collate(examples, torch.Generator().manual_seed(100 + s)))[0]) for s in range(3)
        )


@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_training_lowers_the_oput_loss(family, tmp_path):
    """The Python API: ``objective.training_examples`` then the one trainer; the OPUT loss on fixed batches
    (both views, fixed noise) drops."""
    model = fewstep.load_model(FIXTURES / FAMILY_DIRS[family])
    obj = _objective(family, model, max_length=32)
    examples = obj.training_examples(_examples(8, seed=7))
    before = _fixed_loss(obj, model, examples)
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=6, batch_size=8, lr=1e-3, warmup_steps=0, progress=False)
    Trainer(model, obj, examples, cfg).train()
    after = _fixed_loss(obj, model, examples)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_distill_dmax_on_llada2(tmp_path, capsys, finetune):
    """``fewstep distill --method dmax`` on the LLaDA2 fixture (its own greedy answers): each example trained
    once per view, the official settings recorded, a loadable student."""
    folder = block_checkpoint("llada2", tmp_path / "base")
    records = teacher_answers("llada2")
    data = write_jsonl(records, tmp_path / "data.jsonl")
    out = tmp_path / "student"
    lora = ["--lora-r", "4"] if finetune == "lora" else []
    args = ["distill", "--method", "dmax", "--model", str(folder), "--data", str(data), "--out", str(out),
            "--finetune", finetune, "--batch-size", "8", "--max-steps", "3", "--lr", "1e-3", "--threads", "1",
            "--no-progress", *lora]  # fmt: skip
    assert main(args) == 0
    assert "dmax on llada2" in capsys.readouterr().out
    info = json.loads((out / "training.json").read_text())
    assert (info["method"], info["finetune"], info["steps"], info["n_examples"]) == (
        "dmax",
        finetune,
        3,
        2 * len(records),
    )
    hp = info["objective_hparams"]
    hp = (hp["block_size"], [hp["noise_range_low"], hp["noise_range_high"]], hp["views"], hp["eos_labels"], hp)
    assert hp[:4] == (32, [0.75, 0.75], "both", 32) and not hp[4]["shifted_labels"]  # the recipe's own fields
    assert info["schedule"] == "cosine" and "on-policy uniform training" in (out / "README.md").read_text()
    losses = [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses)
    student = fewstep.load_model(out)
    x = torch.tensor([[36, 3, 35, 28, 1, 20, 16, 23, 6, 11]])
    with torch.no_grad():
        assert not torch.equal(student(x).logits, fewstep.load_model(folder)(x).logits)


def test_distill_dmax_semi_ar_on_the_arith_teacher(arith_teacher, arith_rollouts, tmp_path):
    out = tmp_path / "dmax"
    args = ["distill", "--method", "dmax", "--model", str(arith_teacher), "--data", str(arith_rollouts),
            "--out", str(out), "--finetune", "lora", "--lora-r", "4", "--views", "on-policy", "--block-size", "8",
            "--batch-size", "8", "--max-steps", "2", "--lr", "1e-3", "--threads", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["n_examples"] == 48 and info["objective_hparams"]["views"] == "on-policy"
    assert info["objective_hparams"]["block_size"] == 8 and info["finetune"] == "lora"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and fewstep.load_model(out).architecture == "llada"
