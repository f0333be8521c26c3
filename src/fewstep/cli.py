"""The ``fewstep`` command line: one sub-command per job, each in ``fewstep/commands/<name>.py``.

Every command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported
only when their command is used, so ``fewstep --help`` stays fast (no torch import).

User mistakes (a missing folder, a bad flag value, a malformed file) surface as ``ValueError`` or
``FileNotFoundError`` and are printed as one line, without a traceback. Set ``FEWSTEP_DEBUG=1`` to
see the traceback anyway.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (command, module under fewstep.commands, one-line help). The order is the order of `--help`.
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "demo", "Evaluate the embedded tiny teacher and students with every policy: accuracy vs NFE."),
    ("generate", "generate", "Generate answers for one or more prompts with a chosen unmasking policy and cache."),
    ("eval", "eval", "Generate and score a benchmark (GSM8K, MATH500, HumanEval, MBPP, arith) with speed metrics."),
    ("score", "score", "Score a predictions JSONL against a benchmark, without any model."),
    ("lm-eval", "lm_eval", "Run lm-evaluation-harness tasks with the fewstep model (any policy and cache)."),
    ("sweep", "sweep", "Sweep a policy's threshold, draw the accuracy/NFE Pareto frontier and report AUP."),
    ("pretrain", "pretrain", "Train a masked-diffusion LM from scratch on prompt/response JSONL (LLaDA objective)."),
    ("rollout", "rollout", "Let a teacher answer a prompt set and keep verified answers (self-distillation data)."),
    ("distill", "distill", "Distil a model for few-step decoding with a paper's method (--method; LoRA or full)."),
    ("merge-lora", "merge_lora", "Merge a LoRA adapter into its base model and save a plain checkpoint."),
    ("serve", "serve", "Serve a model over an OpenAI-compatible HTTP API, with a live denoising page at /."),
    ("task", "task", "Write train/test JSONL of the embedded synthetic reasoning task."),
]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep paragraph breaks in descriptions and show defaults (none shown where the default is None:
    those flags say in their help what an unset value means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def _load(module: str):
    return importlib.import_module(f"fewstep.commands.{module}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser; only the chosen command's module is imported."""
    parser = argparse.ArgumentParser(
        prog="fewstep",
        description="fewstep: few-step decoding and distillation for diffusion language models.",
        formatter_class=_HelpFormatter,
    )
    from fewstep import __version__

    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        if name == command:
            _load(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fewstep`` console script and of ``python -m fewstep``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = {name: module for name, module, _ in COMMANDS}
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in names else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(_load(names[args.command]).run(args) or 0)
    except KeyboardInterrupt:
        print("fewstep: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        if os.environ.get("FEWSTEP_DEBUG"):
            raise
        print(f"fewstep {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
