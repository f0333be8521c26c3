"""One set of decoding defaults (issue 24, item 3; issue 25: declared once): the API and every command take
an unset setting from the model's recommended decoding, else from ``fewstep.decoding.defaults``; the same
prompt gets the same NFE from ``fewstep.generate`` and ``fewstep generate``; a failed first ``eval`` does
not lock its folder."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

import fewstep
from fewstep.cli import COMMANDS, build_parser
from fewstep.decoding.defaults import CACHE_MODES, DEFAULTS, resolve_decoding
from fewstep.models.saving import write_decoding
from tests.commands.conftest import GEN, LLADA, assert_one_line_error, run_cli

PROMPT = "3 + 4 - 2 + 8 - 1 ?"


def test_the_api_and_the_cli_report_the_same_nfe(capsys):
    """The issue's NFE 6 against 5: the shipped teacher, one prompt, no decoding argument on either side."""
    model, tok = fewstep.load_model("teacher"), fewstep.load_tokenizer("teacher")
    api = fewstep.generate(model, [tok(PROMPT)["input_ids"]], tokenizer=tok)
    code, out, err = run_cli(capsys, "generate", "--prompt", PROMPT, "--no-chat-template", "--json")
    assert code == 0, err
    cli = json.loads(out)
    assert cli["results"][0]["nfe"] == int(api.nfe[0])
    assert cli["gen_length"] == api.answers.shape[1] == 64  # the teacher was trained at 64 (training.json)
    assert api.finished_early is not None and bool(api.finished_early[0])  # early stop on both sides


def test_generate_on_the_default_model_answers_right(capsys):
    """`fewstep generate` on the shipped teacher at its defaults (its training length, not 256 or 128)."""
    from fewstep.tasks import generate_problems, verify

    problems = generate_problems("test", 4, seed=0)
    argv = ["generate", "--no-chat-template", "--json"] + [a for p in problems for a in ("--prompt", p.prompt)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    answers = [r["answer"] for r in json.loads(out)["results"]]
    assert sum(bool(verify(p.prompt, a)) for p, a in zip(problems, answers)) >= 3, answers


@pytest.fixture
def student(tmp_path) -> Path:
    """The LLaDA fixture with a recommended decoding that differs from every library default."""
    folder = shutil.copytree(LLADA, tmp_path / "student")
    write_decoding(folder, policy="entropy:0.45", gen_length=16, block_length=8, cache="prefix", early_stop=False)
    return folder


def test_precedence_explicit_then_decoding_json_then_defaults(student):
    m = fewstep.load_model(student)
    assert m.decoding == {"policy": "entropy:0.45", "gen_length": 16, "block_length": 8, "cache": "prefix"} | {
        "early_stop": False
    }
    ids = [[5, 9, 12, 40]]
    rec = fewstep.generate(m, ids)  # every setting from decoding.json
    assert rec.answers.shape[1] == 16 and rec.cache == "prefix" and rec.finished_early is None
    assert rec.policy == fewstep.decoding.parse_policy("entropy:0.45").describe()
    mine = fewstep.generate(m, ids, "threshold:0.7", gen_length=8, cache="none", early_stop=True)  # explicit wins
    assert mine.answers.shape[1] == 8 and mine.cache == "none" and mine.finished_early is not None
    plain = fewstep.generate(fewstep.load_model(LLADA), ids)  # no metadata: the library's defaults
    assert plain.answers.shape[1] == DEFAULTS.gen_length and plain.cache == DEFAULTS.cache
    assert (
        plain.finished_early is not None and plain.policy == fewstep.decoding.parse_policy(DEFAULTS.policy).describe()
    )


def test_a_trained_gen_length_is_a_recommendation(arith_model):
    m = fewstep.load_model(arith_model)
    assert m.decoding == {"gen_length": GEN}
    assert fewstep.generate(m, [[3, 4, 5]]).answers.shape[1] == GEN
    assert resolve_decoding({"gen_length": 8}, arith_model)["gen_length"] == 8


def test_the_text_layer_and_lm_eval_read_the_same_recommendation(student):
    from fewstep.decoding.text import GenerationSettings, TextGenerator
    from fewstep.eval.lm_eval import FewstepLM

    m = fewstep.load_model(student)
    gen = TextGenerator(m, None)
    s = gen.resolved(GenerationSettings())
    assert (s.policy, s.max_tokens, s.block_length, s.cache, s.early_stop) == ("entropy:0.45", 16, 8, "prefix", False)
    assert gen.resolved(GenerationSettings(max_tokens=8, cache="dual")).max_tokens == 8
    (comp,) = gen.generate([[5, 9, 12]], GenerationSettings())
    ref = fewstep.generate(m, [[5, 9, 12]], eos_ids=gen.default_stop_ids)
    assert comp.nfe == int(ref.nfe[0])
    tok = fewstep.load_tokenizer("teacher")  # any tokenizer: these settings do not depend on it
    lm = FewstepLM(model=m, tokenizer=tok)
    assert (lm.policy_spec, lm.cache, lm.early_stop, lm.block_length) == ("entropy:0.45", "prefix", False, 8)
    lm = FewstepLM(model=m, tokenizer=tok, cache="none", early_stop="true")
    assert (lm.cache, lm.early_stop) == ("none", True)


def test_lm_eval_device_in_model_args_does_not_collide(arith_model):
    """The documented `device=cpu` in --model_args while lm-eval adds its own --device: model_args win."""
    from fewstep.eval.lm_eval import FewstepLM

    lm = FewstepLM.create_from_arg_string(f"pretrained={arith_model},device=cpu", {"device": "cuda:0", "batch_size": 2})
    assert str(lm.model.device) == "cpu" and lm.batch_size == 2


def test_a_failed_first_eval_does_not_lock_its_folder(arith_model, tmp_path, capsys):
    """A start on an absent GPU fails after the folder is made; the retry on the CPU with other settings runs."""
    out = tmp_path / "eval"
    base = ["eval", "--model", arith_model, "--task", "arith", "--limit", 2, "--out", out, "--no-progress"]
    assert_one_line_error(capsys, *base, "--device", "cuda", match="CUDA is not available")
    assert (out / "config.json").is_file()
    code, _, err = run_cli(capsys, *base, "--device", "cpu", "--gen-length", 16, "--block-length", 8)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["gen_length"], cfg["dtype"]) == (16, "float32")
    # once records exist the settings are bound: a different setting is refused in one line
    assert_one_line_error(capsys, *base, "--gen-length", 32, match="holds a run with gen_length=16")


def test_a_rollout_that_committed_nothing_binds_nothing(arith_model, arith_data, tmp_path, capsys):
    from fewstep.outputs import prepare_output

    out = prepare_output(tmp_path / "ro", "rollout")
    (out / "rollout.json").write_text(json.dumps({"config": {"gen_length": 999}, "world_size": 1}))
    argv = ["rollout", "--model", arith_model, "--prompts", arith_data, "--limit", 2, "--out", out, "--no-progress"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert json.loads((out / "rollout.json").read_text())["config"]["gen_length"] == GEN


# -- declared once ---------------------------------------------------------------------------------------

SHARED = {"--cache", "--gen-length", "--block-length", "--device", "--dtype", "--threads", "--no-early-stop"}


def _parser(cmd: str) -> argparse.ArgumentParser:
    return build_parser(cmd)._subparsers._group_actions[0].choices[cmd]


@pytest.mark.parametrize("cmd", [c for c, _, _ in COMMANDS if c not in ("lm-eval", "demo")])
def test_the_shared_flags_come_from_one_helper(cmd):
    """Every command's decoding, device, dtype and thread flags are the helper's (same type, unset default,
    same choices), and no command module declares one itself."""
    from fewstep.commands import common

    types = {
        "--gen-length": common.positive_int,
        "--block-length": common.positive_int,
        "--threads": common.positive_int,
        "--device": common.device_name,
        "--dtype": common.dtype_name,
    }
    for action in _parser(cmd)._actions:
        for flag in set(action.option_strings) & SHARED:
            assert action.default is None, (cmd, flag)
            if flag in types:
                assert action.type is types[flag], (cmd, flag)
            if flag == "--cache":
                assert tuple(action.choices) == CACHE_MODES
    root = Path(common.__file__).parent
    for path in root.glob("*.py"):
        if path.name in ("common.py", "demo.py"):  # demo: the demo helper's own file (--device cpu)
            continue
        text = path.read_text()
        declared = re.findall(r"add_argument\(\s*\"(--cache|--device|--threads|--block-length)\"", text)
        assert not declared, f"{path.name} declares {declared} itself"
        assert '"cuda" if torch.cuda.is_available()' not in text, path.name


def test_every_computing_command_takes_threads():
    computing = {c for c, _, _ in COMMANDS} - {"task", "score", "lm-eval"}
    for cmd in computing:
        assert "--threads" in {s for a in _parser(cmd)._actions for s in a.option_strings}, cmd


def test_the_defaults_are_documented():
    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    for key, value in asdict(DEFAULTS).items():
        if value is not None:
            shown = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
            assert f"`{key}`" in text and str(shown) in text, key
