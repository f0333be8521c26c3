"""`fewstep eval`: generate a benchmark's answers with the decoding engine, score them, measure speed.

Writes DIR/records.jsonl (one line per record: id, response, extracted, passed, reason, nfe,
gen_tokens, tokens_per_forward, positions_per_forward, latency_s), DIR/summary.json and DIR/config.json. A killed run resumes
where it stopped when started again with the same settings and --out.
"""

from __future__ import annotations

import argparse

from fewstep.commands import EOS_FILL_HELP

EPILOG = """\
examples:
  fewstep eval --model /models/LLaDA-8B-Instruct --task gsm8k --policy llada:steps=256 --gen-length 256 --out runs/base
  fewstep eval --model /models/LLaDA-8B-Instruct --task gsm8k --policy threshold:0.9 --cache dual --out runs/fast \\
      --baseline runs/base
  fewstep eval --model fewstep-teacher --task arith --policy entropy:0.5 --gen-length 64 --limit 100

tasks: gsm8k, math500, humaneval, mbpp (test split), mbpp-sanitized, arith (embedded). Prompt protocols
(--protocol): dparallel (default), dparallel-dream, cd4lm, fastdllm-5shot (gsm8k), completion
(humaneval), plain (arith); see docs/evaluation.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fewstep eval``."""
    parser.epilog = EPILOG
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="checkpoint folder (LLaDA or Dream), or a shipped model: teacher, dparallel, dparallel-control, cd4lm",
    )
    parser.add_argument("--task", required=True, help="benchmark (see below)")
    parser.add_argument("--policy", default="threshold:0.9", metavar="NAME[:ARGS]", help="unmasking policy")
    parser.add_argument("--cache", default="none", choices=["none", "prefix", "dual"], help="KV cache mode")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N records")
    parser.add_argument("--out", default="eval-out", metavar="DIR", help="output folder (resumed if it exists)")
    parser.add_argument("--protocol", default=None, help="prompt protocol (default: the task's default)")
    parser.add_argument("--gen-length", type=int, default=256, help="tokens to generate")
    parser.add_argument(
        "--block-length",
        type=int,
        default=None,
        help="semi-autoregressive block length (default: 32, at most --gen-length; a block-diffusion model's own "
        "block size)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument(
        "--no-early-stop", dest="early_stop", action="store_false", help="keep decoding blocks after EOS"
    )
    parser.add_argument("--eos-fill", action="store_true", help=EOS_FILL_HELP)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling policies")
    parser.add_argument(
        "--baseline", metavar="DIR", default=None, help="earlier eval folder: report the speedup over it"
    )
    parser.add_argument("--workers", type=int, default=2, help="code tasks: sandboxed programs run in parallel")
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

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    get_task(args.task)  # unknown task: one-line error before loading anything
    args.model = str(resolve_model(args.model))
    settings = EvalSettings(
        model=args.model,
        task=args.task,
        policy=args.policy,
        cache=args.cache,
        protocol=args.protocol,
        gen_length=args.gen_length,
        block_length=args.block_length,
        batch_size=args.batch_size,
        limit=args.limit,
        out=args.out,
        device=args.device,
        dtype=args.dtype,
        early_stop=args.early_stop,
        eos_fill=args.eos_fill,
        seed=args.seed,
        baseline=args.baseline,
        workers=args.workers,
        timeout=args.timeout,
        progress=not args.no_progress,
    )
    s = run_eval(settings)
    metric = "pass@1" if get_task(args.task).kind == "code" else "accuracy"
    line = (
        f"{s['task']}: {metric} {s['accuracy']:.4f} ({s['correct']}/{s['n']}) · NFE {s['mean_nfe']:.1f} · "
        f"{_fig(s['tokens_per_forward'])} tokens/forward (TPF) · {_fig(s['positions_per_forward'])} positions/forward · "
        f"{s['latency_per_sample_s']:.3f} s/sample · "
        f"{s['tokens_per_s']:.1f} tokens/s · {s['device']} {s['dtype']} batch {s['batch_size']}"
    )
    if s.get("speedup"):
        line += f" · speedup {s['speedup']:.2f}x (NFE {s['nfe_reduction']:.2f}x fewer)"
    print(line)
    for w in s.get("warnings", []):
        print(f"warning: {w}")
    print(f"records: {Path(args.out) / 'records.jsonl'} · summary: {Path(args.out) / 'summary.json'}")
    return 0


def _fig(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
