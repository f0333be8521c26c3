"""Each paper's recipe is one typed dataclass per model family: the single source of the CLI flags, the
Python API's defaults and the recipe table of docs/distillation.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fewstep.cli import build_parser
from fewstep.distill import all_recipes, build_objective, recipe_for, recipe_table
from fewstep.distill.cd4lm import CD4LMObjective, CD4LMRecipe
from fewstep.distill.dparallel import RECIPES as DPARALLEL_RECIPES
from fewstep.distill.dparallel import DParallelObjective, DParallelRecipe
from fewstep.train.objective import SpecialIds

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "distillation.md"
IDS = SpecialIds(mask=4, eos=2, pad=0)


def _args(*argv: str):
    base = ["distill", "--method", "dparallel", "--model", "m", "--data", "d", "--out", "o"]
    return build_parser("distill").parse_args([*base, *argv])


def test_docs_recipe_table_is_built_from_the_recipes():
    text = GUIDE.read_text()
    start, end = text.index("<!-- recipes:start -->\n"), text.index("<!-- recipes:end -->")
    assert text[start + len("<!-- recipes:start -->\n") : end] == recipe_table()


def test_every_recipe_field_is_a_cli_flag_whose_unset_value_is_the_recipes():
    args = _args()
    for label, recipe in all_recipes().items():
        for f in dataclasses.fields(recipe):
            assert f.metadata["help"], (label, f.name)
            assert getattr(args, f.name) is None  # unset: the recipe's value for the model's family
    assert recipe_for("dparallel", "dream", vars(args)) == recipe_for("dparallel", "dream")
    over = recipe_for("dparallel", "llada", vars(_args("--lr", "1e-3", "--block-size", "0", "--warmup-steps", "7")))
    assert (over.lr, over.block_size, over.warmup_for(100), over.epochs) == (1e-3, 0, 7, 6.0)
    assert recipe_for("dparallel", "dream").warmup_for(200) == 10  # 5 % of the run
    sub = next(a for a in build_parser("distill")._actions if a.dest == "command")
    help_text = sub.choices["distill"].format_help()
    assert "dparallel/llada 6.0; dparallel/dream 3.0; dparallel/llada2 1.0; dparallel/sdar 1.0; cd4lm 10.0" in " ".join(
        help_text.split()
    )


def test_python_api_defaults_are_the_papers():
    llada = build_objective("dparallel", "llada", IDS, 384)
    dream = build_objective("dparallel", "dream", IDS, 384)
    assert isinstance(llada, DParallelObjective) and (llada.recipe.block_size, llada.recipe.entropy_weight) == (32, 2.0)
    assert (dream.recipe.block_size, dream.recipe.entropy_weight, dream.recipe.temperature) == (None, 1.0, 0.5)
    assert DPARALLEL_RECIPES["llada"].block_size == 32 and DPARALLEL_RECIPES["dream"].block_size is None
    cd = build_objective("cd4lm", "llada", IDS, 512, gen_length=64, temperature=3.0, eos_pad=True)
    assert isinstance(cd, CD4LMObjective)
    assert (cd.recipe.temperature, cd.recipe.initial_lambda, cd.eos_pad_to) == (3.0, 0.9, 64)
    assert isinstance(recipe_for("cd4lm", "dream"), CD4LMRecipe) and isinstance(
        recipe_for("dparallel", "llada"), DParallelRecipe
    )
    with pytest.raises(ValueError, match="lambda-warmup-ratio"):
        build_objective("cd4lm", "llada", IDS, 512, lambda_warmup_ratio=1.0)
    with pytest.raises(ValueError, match="no dparallel recipe"):
        recipe_for("dparallel", "gpt2")


def test_block_families_get_the_block_diffusion_objectives():
    from fewstep.distill import objective_class
    from fewstep.distill.cd4lm import BlockDiffusionCD4LMObjective
    from fewstep.distill.dparallel import BlockDiffusionDParallelObjective

    for family in ("llada2", "sdar"):
        dp = build_objective("dparallel", family, IDS, 384)
        assert type(dp) is BlockDiffusionDParallelObjective is objective_class("dparallel", family)
        # dFactory's settings; block None = the model's block length; per-sequence normalisation by default
        r = dp.recipe
        assert (r.block_size, r.confidence_beta, r.noise_range, not r.shifted_labels) == (None, 1.0, (0.3, 0.8), True)
        assert dp.per_sequence and recipe_for("dparallel", family).finetune == "full"
        hp = dp.hparams()  # what training.json records: the recipe's own fields, JSON as it reads back
        assert (hp["noise_range_low"], hp["noise_range_high"]) == (0.3, 0.8) and json.loads(json.dumps(hp)) == hp
        over = build_objective(
            "dparallel", family, IDS, 96, overrides=vars(_args("--block-size", "8", "--shifted-labels"))
        )
        assert (over.recipe.block_size, not over.recipe.shifted_labels) == (8, False)
        cd = build_objective("cd4lm", family, IDS, 512, gen_length=64, eos_pad=True, block_size=4)
        assert type(cd) is BlockDiffusionCD4LMObjective is objective_class("cd4lm", family)
        assert (cd.recipe.block_size, cd.recipe.temperature, cd.eos_pad_to) == (4, 2.0, 64)
    assert objective_class("dparallel", "llada") is DParallelObjective
    assert objective_class("cd4lm", "dream") is CD4LMObjective


def test_flags_the_chosen_recipe_lacks_are_named():
    """``fewstep distill`` warns about recipe flags that the method/family ignores (train.recipe.unused_flags)."""
    from fewstep.train.recipe import unused_flags

    args = _args("--entropy-weight", "3", "--block-size", "0", "--lambda", "0.5", "--reference-masking", "--lr", "1")
    block_dp, llada_dp = recipe_for("dparallel", "sdar"), recipe_for("dparallel", "llada")
    assert unused_flags(block_dp, all_recipes(), args) == ["--entropy-weight", "--reference-masking", "--lambda"]
    assert unused_flags(llada_dp, all_recipes(), args) == ["--lambda"]  # --block-size 0 is set, and is a field
    assert unused_flags(recipe_for("cd4lm", "llada"), all_recipes(), args) == [
        "--block-size",
        "--entropy-weight",
        "--reference-masking",
    ]
    assert unused_flags(block_dp, all_recipes(), _args("--confidence-beta", "2")) == []
