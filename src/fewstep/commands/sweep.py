"""`fewstep sweep`: one unmasking policy over a grid of values (and models): accuracy against NFE (or
tokens per forward), the Pareto frontier as a PNG, and d3LLM's AUP score (docs/evaluation.md gives the
formula and source).

Every point is a `fewstep eval` run in its own folder under --out, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse

from fewstep.commands import EOS_FILL_HELP

EPILOG = """\
examples:
  fewstep sweep --model /models/LLaDA-8B-Instruct --task gsm8k --policy threshold --values 0.5,0.7,0.8,0.9,0.95 \\
      --baseline-policy llada:steps=256 --gen-length 256 --out runs/sweep
  fewstep sweep --model teacher --model student --task arith --policy entropy --values 0.2,0.5,1.0 --gen-length 64

--values sets the policy's main option (threshold for threshold/entropy/cad, steps for llada, factor for
factor, multiblock); other options go after the name: --policy cad:max_tokens=32.
Columns: TPF = tokens per forward (answer tokens before the first EOS / NFE, d3LLM's figure, what AUP
integrates); pos/fwd = committed positions per forward (EOS padding included).
Outputs: DIR/<model>/<policy>/ (one eval folder per point), DIR/sweep.json, DIR/frontier.png.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fewstep sweep``."""
    parser.epilog = EPILOG
    parser.add_argument(
        "--model",
        required=True,
        action="append",
        metavar="PATH",
        help="checkpoint folder or shipped model name (repeatable)",
    )
    parser.add_argument("--task", required=True, help="benchmark")
    parser.add_argument("--policy", required=True, metavar="NAME[:key=value,...]", help="policy to sweep")
    parser.add_argument("--values", required=True, help="comma-separated values of the policy's main option")
    parser.add_argument("--baseline-policy", default=None, metavar="SPEC", help="also run this policy once per model")
    parser.add_argument("--out", default="sweep-out", metavar="DIR", help="output folder")
    parser.add_argument("--aup-ymax", type=float, default=None, help="AUP's y_max in %% (default: best point)")
    parser.add_argument(
        "--x-axis",
        choices=["nfe", "tpf"],
        default="nfe",
        help="the plot's x axis: mean NFE (default) or tokens per forward (TPF)",
    )
    parser.add_argument("--cache", default="none", choices=["none", "prefix", "dual"], help="KV cache mode")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N records")
    parser.add_argument("--protocol", default=None, help="prompt protocol (default: the task's default)")
    parser.add_argument("--gen-length", type=int, default=256, help="tokens to generate")
    parser.add_argument(
        "--block-length",
        type=int,
        default=None,
        help="semi-autoregressive block length (default: 32, at most --gen-length; a block-diffusion model's own "
        "block size)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16")
    parser.add_argument("--no-early-stop", dest="early_stop", action="store_false", help="decode blocks after EOS")
    parser.add_argument("--eos-fill", action="store_true", help=EOS_FILL_HELP)
    parser.add_argument("--workers", type=int, default=2, help="code tasks: sandboxed programs in parallel")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run every point, then print the table, the frontier and AUP per model."""
    from pathlib import Path

    from fewstep.eval.benchmarks import get_task
    from fewstep.eval.runner import EvalSettings
    from fewstep.eval.sweep import policy_spec, run_sweep

    get_task(args.task)
    values = [v.strip() for v in args.values.split(",") if v.strip()]
    if not values:
        raise ValueError("--values needs at least one value")
    for v in values:
        policy_spec(args.policy, v)  # unknown policy / no main option: fail before any model loads
    from fewstep.assets import resolve_model

    args.model = [str(resolve_model(m)) for m in args.model]
    base = EvalSettings(
        model=args.model[0],
        task=args.task,
        cache=args.cache,
        protocol=args.protocol,
        gen_length=args.gen_length,
        block_length=args.block_length,
        batch_size=args.batch_size,
        limit=args.limit,
        device=args.device,
        dtype=args.dtype,
        early_stop=args.early_stop,
        eos_fill=args.eos_fill,
        workers=args.workers,
        progress=not args.no_progress,
    )
    result = run_sweep(
        base, args.model, args.policy, values, args.out, args.baseline_policy, args.aup_ymax, args.x_axis
    )
    for model, info in result["models"].items():
        score = "-" if info["aup"] is None else f"{info['aup']:.2f}"
        print(f"{model}: AUP {score} over TPF (alpha {result['aup_alpha']}, y_max {result['aup_y_max']:.1f}%)")
        head = f"{'policy':<34} {'acc %':>7} {'NFE':>8} {'TPF':>7} {'pos/fwd':>8} {'s/sample':>9} {'speedup':>8}"
        print(f"  {head}  frontier")
        for p in info["points"]:
            on = "*" if p["policy"] in info["frontier"] else ""
            speed = f"{p['speedup']:.2f}x" if p["speedup"] else "-"
            print(
                f"  {p['policy']:<34} {100 * p['accuracy']:>7.2f} {p['mean_nfe']:>8.1f} "
                f"{_fig(p['tokens_per_forward']):>7} {_fig(p['positions_per_forward']):>8} "
                f"{p['latency_per_sample_s']:>9.3f} {speed:>8}  {on}"
            )
    print(f"plot: {result['png']} · data: {Path(args.out) / 'sweep.json'}")
    return 0


def _fig(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
