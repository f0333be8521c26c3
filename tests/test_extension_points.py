"""Each extension point is one declaration where the thing lives, and the rest of fewstep reads it.

A distillation method is its paper file plus one row of ``fewstep.distill.METHODS``; a model family is its
architecture file; a benchmark is one ``register_task``; a checkpoint's recommended decoding is its
``decoding.json``. The settings the commands expose come from the config dataclasses (``TrainConfig``, the
recipes), whose fields carry their default and help. Each test below adds a new one the way a contributor
would and checks that the commands and the library pick it up.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.cli import build_parser, main
from fewstep.train.config import SCHEDULES, TrainConfig
from fewstep.train.objective import SpecialIds

REPO = Path(__file__).resolve().parents[1]
LLADA = REPO / "tests" / "fixtures" / "llada-tiny-a"
IDS = SpecialIds(mask=4, eos=2, pad=0)

# -- the trainer's settings ------------------------------------------------------------------------------

#: ``fewstep pretrain``'s flag defaults as the command wrote them by hand before they came from TrainConfig.
PRETRAIN_DEFAULTS = {
    "max_steps": 1000,
    "batch_size": 64,
    "grad_accum": 1,
    "lr": 1e-3,
    "schedule": "constant",
    "warmup_steps": 100,
    "decay_steps": 0,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "seed": 0,
    "bf16": False,
    "gradient_checkpointing": False,
    "save_every": 500,
    "keep_checkpoints": 2,
    "log_every": 10,
}


def _parse(command: str, *argv: str):
    return build_parser(command).parse_args([command, *argv])


def _help(command: str) -> str:
    sub = next(a for a in build_parser(command)._actions if a.dest == "command")
    return " ".join(sub.choices[command].format_help().split())


def test_pretrain_flags_are_train_config_fields_with_its_defaults():
    args = _parse("pretrain", "--data", "d", "--tokenizer", "t", "--out", "o")
    assert {k: getattr(args, k) for k in PRETRAIN_DEFAULTS} == PRETRAIN_DEFAULTS
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert {k: fields[k].default for k in PRETRAIN_DEFAULTS} == PRETRAIN_DEFAULTS  # one set of defaults
    text = _help("pretrain")
    for name in PRETRAIN_DEFAULTS:  # argparse wraps lines at hyphens too: compare without whitespace
        assert "".join(fields[name].metadata["help"].split()) in "".join(text.split()), name
    assert "{constant,cosine,linear,wsd}" in text and SCHEDULES == ("constant", "cosine", "linear", "wsd")


def test_distill_run_flags_come_from_train_config_and_the_optimiser_from_the_recipe():
    args = _parse("distill", "--method", "dparallel", "--model", "m", "--data", "d", "--out", "o")
    run = {k: getattr(args, k) for k in ("batch_size", "grad_accum", "grad_clip", "seed", "keep_checkpoints")}
    assert run == {"batch_size": 64, "grad_accum": 1, "grad_clip": 1.0, "seed": 0, "keep_checkpoints": 2}
    assert (args.max_steps, args.save_every, args.log_every, args.decay_steps) == (None, None, None, 0)
    assert (args.lr, args.weight_decay, args.adam_beta2, args.min_lr_ratio) == (None, None, None, None)
    from fewstep.distill import recipe_for

    optimiser = recipe_for("cd4lm", "llada").optimiser(max_steps=1000)
    assert optimiser == {
        "lr": 5e-6,
        "schedule": "constant",
        "warmup_steps": 200,
        "min_lr_ratio": 0.0,
        "weight_decay": 0.01,
        "betas": (0.9, 0.999),
    }
    text = _help("distill")
    assert "--schedule {constant,cosine,linear,wsd}" in text and "--decay-steps" in text
    assert "--max-steps MAX_STEPS optimiser steps (default: --epochs of the data)" in text


@pytest.mark.parametrize(
    ("method", "family", "field", "value", "message"),
    [
        ("dparallel", "llada", "temperature", 0.0, "--temperature must be > 0; got 0.0"),
        ("dparallel", "llada", "mask_ratio", 1.5, "--mask-ratio must lie in [0, 1]; got 1.5"),
        ("dparallel", "llada", "block_size", -1, "--block-size must be >= 0; got -1"),
        ("dparallel", "sdar", "noise_range_low", 0.9, "--noise-range-low must lie in [0, high]; got 0.9"),
        ("cd4lm", "llada", "lam", 2.0, "--lambda must lie in [0, 1]; got 2.0"),
        ("cd4lm", "dream", "teacher_visible", "x", "--teacher-visible must be one of logits, token; got 'x'"),
        ("cd4lm", "llada2", "schedule", "step", "--schedule must be one of constant, cosine, linear, wsd"),
        ("dparallel", "dream", "lr", 0.0, "--lr must be > 0; got 0.0"),
    ],
)
def test_recipes_reject_out_of_range_values_in_one_line(method, family, field, value, message):
    from fewstep.distill import build_objective

    with pytest.raises(ValueError) as err:
        build_objective(method, family, IDS, 64, **{field: value})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_cli_reports_a_recipe_range_error_before_any_work(tmp_path, capsys):
    argv = ["distill", "--method", "dparallel", "--model", "teacher", "--data", str(tmp_path / "none.jsonl")]
    assert main([*argv, "--out", str(tmp_path / "o"), "--temperature", "0"]) == 2
    assert capsys.readouterr().err.strip() == "fewstep distill: error: --temperature must be > 0; got 0.0"


# -- a distillation method: its paper file and one row ---------------------------------------------------

TOY_PAPER = """
from dataclasses import dataclass
from typing import ClassVar

import torch

from fewstep.train.config import option, require
from fewstep.train.objective import RecipeObjective
from fewstep.train.recipe import TrainingRecipe


class ToyObjective(RecipeObjective):
    name = "toy"

    def collate(self, examples, generator):
        return {"input_ids": torch.tensor([e["prompt_ids"] for e in examples])}

    def loss(self, model, batch, *, step=0, max_steps=1, teacher=None):
        logits = self.logits(model, batch["input_ids"])
        return self.reduce(len(logits), lambda rows: (self.recipe.toy_weight * logits[rows].mean(), {}))


@dataclass(frozen=True)
class ToyRecipe(TrainingRecipe):
    objective_class: ClassVar[type] = ToyObjective

    toy_weight: float = option(0.5, "toy: weight of the toy term")

    def __post_init__(self):
        super().__post_init__()
        require(self, "toy_weight", self.toy_weight >= 0, "be >= 0")


RECIPES = {"llada": ToyRecipe(lr=1e-4, epochs=2.0)}
"""


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    import fewstep.distill as distill

    (tmp_path / "toy_paper.py").write_text(TOY_PAPER)
    monkeypatch.setattr(distill, "__path__", [*distill.__path__, str(tmp_path)])
    monkeypatch.setitem(distill.METHODS, "toy", distill.Method("toy", "toy_paper", "toy distillation"))
    yield "toy"
    sys.modules.pop("fewstep.distill.toy_paper", None)


def test_a_new_method_is_its_paper_file_and_one_row(toy_method):
    from fewstep.distill import all_recipes, build_objective, objective_class, recipe_for

    args = _parse("distill", "--method", "toy", "--model", "m", "--data", "d", "--out", "o", "--toy-weight", "2")
    assert recipe_for("toy", "llada", vars(args)).toy_weight == 2.0
    assert "toy 0.5" in _help("distill") and ",toy}" in _help("distill")  # a --method choice, listed last
    objective = build_objective("toy", "dream", IDS, 16)  # Dream takes the paper's LLaDA row
    assert type(objective) is objective_class("toy", "dream") and objective.recipe.lr == 1e-4
    assert objective.hparams() == {"toy_weight": 0.5, "per_sequence": True, "max_length": 16}
    assert {"toy/llada", "toy/dream"} <= set(all_recipes()) and "toy/llada2" not in all_recipes()
    with pytest.raises(ValueError, match="no toy recipe for 'sdar'"):
        recipe_for("toy", "sdar")
    with pytest.raises(ValueError, match=r"^--toy-weight must be >= 0; got -1\.0$"):
        build_objective("toy", "llada", IDS, 16, toy_weight=-1.0)
    model = fewstep.load_model(LLADA)
    loss, _ = objective.loss(model, objective.collate([{"prompt_ids": [5, 6]}, {"prompt_ids": [7, 8]}], None))
    assert torch.isfinite(loss)


def test_the_model_card_titles_the_method_from_its_row(toy_method, tmp_path):
    from fewstep.commands.distill import write_model_card

    info = {"method": "toy", "base_model": "b", "finetune": "full", "command": "fewstep distill --method toy"}
    write_model_card(tmp_path, info)
    assert "(toy distillation, full fine-tuning)" in (tmp_path / "README.md").read_text()


# -- a model family: its architecture file ----------------------------------------------------------------

TOY_FAMILY = '''
from fewstep.models.llada import LLaDAModel


class ToyModel(LLaDAModel):
    """A LLaDA-shaped family declared in its own file."""

    architecture = "toy"
    model_types = ("toy_lm", "ToyForMaskedLM")
    family_order = 50
    recipes_from = ("toy", "llada")
'''


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    import fewstep.models as models
    from fewstep.models.families import families

    (tmp_path / "toy_family.py").write_text(TOY_FAMILY)
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(tmp_path)])
    families.cache_clear()
    yield "toy"
    sys.modules.pop("fewstep.models.toy_family", None)
    families.cache_clear()


def test_a_new_family_is_its_architecture_file(toy_family, tmp_path):
    from fewstep.distill import all_recipes, recipe_for
    from fewstep.distill.dparallel import RECIPES
    from fewstep.models.families import architecture_of, families
    from fewstep.train.lora import lora_roles, target_regex

    assert list(families()) == ["llada", "dream", "llada2", "sdar", "toy"]
    assert architecture_of({"model_type": "TOY_LM"}) == architecture_of({"architectures": ["ToyForMaskedLM"]})
    assert architecture_of({"model_type": "toy_lm"}) == "toy"
    assert recipe_for("dparallel", "toy") == RECIPES["llada"] and "cd4lm/toy" in all_recipes()
    assert lora_roles("dparallel", "toy") == ("q", "k", "v", "up") and target_regex("toy", ["q"]) == target_regex(
        "llada", ["q"]
    )
    folder = tmp_path / "ckpt"
    shutil.copytree(LLADA, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "toy_lm"}))
    toy, llada = fewstep.load_model(folder), fewstep.load_model(LLADA)
    assert type(toy).__name__ == "ToyModel" and toy.architecture == "toy"
    x = torch.tensor([[5, 9, 12, 2]])
    torch.testing.assert_close(toy(input_ids=x).logits, llada(input_ids=x).logits, rtol=0, atol=0)


def test_unknown_families_are_named_in_one_line():
    from fewstep.models.families import architecture_of, model_class

    with pytest.raises(ValueError, match=r"^unknown model family 'gpt2'; families: llada, dream, llada2, sdar$"):
        model_class("gpt2")
    with pytest.raises(ValueError, match=r"fewstep supports LLaDA \('llada'\), Dream \('Dream'\), LLaDA2-MoE"):
        architecture_of({"model_type": "gpt2"})


# -- a benchmark: one registration -----------------------------------------------------------------------


def test_a_benchmark_registered_once_is_an_eval_task_a_prompt_set_and_a_verifier(monkeypatch):
    from fewstep.distill import rollout as ro
    from fewstep.eval import benchmarks
    from fewstep.eval.benchmarks import Task, TrainPrompts, get_task

    rows = [{"id": str(i), "question": f"{i} + {i} ?", "gold": str(2 * i)} for i in range(5)]
    task = Task(
        "doubles",
        "math",
        "doubling",
        load=lambda: rows,
        extract=lambda r, resp: resp.strip().split()[-1] if resp.strip() else None,
        check=lambda r, x: x == r["gold"],
        train=TrainPrompts(
            "doubling prompts", lambda limit, seed, protocol: [{**r, "prompt": r["question"]} for r in rows][:limit]
        ),
    )
    monkeypatch.setitem(benchmarks.TASKS, "doubles", task)
    assert get_task("doubles") is task
    assert "doubles" in ro.prompt_set_names() and "doubles" in ro.verifier_names()
    records, verifier = ro.load_prompts("doubles", limit=3)
    assert verifier == "doubles" and [r["prompt"] for r in records] == ["0 + 0 ?", "1 + 1 ?", "2 + 2 ?"]
    verify = ro.get_verifier(verifier)
    assert verify(records[2], "it is 4") and not verify(records[2], "it is 5")
    # the embedded task and GSM8K are rollout sources through the same registry, registered once
    assert set(ro.prompt_set_names()) == {n for n, t in benchmarks.TASKS.items() if t.train is not None}
    assert {"arith", "gsm8k"} <= set(ro.prompt_set_names())
    assert get_task("math") is get_task("math500") and "math" in ro.verifier_names()


# -- a checkpoint's recommended decoding ------------------------------------------------------------------


def test_decoding_json_round_trip_and_errors(tmp_path):
    from fewstep.models.saving import read_decoding, recommended, write_decoding

    assert read_decoding(tmp_path) == {}
    write_decoding(tmp_path, policy="entropy:0.45", gen_length=64, early_stop=False)
    assert read_decoding(tmp_path) == {"policy": "entropy:0.45", "gen_length": 64, "early_stop": False}
    fallback = {"policy": "threshold:0.9", "gen_length": 128, "cache": "none", "early_stop": True}
    given = {"policy": None, "gen_length": 32, "cache": None, "early_stop": None}
    assert recommended(tmp_path, given, fallback) == {
        "policy": "entropy:0.45",  # the file's
        "gen_length": 32,  # the flag's
        "cache": "none",  # the command's default
        "early_stop": False,
    }
    with pytest.raises(ValueError, match="unknown decoding setting 'steps'"):
        write_decoding(tmp_path, steps=4)
    (tmp_path / "decoding.json").write_text('{"gen_length": "64"}')
    with pytest.raises(ValueError, match="gen_length must be a JSON int"):
        read_decoding(tmp_path)


def test_the_shipped_students_carry_their_recommended_decoding():
    from fewstep.assets import resolve_model
    from fewstep.models.saving import read_decoding

    measured = {  # each model's recommended rule on the embedded task (docs/results.md, the model cards)
        "teacher": "multiblock:0.5",
        "cd4lm": "cad:0.95",
        "d3llm": "cad:0.95",
        "dmax": "threshold:0.9",
        "dparallel": "cad:0.95",
        "dparallel-control": "threshold:0.9",
    }
    for name, policy in measured.items():
        rec = read_decoding(resolve_model(name))
        assert (rec["policy"], rec["gen_length"], rec["block_length"]) == (policy, 64, 8), name


def test_generate_serve_and_rollout_take_the_recommendation_for_unset_flags(tmp_path):
    from fewstep.commands import rollout, serve
    from fewstep.decoding import parse_policy
    from fewstep.models.saving import write_decoding

    folder = tmp_path / "student"
    shutil.copytree(LLADA, folder)
    write_decoding(folder, policy="entropy:0.45", gen_length=16, block_length=8, cache="prefix")
    trace = tmp_path / "t.json"
    argv = ["generate", "--model", str(folder), "--prompt-ids", "5 9 12", "--json", "--trace-json", str(trace)]
    assert main(argv) == 0
    doc = json.loads(trace.read_text())
    assert (doc["gen_length"], doc["block_length"]) == (16, 8)
    assert parse_policy("entropy:0.45").describe() in json.dumps(doc)
    assert main([*argv, "--policy", "llada", "--gen-length", "8"]) == 0  # a flag wins over the file
    assert json.loads(trace.read_text())["gen_length"] == 8
    _, cfg = serve.build(_parse("serve", "--model", "dparallel"))
    d = cfg.defaults
    assert (d.policy, d.max_tokens, d.block_length, d.cache, d.early_stop) == ("cad:0.95", 64, 8, "none", True)
    args = _parse("rollout", "--model", str(folder), "--prompts", "arith", "--out", str(tmp_path / "r"))
    r = rollout.rollout_config(args, folder, "arith")
    assert (r.policy, r.gen_length, r.block_length, r.cache, r.early_stop) == ("entropy:0.45", 16, 8, "prefix", True)
    plain = rollout.rollout_config(
        _parse("rollout", "--model", str(LLADA), "--prompts", "arith", "--out", "o"), LLADA, None
    )
    assert (plain.policy, plain.gen_length, plain.cache, plain.early_stop) == ("llada", 256, "none", True)
