"""Bad input to every command: exit status 2, exactly one line on stderr, no traceback.

Each row is one mistake a user makes (issue 24's reproducers among them: a model.safetensors of random
bytes, ``--device tpu``, ``eval --out <a file>``, ``serve --port 99999``, non-UTF-8 data, an adapter merged
into a base it was not trained on). The placeholders name files and folders the ``bad`` fixture makes.
A few rows run as a real ``python -m fewstep`` process as well (``test_as_a_process``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.commands.conftest import assert_one_line_error

T = "--no-progress"

CASES: list[tuple[str, str, str]] = [
    # (id, arguments, a regular expression the error line matches)
    # -- the command line itself
    ("unknown-command", "nosuch", "invalid choice"),
    ("unknown-flag", "generate --prompt x --nosuch", "unrecognized arguments"),
    ("missing-required", "eval --task arith", "required: --model"),
    # -- generate
    ("gen-model-missing", "generate --model {new} --prompt x", "does not exist"),
    ("gen-model-is-file", "generate --model {file} --prompt x", "is a file"),
    ("gen-no-config", "generate --model {no_config} --prompt x", "no config.json"),
    ("gen-bad-config", "generate --model {bad_config} --prompt x", "not valid JSON"),
    ("gen-no-weights", "generate --model {no_weights} --prompt x", "no weights"),
    ("gen-random-safetensors", "generate --model {random_model} --prompt x", "not a safetensors file"),
    ("gen-truncated-safetensors", "generate --model {truncated_model} --prompt x", "truncated|corrupt|beyond"),
    ("gen-bad-decoding-json", "generate --model {bad_decoding} --prompt x", "decoding.json"),
    ("gen-device-tpu", "generate --model {model} --prompt x --device tpu", "unknown device 'tpu'"),
    ("gen-device-cuda-absent", "generate --model {model} --prompt x --device cuda", "CUDA is not available"),
    ("gen-dtype", "generate --model {model} --prompt x --dtype float8", "unknown dtype"),
    ("gen-policy-unknown", "generate --model {model} --prompt x --policy nosuch", "unknown policy"),
    ("gen-policy-range", "generate --model {model} --prompt x --policy threshold:2.0", "threshold"),
    ("gen-policy-option", "generate --model {model} --prompt x --policy threshold:steps=3", "steps"),
    ("gen-length-zero", "generate --model {model} --prompt x --gen-length 0", "integer >= 1"),
    ("gen-length-text", "generate --model {model} --prompt x --gen-length many", "integer >= 1"),
    ("gen-length-context", "generate --model {model} --prompt 1 --gen-length 5000", "context"),
    ("gen-block-divides", "generate --model {model} --prompt 1 --gen-length 32 --block-length 7", "multiple"),
    ("gen-cache", "generate --model {model} --prompt x --cache triple", "invalid choice"),
    ("gen-prompt-ids-text", "generate --model {model} --prompt-ids a,b", "integers"),
    ("gen-prompt-ids-vocab", "generate --model {model} --prompt-ids 99999", "vocabulary"),
    ("gen-seed", "generate --model {model} --prompt 1 --seed -1", "seed"),
    ("gen-cfg", "generate --model {model} --prompt 1 --cfg-scale -1", "cfg_scale"),
    ("gen-threads", "generate --model {model} --prompt x --threads 0", "integer >= 1"),
    ("gen-tokenizer", "generate --model {model} --prompt x --tokenizer {new}", "does not exist"),
    ("gen-trace-dir", "generate --model {model} --prompt 1 --trace-json {user}", "is a folder"),
    ("gen-trace-parent", "generate --model {model} --prompt 1 --trace-json {new}/t.json", "does not exist"),
    ("gen-trace-foreign", "generate --model {model} --prompt 1 --trace-json {file}", "not a trace fewstep wrote"),
    ("gen-both-prompts", "generate --model {model} --prompt x --prompt-ids 1", "not allowed with"),
    # -- eval
    ("eval-task", "eval --model {model} --task nosuch --out {new}", "unknown"),
    ("eval-out-file", "eval --model {model} --task arith --out {file} --limit 1 " + T, "is a file"),
    ("eval-out-user", "eval --model {model} --task arith --out {user} --limit 1 " + T, "did not make it"),
    ("eval-overwrite-user", "eval --model {model} --task arith --out {user} --overwrite " + T, "only a folder"),
    ("eval-out-other", "eval --model {model} --task arith --out {task_out} --limit 1 " + T, "fewstep task"),
    ("eval-limit", "eval --model {model} --task arith --limit 0 --out {new}", "integer >= 1"),
    ("eval-batch", "eval --model {model} --task arith --batch-size 0 --out {new}", "integer >= 1"),
    ("eval-protocol", "eval --model {model} --task arith --protocol nosuch --out {new} " + T, "protocol"),
    ("eval-baseline", "eval --model {model} --task arith --baseline {new} --out {new2} " + T, "baseline"),
    ("eval-workers", "eval --model {model} --task arith --workers 0 --out {new}", "integer >= 1"),
    ("eval-timeout", "eval --model {model} --task arith --timeout 0 --out {new}", "timeout"),
    ("eval-device", "eval --model {model} --task arith --device tpu --out {new}", "unknown device"),
    ("eval-policy", "eval --model {model} --task arith --policy nosuch --out {new} " + T, "unknown policy"),
    ("eval-model", "eval --model {new} --task arith --out {new2}", "does not exist"),
    ("eval-random-model", "eval --model {random_model} --task arith --limit 1 --out {new} " + T, "safetensors"),
    ("eval-gen-length", "eval --model {model} --task arith --gen-length 500 --limit 1 --out {new} " + T, "context"),
    # -- score
    ("score-task", "score --task nosuch --predictions {preds}", "unknown"),
    ("score-missing", "score --task arith --predictions {new}", "not found"),
    ("score-latin1", "score --task arith --predictions {latin1}", "UTF-8"),
    ("score-not-json", "score --task arith --predictions {not_json}", "not valid JSON"),
    ("score-unknown-id", "score --task arith --predictions {preds_bad_id}", "unknown id"),
    ("score-empty", "score --task arith --predictions {empty}", "no predictions"),
    ("score-out-file", "score --task arith --predictions {preds} --out {file} " + T, "is a file"),
    ("score-out-user", "score --task arith --predictions {preds} --out {user} " + T, "did not make it"),
    ("score-workers", "score --task arith --predictions {preds} --workers 0", "integer >= 1"),
    ("score-timeout", "score --task arith --predictions {preds} --timeout -1", "timeout"),
    # -- sweep
    ("sweep-values", "sweep --model {model} --task arith --policy entropy --values , --out {new}", "at least one"),
    ("sweep-policy", "sweep --model {model} --task arith --policy nosuch --values 1 --out {new}", "policy"),
    ("sweep-value", "sweep --model {model} --task arith --policy entropy --values high --out {new}", ""),
    ("sweep-task", "sweep --model {model} --task nosuch --policy entropy --values 0.5 --out {new}", "unknown"),
    ("sweep-out-file", "sweep --model {model} --task arith --policy entropy --values 0.5 --out {file}", "is a file"),
    ("sweep-out-user", "sweep --model {model} --task arith --policy entropy --values 0.5 --out {user}", "did not make"),
    ("sweep-limit", "sweep --model {model} --task arith --policy entropy --values 0.5 --limit 0", "integer >= 1"),
    ("sweep-model", "sweep --model {new} --task arith --policy entropy --values 0.5 --out {new2}", "does not exist"),
    # -- pretrain
    ("pre-data", "pretrain --data {new} --tokenizer {model} --out {new2}", "does not exist"),
    ("pre-latin1", "pretrain --data {latin1} --tokenizer {model} --out {new}", "latin1.jsonl:1: not UTF-8"),
    ("pre-not-json", "pretrain --data {not_json} --tokenizer {model} --out {new}", "not valid JSON"),
    ("pre-no-field", "pretrain --data {no_field} --tokenizer {model} --out {new}", "'response'"),
    ("pre-empty", "pretrain --data {empty} --tokenizer {model} --out {new}", "no records"),
    ("pre-tokenizer", "pretrain --data {data} --tokenizer {new} --out {new2}", "does not exist"),
    ("pre-config", "pretrain --data {data} --tokenizer {model} --model-config nosuch --out {new}", "preset"),
    ("pre-steps", "pretrain --data {data} --tokenizer {model} --max-steps 0 --out {new} " + T, "max-steps"),
    ("pre-lr", "pretrain --data {data} --tokenizer {model} --lr 0 --out {new} " + T, "--lr"),
    ("pre-schedule", "pretrain --data {data} --tokenizer {model} --schedule nosuch --out {new}", "invalid choice"),
    ("pre-out-file", "pretrain --data {data} --tokenizer {model} --out {file} " + T, "is a file"),
    ("pre-out-user", "pretrain --data {data} --tokenizer {model} --out {user} " + T, "did not make it"),
    ("pre-overwrite-user", "pretrain --data {data} --tokenizer {model} --out {user} --overwrite " + T, "only a"),
    ("pre-threads", "pretrain --data {data} --tokenizer {model} --out {new} --threads -1", "integer >= 1"),
    ("pre-gen-length", "pretrain --data {data} --tokenizer {model} --out {new} --gen-length 2 " + T, "longest"),
    # -- rollout
    ("ro-prompts", "rollout --model {model} --prompts nosuch --out {new}", "neither a prompt set"),
    ("ro-latin1", "rollout --model {model} --prompts {latin1} --out {new}", "latin1.jsonl:1: not UTF-8"),
    ("ro-no-field", "rollout --model {model} --prompts {no_prompt} --out {new}", "'prompt'"),
    ("ro-verifier", "rollout --model {model} --prompts arith --verifier nosuch --out {new}", "verifier"),
    ("ro-limit", "rollout --model {model} --prompts arith --limit 0 --out {new}", "integer >= 1"),
    ("ro-batch", "rollout --model {model} --prompts arith --batch-size 0 --out {new}", "integer >= 1"),
    ("ro-policy", "rollout --model {model} --prompts arith --limit 2 --policy nosuch --out {new}", "unknown policy"),
    ("ro-out-user", "rollout --model {model} --prompts arith --limit 2 --out {user} " + T, "did not make it"),
    ("ro-overwrite-user", "rollout --model {model} --prompts arith --limit 2 --out {user} --overwrite", "only a"),
    ("ro-out-file", "rollout --model {model} --prompts arith --limit 2 --out {file} " + T, "is a file"),
    ("ro-model", "rollout --model {new} --prompts arith --out {new2}", "does not exist"),
    ("ro-protocol", "rollout --model {model} --prompts {data} --protocol dparallel --out {new}", "protocol"),
    ("ro-device", "rollout --model {model} --prompts arith --limit 2 --device tpu --out {new}", "unknown device"),
    ("ro-attempts", "rollout --model {model} --prompts arith --attempts 0 --out {new}", "integer >= 1"),
    # -- distill
    ("di-method", "distill --method nosuch --model {model} --data {data} --out {new}", "invalid choice"),
    ("di-data", "distill --method dparallel --model {model} --data {new} --out {new2}", "does not exist"),
    ("di-latin1", "distill --method dparallel --model {model} --data {latin1} --out {new}", "latin1.jsonl:1"),
    ("di-not-json", "distill --method dparallel --model {model} --data {not_json} --out {new}", "not valid JSON"),
    ("di-model", "distill --method dparallel --model {new} --data {data} --out {new2}", "does not exist"),
    ("di-lora-targets", "distill --method dparallel --model {model} --data {data} --out {new} --lora-targets zz", ""),
    ("di-lr", "distill --method dparallel --model {model} --data {data} --out {new} --lr -1 " + T, "lr"),
    ("di-max-length", "distill --method dparallel --model {model} --data {data} --out {new} --max-length 999 " + T, ""),
    (
        "di-trajectories",
        "distill --method dparallel --model {model} --data {data} --trajectories {data} --out {new}",
        "",
    ),
    ("di-out-user", "distill --method dparallel --model {model} --data {data} --out {user} " + T, "did not make it"),
    ("di-overwrite-user", "distill --method dparallel --model {model} --data {data} --out {user} --overwrite", "only"),
    ("di-out-file", "distill --method dparallel --model {model} --data {data} --out {file} " + T, "is a file"),
    ("di-dtype", "distill --method dparallel --model {model} --data {data} --out {new} --dtype f8", "unknown dtype"),
    # -- merge-lora
    ("ml-adapter-missing", "merge-lora --base {model} --adapter {user} --out {new}", "adapter_config.json"),
    ("ml-base-missing", "merge-lora --base {new} --adapter {adapter} --out {new2}", "does not exist"),
    ("ml-other-base", "merge-lora --base {lora_run} --adapter {adapter} --out {new}", "was trained on"),
    ("ml-shapes", "merge-lora --base {llada} --adapter {adapter} --out {new} --ignore-base-check", "does not fit"),
    ("ml-out-user", "merge-lora --base {model} --adapter {adapter} --out {user}", "did not make it"),
    ("ml-out-file", "merge-lora --base {model} --adapter {adapter} --out {file}", "is a file"),
    ("ml-dtype", "merge-lora --base {model} --adapter {adapter} --out {new} --dtype int8", "unknown dtype"),
    ("ml-shard", "merge-lora --base {model} --adapter {adapter} --out {new} --max-shard-gb 0", "max-shard-gb"),
    # -- serve
    ("serve-port-high", "serve --model {model} --port 99999", "1..65535"),
    ("serve-port-zero", "serve --model {model} --port 0", "1..65535"),
    ("serve-port-text", "serve --model {model} --port http", "1..65535"),
    ("serve-batch", "serve --model {model} --max-batch 0", "integer >= 1"),
    ("serve-queue", "serve --model {model} --max-queue -1", "max-queue"),
    ("serve-device", "serve --model {model} --device tpu", "unknown device"),
    ("serve-policy", "serve --model {model} --policy nosuch --port 39517", "unknown policy"),
    ("serve-model", "serve --model {new} --port 39518", "does not exist"),
    ("serve-timeout", "serve --model {model} --timeout-read 0", "timeout-read"),
    ("serve-prompt-chars", "serve --model {model} --max-prompt-chars -1 --port 39519", "max-prompt-chars"),
    ("serve-host", "serve --model {model} --host no.such.host.invalid --port 39520", "cannot listen"),
    # -- task
    ("task-out-file", "task --out {file}", "is a file"),
    ("task-out-user", "task --out {user}", "did not make it"),
    ("task-overwrite-user", "task --out {user} --overwrite", "only a folder"),
    ("task-again", "task --out {task_out} --n-train 4 --n-test 2", "--overwrite to replace"),
    ("task-n-train", "task --out {new} --n-train -1", "integer >= 0"),
    ("task-leaves", "task --out {new} --min-leaves 6 --max-leaves 3", "min_leaves"),
    ("task-p-swap", "task --out {new} --p-swap 2", "p_swap"),
    # -- lm-eval (LM = a local generate_until task)
    ("lm-model-args", "lm-eval --model_args pretrained={model},nosuch=1 LM", "unknown argument"),
    ("lm-pretrained", "lm-eval --model_args pretrained={new} LM", "does not exist"),
    ("lm-cache", "lm-eval --model_args pretrained={model},cache=triple LM", "cache must be one of"),
    ("lm-policy", "lm-eval --model_args pretrained={model},policy=nosuch LM", "unknown policy"),
    ("lm-threads", "lm-eval --threads 0 --model_args pretrained={model} LM", "threads"),
    ("lm-early-stop", "lm-eval --model_args pretrained={model},early_stop=maybe LM", "early_stop"),
    ("lm-device", "lm-eval --model_args pretrained={model},device=tpu LM", "unknown device"),
    # -- demo
    ("demo-n", "demo --n 0", "--n"),
    ("demo-out-file", "demo --n 1 --out {file}", "is a file"),
    ("demo-out-user", "demo --n 1 --out {user}", "did not make it"),
    ("demo-threads", "demo --threads 0", "integer >= 1"),
    ("demo-batch", "demo --batch-size 0", "batch-size"),
]


@pytest.fixture(scope="module")
def bad(arith_model, arith_data, lora_run, tmp_path_factory) -> dict[str, str]:
    """The files and folders the table names."""
    from fewstep.outputs import prepare_output
    from tests.commands.conftest import LLADA

    d = tmp_path_factory.mktemp("bad")
    paths = {"model": arith_model, "data": arith_data, "lora_run": lora_run, "adapter": lora_run / "adapter"}
    paths["llada"] = LLADA
    (d / "a-file.txt").write_text("not a folder\n")
    paths["file"] = d / "a-file.txt"
    for name, files in {
        "no_config": {"weights.txt": b"x"},
        "bad_config": {"config.json": b"{not json"},
        "no_weights": {"config.json": (arith_model / "config.json").read_bytes()},
    }.items():
        (d / name).mkdir()
        for f, data in files.items():
            (d / name / f).write_bytes(data)
        paths[name] = d / name
    for name in ("random_model", "truncated_model", "bad_decoding"):
        shutil.copytree(arith_model, d / name)
        paths[name] = d / name
    (d / "random_model" / "model.safetensors").write_bytes(os.urandom(4096))
    weights = (arith_model / "model.safetensors").read_bytes()
    (d / "truncated_model" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (d / "bad_decoding" / "decoding.json").write_text('{"gen_length": "64"}')
    texts = {
        "latin1.jsonl": b'{"prompt": "caf\xe9 ?", "response": "x"}\n',
        "not_json.jsonl": b'{"prompt": oops\n',
        "no_field.jsonl": b'{"prompt": "1 + 2 ?"}\n',
        "no_prompt.jsonl": b'{"question": "1 + 2 ?"}\n',
        "empty.jsonl": b"",
        "preds.jsonl": b'{"id": "arith-test-000000", "response": "#### 3"}\n',
        "preds_bad_id.jsonl": b'{"id": "nosuch", "response": "#### 3"}\n',
    }
    for name, data in texts.items():
        (d / name).write_bytes(data)
        paths[name.removesuffix(".jsonl")] = d / name
    paths["lm_tasks"] = lm_tasks = d / "lm-tasks"
    lm_tasks.mkdir()
    (lm_tasks / "fewstep_arith_gen.yaml").write_text(
        f"task: fewstep_arith_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {arith_data}\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{gold}}"\n'
        "generation_kwargs:\n  until: []\n  max_gen_toks: 32\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    paths["task_out"] = prepare_output(d / "task-out", "task")
    (paths["task_out"] / "train.jsonl").write_text("{}\n")
    return {k: str(v) for k, v in paths.items()}


def local_lm_eval_tasks(monkeypatch) -> None:
    """lm-eval indexes only the tasks of --include_path (its ~10 s scan of the built-in ones is skipped)."""
    import lm_eval.tasks

    class LocalOnly(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            kwargs["include_defaults"] = False
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalOnly)


@pytest.mark.parametrize(("argv", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(bad, argv, match, tmp_path, user_folder, capsys, monkeypatch):
    places = {**bad, "new": tmp_path / "new", "new2": tmp_path / "new2", "user": user_folder}
    args = [a.format(**places) for a in argv.split()]
    if args[-1] == "LM":
        local_lm_eval_tasks(monkeypatch)
        args[-1:] = ["--tasks", "fewstep_arith_gen", "--include_path", bad["lm_tasks"], "--limit", "1"]
    before = {p.name: p.read_bytes() for p in user_folder.rglob("*") if p.is_file()}
    assert_one_line_error(capsys, *args, match=match or None)
    assert {p.name: p.read_bytes() for p in user_folder.rglob("*") if p.is_file()} == before  # untouched


def test_the_table_covers_every_command():
    """At least the issue's 73 bad inputs, and every command has rows."""
    from fewstep.cli import COMMANDS

    assert len(CASES) >= 73
    assert len({c[0] for c in CASES}) == len(CASES)
    commands = {c[1].split()[0] for c in CASES}
    assert {name for name, _, _ in COMMANDS} <= commands


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--model", "{random_model}", "--prompt", "x"],
        ["generate", "--model", "{model}", "--prompt", "x", "--device", "tpu"],
        ["eval", "--model", "{model}", "--task", "arith", "--out", "{file}", "--limit", "1"],
        ["serve", "--model", "{model}", "--port", "99999"],
    ],
    ids=["random-safetensors", "device-tpu", "eval-out-file", "serve-port"],
)
def test_as_a_process(bad, argv):
    """The issue's reproducers as a real process: status 2, one line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("FEWSTEP_DEBUG", None)
    cmd = [sys.executable, "-m", "fewstep", *(a.format(**bad) for a in argv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_debug_shows_the_traceback(bad, capsys, monkeypatch):
    """FEWSTEP_DEBUG=1 re-raises the user error (for bug reports)."""
    from fewstep.cli import main

    monkeypatch.setenv("FEWSTEP_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown policy"):
        main(["generate", "--model", bad["model"], "--prompt", "1", "--policy", "nosuch"])
    capsys.readouterr()


def test_a_bug_keeps_its_traceback(bad, monkeypatch):
    """Only user errors are caught: anything else (here a RuntimeError inside a command) propagates."""
    from fewstep.cli import main
    from fewstep.commands import score

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(score, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["score", "--task", "arith", "--predictions", bad["preds"]])


def test_one_line_folds_and_cuts_long_messages():
    from fewstep.errors import MAX_MESSAGE, one_line

    assert one_line(ValueError("a\n  b\tc")) == "a b c"
    assert len(one_line(ValueError("x" * 5000))) == MAX_MESSAGE
    assert json.dumps(one_line(FileNotFoundError(2, "No such file", "/x")))
