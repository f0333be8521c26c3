"""Output folders (issue 24, item 1): every command writes only into folders it made (``run.json``), deletes
only those (``--overwrite``), never deletes the inputs of the run it starts, and refuses a non-empty folder
of the user's own files unless told (``--allow-existing``). One test per command and rule, on a folder of
user files and on a folder that holds the run's own inputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fewstep.errors import UsageError
from fewstep.outputs import MARKER, check_output, claim_output, prepare_output, read_marker
from tests.commands.conftest import assert_one_line_error, files_of, run_cli

P = "--no-progress"


@pytest.fixture(scope="module")
def preds(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preds") / "preds.jsonl"
    path.write_text('{"id": "arith-test-000000", "response": "#### 3"}\n')
    return path


def argv_of(cmd: str, out: Path, env: dict) -> list:
    """A small run of ``cmd`` writing ``out``; ``env`` names its inputs (model, data, prompts, adapter, preds)."""
    m = env["model"]
    return {
        "distill": ["distill", "--method", "dparallel", "--model", m, "--data", env["data"], "--max-steps", 1,
                    "--batch-size", 4, P],
        "rollout": ["rollout", "--model", m, "--prompts", env["data"], "--limit", 2, "--keep", "all", P],
        "pretrain": ["pretrain", "--data", env["data"], "--tokenizer", m, "--max-steps", 1, "--batch-size", 4, P],
        "task": ["task", "--n-train", 8, "--n-test", 4],
        "eval": ["eval", "--model", m, "--task", "arith", "--limit", 1, P],
        "sweep": ["sweep", "--model", m, "--task", "arith", "--policy", "entropy", "--values", "0.5", "--limit", 1, P],
        "score": ["score", "--task", "arith", "--predictions", env["preds"], P],
        "merge-lora": ["merge-lora", "--base", m, "--adapter", env["adapter"]],
        "demo": ["demo", "--n", 1],
    }[cmd] + ["--out", out]  # fmt: skip


COMMANDS = ["distill", "rollout", "pretrain", "task", "eval", "sweep", "score", "merge-lora", "demo"]
WITH_OVERWRITE = ["distill", "rollout", "pretrain", "task", "eval", "sweep", "merge-lora"]
#: the input of each command that a user may keep inside its --out (the flag's key in ``env``)
INPUT_INSIDE = {
    "distill": "data",
    "rollout": "data",
    "pretrain": "data",
    "eval": "model",
    "sweep": "model",
    "merge-lora": "adapter",
}


@pytest.fixture
def env(arith_model, arith_data, lora_run, preds) -> dict:
    return {"model": arith_model, "data": arith_data, "adapter": lora_run / "adapter", "preds": preds}


@pytest.mark.parametrize("cmd", COMMANDS)
def test_a_folder_of_user_files_is_refused(cmd, env, user_folder, capsys):
    before = files_of(user_folder)
    assert_one_line_error(capsys, *argv_of(cmd, user_folder, env), match="not empty and fewstep did not make it")
    assert files_of(user_folder) == before and not (user_folder / MARKER).exists()


@pytest.mark.parametrize("cmd", WITH_OVERWRITE)
def test_overwrite_never_deletes_a_folder_fewstep_did_not_make(cmd, env, user_folder, capsys):
    """The issue's `distill --out DIR --overwrite`: DIR's files (training data among them) stay."""
    shutil.copy(env["data"], user_folder / "train.jsonl")
    before = files_of(user_folder)
    argv = [*argv_of(cmd, user_folder, env), "--overwrite"]
    assert_one_line_error(capsys, *argv, match="--overwrite deletes only a folder fewstep made")
    assert files_of(user_folder) == before


@pytest.mark.parametrize("cmd", sorted(INPUT_INSIDE))
def test_overwrite_never_deletes_the_runs_own_inputs(cmd, env, tmp_path, capsys):
    """A folder this command made, holding an input of the new run (``--data`` inside ``--out``): refused."""
    out = prepare_output(tmp_path / "run", cmd)
    key = INPUT_INSIDE[cmd]
    src = Path(env[key])
    inside = out / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, inside)
    before = files_of(out)
    argv = [*argv_of(cmd, out, {**env, key: inside}), "--overwrite"]
    assert_one_line_error(capsys, *argv, match="would delete .*an input of this run")
    assert files_of(out) == before


@pytest.mark.parametrize("cmd", COMMANDS)
def test_another_commands_folder_is_refused(cmd, env, tmp_path, capsys):
    other = "eval" if cmd == "task" else "task"
    out = prepare_output(tmp_path / "run", other)
    (out / "train.jsonl").write_text("{}\n")
    before = files_of(out)
    assert_one_line_error(capsys, *argv_of(cmd, out, env), match=f"holds the output of fewstep {other}")
    assert_one_line_error(capsys, *argv_of(cmd, out, env), "--allow-existing", match=f"fewstep {other}")
    assert files_of(out) == before


@pytest.mark.parametrize("cmd", COMMANDS)
def test_a_file_is_not_a_folder(cmd, env, tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("mine\n")
    assert_one_line_error(capsys, *argv_of(cmd, f, env), match="is a file")
    assert f.read_text() == "mine\n"


def test_the_typo_that_deleted_every_run(env, tmp_path, capsys):
    """`--out runs --overwrite` where runs/ holds earlier runs: refused, every run kept."""
    runs = tmp_path / "runs"
    for name in ("teacher", "student"):
        prepare_output(runs / name, "distill")
        (runs / name / "model.safetensors").write_bytes(b"weights")
    before = files_of(runs)
    assert_one_line_error(capsys, *argv_of("distill", runs, env), "--overwrite", match="only a folder fewstep made")
    assert files_of(runs) == before


def test_allow_existing_writes_beside_the_users_files(env, user_folder, capsys):
    """`task --allow-existing` writes its files and keeps the user's; it leaves no marker, so a later
    --overwrite still cannot delete the folder."""
    before = files_of(user_folder)
    code, _, err = run_cli(capsys, *argv_of("task", user_folder, env), "--allow-existing")
    assert code == 0, err
    after = files_of(user_folder)
    assert {k: after[k] for k in before} == before and "train.jsonl" in after
    assert not (user_folder / MARKER).exists()
    assert_one_line_error(capsys, *argv_of("task", user_folder, env), "--overwrite", match="only a folder")


def test_task_never_replaces_a_dataset_silently(env, tmp_path, capsys):
    out = tmp_path / "data"
    assert run_cli(capsys, *argv_of("task", out, env))[0] == 0
    first = files_of(out)
    assert read_marker(out)["command"] == "task"
    assert_one_line_error(capsys, "task", "--out", out, "--n-train", 4, "--seed", 1, match="--overwrite to replace")
    assert files_of(out) == first
    assert run_cli(capsys, "task", "--out", out, "--n-train", 4, "--n-test", 2, "--seed", 1, "--overwrite")[0] == 0
    assert len((out / "train.jsonl").read_text().splitlines()) == 4 and read_marker(out)["command"] == "task"


def test_overwrite_replaces_a_run_this_command_made(env, tmp_path, capsys):
    """pretrain twice into one folder: the second resumes (at its last step), --overwrite starts again."""
    out = tmp_path / "run"
    argv = argv_of("pretrain", out, env)
    assert run_cli(capsys, *argv)[0] == 0
    (out / "stray.txt").write_text("left by the first run\n")
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0 and "already at step 1" in stdout, err
    assert run_cli(capsys, *argv, "--overwrite")[0] == 0
    assert not (out / "stray.txt").exists() and read_marker(out)["command"] == "pretrain"
    assert Path(env["data"]).is_file()


def test_score_and_demo_refresh_their_own_folder(env, tmp_path, capsys):
    out = tmp_path / "scored"
    for _ in range(2):
        code, _, err = run_cli(capsys, *argv_of("score", out, env))
        assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["n"] == 1
    made = prepare_output(tmp_path / "demo", "demo")
    (made / "results.json").write_text("{}\n")
    assert check_output(made, "demo", on_existing="refresh").action == "reuse"


def test_merge_lora_twice_needs_overwrite(env, tmp_path, capsys):
    out = tmp_path / "merged"
    assert run_cli(capsys, *argv_of("merge-lora", out, env))[0] == 0
    assert_one_line_error(capsys, *argv_of("merge-lora", out, env), match="--overwrite to replace")
    assert run_cli(capsys, *argv_of("merge-lora", out, env), "--overwrite")[0] == 0
    assert (out / "model.safetensors").is_file() and read_marker(out)["command"] == "merge-lora"
    assert not (out / "adapter").exists()  # the base's files are copied, not the adapter's run folder


# -- the rule itself -------------------------------------------------------------------------------------


def test_the_marker_and_the_plans(tmp_path):
    fresh = tmp_path / "a" / "b"
    assert check_output(fresh, "eval").action == "create"
    claim_output(check_output(fresh, "eval"))
    doc = read_marker(fresh)
    assert doc["made_by"] == "fewstep" and doc["command"] == "eval" and doc["created"]
    (fresh / "records.jsonl").write_text("{}\n")
    assert check_output(fresh, "eval").action == "reuse"
    assert check_output(fresh, "eval", overwrite=True).action == "replace"
    assert check_output(fresh, "eval", allow_existing=True).action == "reuse"
    claim_output(check_output(fresh, "eval", overwrite=True))
    assert sorted(p.name for p in fresh.iterdir()) == [MARKER]
    # a start that failed left only the marker: the folder counts as empty, even for "refuse"
    assert check_output(fresh, "eval", on_existing="refuse").action == "create"
    with pytest.raises(ValueError, match="on_existing"):
        check_output(fresh, "eval", on_existing="sometimes")


def test_a_forged_or_broken_marker_is_not_fewsteps(tmp_path):
    for text in ("{not json", '{"command": "eval"}', '["fewstep"]', '{"made_by": "fewstep", "command": 3}'):
        folder = tmp_path / f"f{len(text)}"
        folder.mkdir()
        (folder / MARKER).write_text(text)
        (folder / "data.csv").write_text("1\n")
        assert read_marker(folder) is None
        with pytest.raises(UsageError, match="only a folder fewstep made"):
            check_output(folder, "eval", overwrite=True)
        assert check_output(folder, "eval", allow_existing=True).action == "join"


def test_inputs_are_found_through_links(tmp_path):
    out = prepare_output(tmp_path / "run", "distill")
    (out / "train.jsonl").write_text("{}\n")
    link = tmp_path / "data.jsonl"
    os.symlink(out / "train.jsonl", link)
    with pytest.raises(UsageError, match="an input of this run"):
        check_output(out, "distill", overwrite=True, inputs=[link, None])
    assert check_output(out, "distill", overwrite=True, inputs=[tmp_path / "elsewhere.jsonl"]).action == "replace"


def test_every_output_command_has_the_flags():
    from fewstep.cli import build_parser

    for cmd in COMMANDS:
        sub = build_parser(cmd)._subparsers._group_actions[0].choices[cmd]
        flags = {s for a in sub._actions for s in a.option_strings}
        assert {"--out", "--allow-existing"} <= flags, cmd
        assert ("--overwrite" in flags) == (cmd in WITH_OVERWRITE), cmd
