"""Shared pieces of the command tests: running ``fewstep`` in-process, the one-line error check, a tiny
arith model, a training JSONL, a LoRA adapter of that model and a folder of user files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from fewstep.cli import main
from tests.tiny import tiny_arith_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LLADA = FIXTURES / "llada-tiny-a"
GEN = 32  # the tiny arith model's training gen_length (its training.json)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``fewstep ARGV`` in this process: (exit status, stdout, stderr). An exception that escapes ``main``
    (a traceback) fails the test that runs it."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(capsys, *argv, match: str | None = None) -> str:
    """``fewstep ARGV`` stops with exit status 2, exactly one line on stderr and no traceback; the line."""
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
    assert re.match(r"fewstep( [a-z-]+)?: error: ", lines[0]), lines[0]
    if match is not None:
        assert re.search(match, lines[0]), lines[0]
    return lines[0]


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (what a refused command must leave as it was)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def arith_model(tmp_path_factory) -> Path:
    """A random tiny LLaDA with the embedded task's tokenizer, trained (training.json) at gen_length 32."""
    folder = tiny_arith_checkpoint(tmp_path_factory.mktemp("arith-model"))
    (folder / "training.json").write_text(json.dumps({"gen_length": GEN}))
    return folder


@pytest.fixture(scope="session")
def arith_data(tmp_path_factory) -> Path:
    """24 prompt/response records of the embedded task (a training JSONL)."""
    from fewstep.tasks.arith import generate_problems

    path = tmp_path_factory.mktemp("arith-data") / "train.jsonl"
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in generate_problems("train", 24, seed=0)))
    return path


@pytest.fixture(scope="session")
def lora_run(arith_model, arith_data, tmp_path_factory) -> Path:
    """A one-step LoRA distillation of ``arith_model`` (its folder holds adapter/ and the merged model)."""
    out = tmp_path_factory.mktemp("lora-run") / "run"
    argv = ["distill", "--method", "dparallel", "--model", arith_model, "--data", arith_data, "--out", out]
    argv += ["--finetune", "lora", "--lora-r", "4", "--max-steps", "1", "--batch-size", "4", "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    return out


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A folder of the user's own files (not made by fewstep)."""
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "sub" / "results.csv").write_text("a,b\n1,2\n")
    return folder


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
