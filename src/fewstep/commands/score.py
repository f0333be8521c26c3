"""`fewstep score`: score a predictions file against a benchmark, without any model.

Each line of the predictions file is ``{"id": <record id>, "response": <model output text>}``; fewstep
applies its own answer extraction to ``response`` (``####``/``\\boxed{}``/last number for GSM8K, the
last ``\\boxed{}`` + math-verify for MATH-500, fenced code + sanitize + sandboxed tests for HumanEval
and MBPP), so outputs of any system can be scored the same way.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fewstep score``."""
    parser.epilog = (
        "tasks: gsm8k, math500, humaneval, mbpp, mbpp-sanitized (and the embedded task). Record ids: GSM8K the "
        "0-based line number of test.jsonl, MATH-500 unique_id, HumanEval/MBPP task_id.\n"
        "With --out DIR: DIR/summary.json {task, n, correct, accuracy} and DIR/records.jsonl "
        "(id, extracted, passed, reason) per record."
    )
    parser.add_argument("--task", required=True, help="benchmark to score against")
    parser.add_argument(
        "--predictions", required=True, metavar="FILE.jsonl", help='lines of {"id": ..., "response": "..."}'
    )
    parser.add_argument("--out", metavar="DIR", help="write summary.json and records.jsonl here")
    parser.add_argument("--workers", type=int, default=2, help="code tasks: programs run in parallel")
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="code tasks: CPU seconds per program (a wall-clock backstop stops waiting programs at 4x + 10 s)",
    )
    parser.add_argument(
        "--isolation",
        default="auto",
        choices=["auto", "namespaces", "bwrap", "process"],
        help="code tasks: sandbox isolation (see docs/evaluation.md)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Read, score, print the accuracy; exit 2 with one line on bad input."""
    from fewstep.eval.benchmarks import get_task
    from fewstep.eval.sandbox import Limits, Sandbox
    from fewstep.eval.scoring import print_summary, read_predictions, score, summarize, write_results

    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    if args.timeout <= 0:
        raise ValueError("--timeout must be positive")
    task = get_task(args.task)
    pairs = read_predictions(args.predictions, task)
    sandbox = None
    if task.kind == "code":
        sandbox = Sandbox(Limits(timeout=args.timeout), isolation=args.isolation)
        try:
            sandbox.resolve()
        except RuntimeError as exc:
            print(f"fewstep score: error: {exc}", file=sys.stderr)
            return 1
    scored = score(task, pairs, sandbox=sandbox, workers=args.workers, progress=not args.no_progress)
    summary = summarize(task, scored)
    print_summary(summary, task.kind)
    if args.out:
        write_results(args.out, summary, scored)
    return 0
