"""Every example runs (issue 24, item 5): each ``fewstep ...`` command of the README (code blocks and inline
code) and of every command's ``--help`` epilog is extracted and run, in order, in a temporary folder, with
small limits injected (:data:`LIMITS`), so a pipeline's later commands read what its earlier ones wrote.

A command whose inputs cannot exist here (``/models/LLaDA-8B-Instruct``, a placeholder such as ``M``,
``...`` for omitted flags, a multi-GPU ``accelerate launch``) is checked without running: its arguments
parse, its policy spec parses, and lm-eval's ``--model_args`` are names the fewstep model takes.
``fewstep serve`` is built (model loaded, app created) but not started.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from fewstep.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]

#: Flags set small when an example gives them, and added when it does not (``ADD``). Rollouts keep every
#: answer: a teacher pretrained for two steps here answers nothing right.
LIMITS: dict[str, dict[str, str]] = {
    "task": {"--n-train": "64", "--n-test": "16"},
    "pretrain": {"--max-steps": "2", "--batch-size": "8", "--decay-steps": "1", "--warmup-steps": "1"},
    "rollout": {"--limit": "8", "--batch-size": "8", "--attempts": "2", "--keep": "all"},
    "distill": {"--max-steps": "2", "--batch-size": "4", "--grad-accum": "1", "--warmup-steps": "1"},
    "eval": {"--limit": "2"},
    "sweep": {"--limit": "2"},
    "demo": {"--n": "2", "--batch-size": "2"},
}
ADD = {
    "task": ("--n-train", "--n-test"),
    "pretrain": ("--max-steps",),
    "rollout": ("--limit", "--keep"),
    "distill": ("--max-steps", "--batch-size"),
    "eval": ("--limit",),
    "sweep": ("--limit",),
    "demo": ("--n", "--batch-size"),
}
#: Flags whose value is a file or folder the command reads.
INPUTS = {"--model", "--base", "--adapter", "--data", "--tokenizer", "--predictions", "--trajectories", "--baseline"}
#: Epilogs in the order a user would follow them (later ones read what earlier ones wrote).
EPILOG_ORDER = ["task", "pretrain", "rollout", "distill", "merge-lora", "generate", "eval", "sweep", "score"]
EPILOG_ORDER += ["serve", "lm-eval", "demo"]


@dataclass
class Example:
    where: str  # README.md:LINE or "fewstep CMD --help"
    argv: list[str]  # after "fewstep"
    elided: bool = False  # held a placeholder ("...", "<name>", "[--flag]") or a shell expression
    inline: bool = False  # inline code in prose: may name a few flags of a command, not a whole command


# -- extraction ----------------------------------------------------------------------------------------------


def _shell_lines(text: str) -> list[str]:
    """Shell lines of a script: backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def _fewstep_argv(line: str, variables: dict[str, str]) -> tuple[list[str], bool] | None:
    """``(argv after "fewstep", elided)`` of one shell line (``fewstep ...``, ``python -m fewstep ...``,
    ``accelerate launch ... -m fewstep ...``, a segment of an ``&&`` chain), or None. ``elided``: the line
    cannot run as written here (a bare ``...``, a shell expression, a multi-process launcher)."""
    line = re.sub(r"\$([A-Za-z_]\w*)", lambda m: variables.get(m.group(1), m.group(0)), line)
    elided = "$" in line
    line = re.sub(r"\$\(\([^)]*\)\)", "8000", line)  # shell arithmetic (a port)
    line = re.sub(r"\$[A-Za-z_]\w*", "0", line)
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    segments, current = [], []
    for t in tokens:
        if t in ("&&", ";", "||"):
            segments.append(current)
            current = []
        else:
            current.append(t)
    for words in [*segments, current]:
        for i, w in enumerate(words):
            if w == "fewstep" and (i == 0 or words[i - 1] == "-m") and words[i + 1 : i + 2]:
                argv = words[i + 1 :]
                if argv[0] in {c for c, _, _ in COMMANDS}:
                    launched = words[0] in ("accelerate", "torchrun")
                    return _placeholders(argv, elided or launched)
    return None


def _placeholders(argv: list[str], elided: bool) -> tuple[list[str], bool]:
    """A bare ``...`` (flags left out) is dropped, ``a|b`` (alternatives written in prose) becomes ``a``;
    both make the example one to check, not to run. A ``...`` after a flag is a value (a prompt) and stays."""
    out = []
    for i, a in enumerate(argv):
        if a == "..." and not (i and argv[i - 1].startswith("--")):
            elided = True
            continue
        if a.startswith("<") or a.endswith(">"):  # <name>, <that folder>
            elided = True
            continue
        if a.startswith("[") or a.endswith("]"):  # [--policy llada]: optional syntax
            a, elided = a.strip("[]"), True
        if "|" in a and not a.startswith("--") and "=" not in a:
            a, elided = a.split("|")[0], True
        out.append(a)
    return out, elided


def markdown_examples(path: Path) -> list[Example]:
    """The ``fewstep`` commands of a markdown file, in order: its ``bash`` code blocks (shell variables set
    in a block are expanded in it) and its inline code spans that hold a flag."""
    text = path.read_text()
    found: list[tuple[int, tuple[list[str], bool]]] = []
    for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
        variables: dict[str, str] = {}
        for line in _shell_lines(block.group(1)):
            if _assignments(line, variables):
                continue
            got = _fewstep_argv(line, variables)
            if got is not None:
                found.append((block.start(1), (*got, False)))
    prose = re.sub(r"```.*?```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)
    for span in re.finditer(r"`(fewstep [^`]+)`", prose):
        got = _fewstep_argv(" ".join(span.group(1).split()), {})
        if got is not None and any(a.startswith("--") for a in got[0]):
            found.append((span.start(), (*got, True)))
    found.sort(key=lambda f: f[0])
    name = path.relative_to(ROOT)
    return [Example(f"{name}:{text.count(chr(10), 0, off) + 1}", *ex) for off, ex in found]


def _assignments(line: str, variables: dict[str, str]) -> bool:
    """Record the shell variables a line only sets (``M=/models/x; C="--task gsm8k"``); whether it did."""
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";")
        tokens = [t for t in lexer if t != ";"]
    except ValueError:
        return False
    pairs = [re.fullmatch(r"([A-Za-z_]\w*)=(.*)", t, re.S) for t in tokens]
    if not tokens or not all(pairs):
        return False
    variables.update(m.groups() for m in pairs)
    return True


def epilog_examples(command: str) -> list[Example]:
    parser = build_parser(command)._subparsers._group_actions[0].choices[command]
    text = parser.epilog or ""
    m = re.search(r"^examples?:\n(.*?)(?:\n\n|\Z)", text, re.S | re.M)
    out = []
    for line in _shell_lines(m.group(1) if m else ""):
        got = _fewstep_argv(line.strip(), {})
        if got is not None:
            out.append(Example(f"fewstep {command} --help", *got))
    return out


# -- running -------------------------------------------------------------------------------------------------


def limited(argv: list[str]) -> list[str]:
    """``argv`` with the small limits of :data:`LIMITS` put in."""
    argv = list(argv)
    for flag, value in LIMITS.get(argv[0], {}).items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        elif flag in ADD.get(argv[0], ()):
            argv += [flag, value]
    return argv


def _prompt_sets() -> set[str]:
    from fewstep.distill.rollout import prompt_set_names

    return set(prompt_set_names())


def missing_inputs(argv: list[str]) -> list[str]:
    """The inputs an example names that do not exist here (relative to the current folder) and are not the
    name of a shipped model or a prompt set."""
    from fewstep.assets import shipped_models
    from fewstep.train.presets import PRESETS

    shipped = {name for name, _ in shipped_models()}
    missing = []
    for flag, value in itertools.pairwise(argv):
        path_like = flag in INPUTS or (flag == "--prompts" and value not in _prompt_sets())
        path_like |= flag == "--model-config" and value not in PRESETS
        if path_like and not Path(value).exists() and value not in shipped:
            missing.append(value)
    for m in re.finditer(r"(?:pretrained|tokenizer)=([^,]+)", " ".join(argv)):
        if not Path(m.group(1)).exists() and m.group(1) not in shipped:
            missing.append(m.group(1))
    return missing


def check_arguments(argv: list[str], partial: bool = False) -> None:
    """What can be checked of an example that cannot run here: the arguments and the policy spec. A
    ``partial`` one (a mention in prose, or one with placeholders) that does not parse as a whole must at
    least name options the command has."""
    from fewstep.decoding import parse_policy

    try:
        args = build_parser(argv[0]).parse_args(argv)
    except SystemExit:
        if not partial:
            raise
        sub = build_parser(argv[0])._subparsers._group_actions[0].choices[argv[0]]
        known = {s for a in sub._actions for s in a.option_strings}
        unknown = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in known]
        assert not unknown, f"fewstep {argv[0]} has no option {unknown}"
        return
    if argv[0] == "lm-eval":
        from fewstep.eval.lm_eval import FewstepLM

        model_args = next((b for a, b in itertools.pairwise(argv) if a == "--model_args"), "")
        FewstepLM.check_model_args(re.sub(r"(pretrained|tokenizer)=[^,]*,?", "", model_args))
        return
    if argv[0] == "sweep":
        from fewstep.eval.sweep import policy_spec

        parse_policy(policy_spec(args.policy, args.values.split(",")[0]))
    elif getattr(args, "policy", None):
        parse_policy(args.policy)


def _parses(argv: list[str]) -> bool:
    try:
        build_parser(argv[0]).parse_args(argv)
    except SystemExit:
        return False
    return True


def run_example(ex: Example) -> str:
    """Run (or check) one example; "ran", "built" or "checked"."""
    argv = limited(ex.argv)
    if ex.elided or missing_inputs(argv) or "--help" in argv or (ex.inline and not _parses(argv)):
        if "--help" not in argv:
            check_arguments(argv, partial=ex.elided or ex.inline)
        return "checked"
    if argv[0] == "serve":
        from fewstep.commands import serve

        serve.build(build_parser("serve").parse_args(argv))
        return "built"
    code = main(argv)
    assert code == 0, f"{ex.where}: fewstep {shlex.join(argv)} exited {code}"
    return "ran"


def _run_all(examples: list[Example], tmp_path, monkeypatch, capsys) -> dict[str, list[str]]:
    monkeypatch.chdir(tmp_path)
    done: dict[str, list[str]] = {"ran": [], "built": [], "checked": []}
    seen = set()
    for ex in examples:
        key = shlex.join(limited(ex.argv))
        if key in seen:  # the same command in two places (the task of the pretrain epilog and of task's)
            continue
        seen.add(key)
        try:
            done[run_example(ex)].append(f"{ex.where}: fewstep {key}")
        except SystemExit as exc:  # argparse
            err = capsys.readouterr().err
            raise AssertionError(f"{ex.where}: fewstep {key}: exit {exc.code}: {err}") from None
    capsys.readouterr()
    return done


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_documented_examples_run(doc, tmp_path, monkeypatch, capsys):
    """README.md and every guide: each one's examples in order, in a folder of its own."""
    examples = markdown_examples(doc)
    done = _run_all(examples, tmp_path, monkeypatch, capsys)
    if doc.name == "README.md":  # the quick start and the student pipeline run end to end
        ran = " ".join(done["ran"])
        for step in ("fewstep demo", "fewstep rollout --model teacher", "fewstep distill", "fewstep eval"):
            assert step in ran, step
    if doc.name == "distillation.md":  # the pipeline the issue found broken: rollout, distill, merge
        ran = " ".join(done["ran"])
        for step in ("fewstep rollout --model teacher", "--method cd4lm --model teacher", "fewstep merge-lora"):
            assert step in ran, step
    print(f"{doc.name}: {len(examples)} examples: " + ", ".join(f"{len(v)} {k}" for k, v in done.items()))


def test_the_help_examples_run(tmp_path, monkeypatch, capsys):
    examples = [ex for cmd in EPILOG_ORDER for ex in epilog_examples(cmd)]
    done = _run_all(examples, tmp_path, monkeypatch, capsys)
    assert {c for c, _, _ in COMMANDS} - {"demo", "score"} <= {ex.argv[0] for ex in examples}
    assert len(done["ran"]) >= 12, done
    print(f"--help: {len(examples)} examples: " + ", ".join(f"{len(v)} {k}" for k, v in done.items()))


def test_the_extractor_sees_what_it_must():
    """Continuations, variables, `&&` chains, `-m fewstep`, inline code, `...` and shell arithmetic."""
    assert _fewstep_argv("python3 -m venv .venv && pip install -e . && fewstep demo", {}) == (["demo"], False)
    assert _fewstep_argv("accelerate launch -m fewstep rollout --model M", {})[1]  # multi-GPU: not run
    assert _fewstep_argv("fewstep distill $COMMON --out x", {"COMMON": "--method cd4lm"})[0] == [
        "distill", "--method", "cd4lm", "--out", "x"
    ]  # fmt: skip
    assert _fewstep_argv("fewstep serve --port $((8000 + i))", {}) == (["serve", "--port", "8000"], True)
    assert _fewstep_argv("fewstep rollout ... --out x", {}) == (["rollout", "--out", "x"], True)
    assert _fewstep_argv('fewstep generate --prompt "..." --trace', {}) == (
        ["generate", "--prompt", "...", "--trace"],
        False,
    )
    assert _fewstep_argv("fewstep eval --task a|b", {}) == (["eval", "--task", "a"], True)
    assert _fewstep_argv("curl localhost:8000/v1/completions", {}) is None
    assert limited(["eval", "--model", "m", "--limit", "100"]) == ["eval", "--model", "m", "--limit", "2"]
    assert limited(["task", "--out", "d"])[-4:] == ["--n-train", "64", "--n-test", "16"]
