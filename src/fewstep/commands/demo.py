"""`fewstep demo`: the embedded tiny teacher and every shipped student, decoded with every policy.

Offline, no flags needed. Evaluates held-out problems of the embedded task with the one-token-per-step
baseline, fixed fewer steps, the Fast-dLLM confidence threshold, the dParallel entropy threshold, CD4LM's
confidence-adaptive decoding, d3LLM's multi-block decoding and DMax's soft parallel decoding (hard and
soft embeddings), each with and without d3LLM's end-of-text stop; prints a table and writes
OUT/results.json and OUT/pareto.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fewstep.commands.common import add_output_arguments, add_threads_argument, apply_threads, prepare_out

EPILOG = """examples:
  fewstep demo                                   # every shipped model, each policy's default (~3 min, 2 cores)
  fewstep demo --sweep full --n 512 --out demo-512   # every setting on all 512 held-out problems (docs/results.md)
  fewstep demo --models teacher,d3llm --n 64     # a subset of the shipped models
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--n", type=int, default=48, help="held-out problems to evaluate (at most 512; docs/results.md uses 512)"
    )
    parser.add_argument(
        "--sweep",
        choices=("quick", "full"),
        default="quick",
        help="quick: each policy's default setting, the baseline on the teacher only, DMax's soft parallel "
        "decoding on the DMax student only; full: every setting of every policy on every model (the Pareto "
        "plot's curves, benchmarks/beyond.py)",
    )
    parser.add_argument(
        "--models",
        default=None,
        metavar="A,B",
        help="comma-separated shipped model names (default: all; the teacher always runs first)",
    )
    parser.add_argument("--batch-size", type=int, default=128, help="problems decoded together")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    add_output_arguments(parser, default="fewstep-demo", help="folder for results.json and pareto.png", overwrite=False)
    parser.add_argument("--seed", type=int, default=0, help="which held-out problems (and torch's RNG)")
    add_threads_argument(parser)


def _models(spec: str | None) -> list:
    from fewstep.eval.demo import shipped_models

    models = shipped_models()
    if not models:
        raise FileNotFoundError("no shipped checkpoints found in fewstep/assets/models (broken installation?)")
    if spec is None:
        return models
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    known = dict(models)
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {', '.join(unknown)} (shipped: {', '.join(known)})")
    return [(name, folder) for name, folder in models if name == "teacher" or name in wanted]


def run(args: argparse.Namespace) -> int:
    import torch

    if not 1 <= args.n <= 512:
        raise ValueError("--n must lie in 1..512")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    models = _models(args.models)
    apply_threads(args)
    torch.manual_seed(args.seed)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fewstep.eval.demo import (
        STOPS,
        format_table,
        planned_families,
        plot_pareto,
        policy_families,
        run_demo,
        table_rows,
    )
    from fewstep.tasks import BLOCK_LENGTH, GEN_LENGTH, NAME, generate_problems

    console = Console()
    problems = generate_problems("test", args.n, seed=args.seed)
    families = policy_families(GEN_LENGTH, BLOCK_LENGTH, sweep=args.sweep)
    full = args.sweep == "full"
    settings = sum(len(f.specs) for f in families)
    runs = sum(len(f.specs) for name, _ in models for f in planned_families(models, name, families, full, not full))
    out = Path(prepare_out(args, "demo", on_existing="refresh"))
    console.print(
        f"fewstep demo: {len(models)} model(s) ({', '.join(n for n, _ in models)}) x {settings} policy settings x "
        f"{len(STOPS)} stop rules on {len(problems)} held-out '{NAME}' problems "
        f"(gen length {GEN_LENGTH}, blocks of {BLOCK_LENGTH}, device {args.device})"
    )
    with Progress(
        TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("decoding", total=runs * len(STOPS) * len(problems))

        def progress(label: str, k: int) -> None:
            bar.update(task, advance=k, description=label[:34])

        rows = run_demo(
            models,
            problems,
            batch_size=args.batch_size,
            device=args.device,
            families=families,
            student_baselines=full,
            native_only=not full,
            progress=progress,
        )
    result = {"task": NAME, "n_problems": len(problems), "sweep": args.sweep, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_pareto(rows, out / "pareto.png")
    console.print(format_table(table_rows(rows, families)), highlight=False, soft_wrap=True)
    _print_findings(console, rows)
    console.print(f"all {len(rows)} rows: {out / 'results.json'}; Pareto plot: {out / 'pareto.png'}")
    return 0


def _print_findings(console, rows: list[dict]) -> None:
    from fewstep.eval.demo import baseline_row, format_summary
    from fewstep.tasks import BLOCK_LENGTH, GEN_LENGTH

    base = baseline_row(rows)
    teacher = [r for r in rows if r["model"] == base["model"] and r.get("stop") == "none"]
    thr = next((r for r in teacher if r["policy"] == "threshold:0.9"), None)
    one = next((r for r in teacher if r["policy"] == f"llada:steps={GEN_LENGTH // BLOCK_LENGTH}"), None)
    if thr is not None and one is not None:
        console.print(
            f"Where this task sits: the teacher at one step per block scores {100 * one['accuracy']:.1f}% against "
            f"{100 * base['accuracy']:.1f}% at one token per step; at Fast-dLLM threshold 0.9 it needs "
            f"{thr['mean_nfe']:.2f} NFE for {100 * (thr['accuracy'] - base['accuracy']):+.1f} points "
            f"(real LLaDA on GSM8K: about -1 point at 3-8x fewer NFE than the baseline).",
            soft_wrap=True,
        )
    for stop, rule in (("eos", "with the end-of-text stop"), ("none", "without early stop")):
        console.print(
            f"Fewest NFE within 1 point of the teacher baseline's {100 * base['accuracy']:.1f}% ({rule}, any setting):",
            highlight=False,
            soft_wrap=True,
        )
        console.print(format_summary(rows, stop=stop), highlight=False, soft_wrap=True)
