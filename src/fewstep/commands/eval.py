"""`fewstep eval`: generate a benchmark's answers with the decoding engine, score them, measure speed.

Writes DIR/records.jsonl (one line per record: id, response, extracted, passed, reason, nfe,
gen_tokens, tokens_per_forward, positions_per_forward, latency_s), DIR/summary.json, DIR/config.json and DIR/run.json (fewstep's
output-folder marker). A killed run resumes where it stopped when started again with the same settings
and --out; a start that failed before writing a record binds nothing.
"""

from __future__ import annotations

import argparse

from fewstep.assets import SHIPPED_HELP
from fewstep.commands.common import (
    add_decoding_arguments,
    add_device_arguments,
    add_output_arguments,
    apply_threads,
    given_decoding,
    positive_int,
    prepare_out,
)

EPILOG = """\
examples:
  fewstep eval --model teacher --task arith --policy threshold:0.9 --limit 100 --out runs/eval-teacher
  fewstep eval --model dparallel --task arith --limit 100 --out runs/eval-dparallel   # its decoding.json
  fewstep eval --model /models/LLaDA-8B-Instruct --task gsm8k --policy llada:steps=256 --gen-length 256 --out runs/base
  fewstep eval --model /models/LLaDA-8B-Instruct --task gsm8k --policy threshold:0.9 --cache prefix --out runs/fast \\
      --baseline runs/base

tasks: gsm8k, math500, humaneval, mbpp (test split), mbpp-sanitized, arith (embedded). Prompt protocols
(--protocol): dparallel (default), dparallel-dream, cd4lm, fastdllm-5shot (gsm8k), completion
(humaneval), plain (arith); see docs/evaluation.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fewstep eval``."""
    parser.epilog = EPILOG
    parser.add_argument("--model", required=True, metavar="PATH", help=SHIPPED_HELP)
    parser.add_argument("--task", required=True, help="benchmark (see below)")
    add_decoding_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int, default=1, help="prompts decoded together")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N records")
    add_output_arguments(parser, default="eval-out", help="output folder (resumed if this command made it)")
    parser.add_argument("--protocol", default=None, help="prompt protocol (default: the task's default)")
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling policies")
    parser.add_argument(
        "--baseline", metavar="DIR", default=None, help="earlier eval folder: report the speedup over it"
    )
    parser.add_argument(
        "--workers", type=positive_int, default=2, help="code tasks: sandboxed programs run in parallel"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="code tasks: CPU seconds per program (a wall-clock backstop stops waiting programs at 4x + 10 s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the evaluation and print its summary."""
    from pathlib import Path

    from fewstep.assets import resolve_model
    from fewstep.eval.benchmarks import get_task
    from fewstep.eval.runner import EvalSettings, run_eval

    task = get_task(args.task)  # unknown task: one-line error before loading anything
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds; got {args.timeout}")
    args.model = str(resolve_model(args.model))
    base = None if args.baseline is None else Path(args.baseline)
    if base is not None and not ((base / "summary.json").is_file() or base.is_file()):
        raise FileNotFoundError(f"--baseline {args.baseline}: no summary.json of an earlier fewstep eval there")
    prepare_out(args, "eval", inputs=[args.model, args.baseline])
    apply_threads(args)
    settings = EvalSettings(
        **given_decoding(args),
        model=args.model,
        task=args.task,
        protocol=args.protocol,
        batch_size=args.batch_size,
        limit=args.limit,
        out=args.out,
        device=args.device,
        dtype=args.dtype,
        eos_fill=args.eos_fill,
        seed=args.seed,
        baseline=args.baseline,
        workers=args.workers,
        timeout=args.timeout,
        progress=not args.no_progress,
        allow_existing=args.allow_existing,
    )
    s = run_eval(settings)
    metric = "pass@1" if task.kind == "code" else "accuracy"
    line = (
        f"{s['task']}: {metric} {s['accuracy']:.4f} ({s['correct']}/{s['n']}) · NFE {s['mean_nfe']:.1f} · "
        f"{_fig(s['tokens_per_forward'])} tokens/forward (TPF) · {_fig(s['positions_per_forward'])} positions/forward · "
        f"{s['latency_per_sample_s']:.3f} s/sample · "
        f"{s['tokens_per_s']:.1f} tokens/s · {s['device']} {s['dtype']} batch {s['batch_size']}"
    )
    if s.get("speedup"):
        line += f" · speedup {s['speedup']:.2f}x (NFE {s['nfe_reduction']:.2f}x fewer)"
    print(line)
    print(f"decoding: {s['policy']} · gen {s['gen_length']} · block {s['block_length']} · cache {s['cache']}")
    for w in s.get("warnings", []):
        print(f"warning: {w}")
    print(f"records: {Path(args.out) / 'records.jsonl'} · summary: {Path(args.out) / 'summary.json'}")
    return 0


def _fig(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
