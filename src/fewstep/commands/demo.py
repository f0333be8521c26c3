"""`fewstep demo`: the embedded tiny teacher (and every shipped student) decoded with every policy.

Offline, no flags needed. Evaluates held-out problems of the embedded task with the one-token-per-step
baseline, fixed fewer steps, the Fast-dLLM confidence threshold, the dParallel entropy threshold and
CD4LM's confidence-adaptive decoding, each swept around its authors' default; prints a table and
writes OUT/results.json and OUT/pareto.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--n", type=int, default=128, help="held-out problems to evaluate (at most 512; docs/results.md uses 512)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="problems decoded together")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    parser.add_argument("--out", default="fewstep-demo", help="folder for results.json and pareto.png")
    parser.add_argument("--seed", type=int, default=0, help="which held-out problems (and torch's RNG)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    import torch

    if not 1 <= args.n <= 512:
        raise ValueError("--n must lie in 1..512")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fewstep.eval.demo import (
        format_summary,
        format_table,
        plot_pareto,
        policy_families,
        run_demo,
        shipped_models,
        table_rows,
    )
    from fewstep.tasks import BLOCK_LENGTH, GEN_LENGTH, NAME, generate_problems

    console = Console()
    models = shipped_models()
    if not models:
        raise FileNotFoundError("no shipped checkpoints found in fewstep/assets/models (broken installation?)")
    problems = generate_problems("test", args.n, seed=args.seed)
    families = policy_families(GEN_LENGTH)
    total = len(models) * sum(len(f.specs) for f in families) * len(problems)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console.print(
        f"fewstep demo: {len(models)} model(s) ({', '.join(n for n, _ in models)}) x "
        f"{sum(len(f.specs) for f in families)} policy settings on {len(problems)} held-out '{NAME}' problems "
        f"(gen length {GEN_LENGTH}, blocks of {BLOCK_LENGTH}, device {args.device})"
    )
    with Progress(
        TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("decoding", total=total)

        def progress(label: str, k: int) -> None:
            bar.update(task, advance=k, description=label[:28])

        rows = run_demo(
            models, problems, batch_size=args.batch_size, device=args.device, families=families, progress=progress
        )
    result = {"task": NAME, "n_problems": len(problems), "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_pareto(rows, out / "pareto.png")
    console.print(format_table(table_rows(rows, families)), highlight=False, soft_wrap=True)
    teacher = [r for r in rows if r["model"] == models[0][0]]
    base = next(r for r in teacher if r["policy"] == "baseline")
    thr = next((r for r in teacher if r["policy"] == "threshold:0.9"), None)
    floor = GEN_LENGTH // BLOCK_LENGTH
    if thr is not None:
        console.print(
            f"Where this task sits: the teacher at Fast-dLLM threshold 0.9 needs {thr['mean_nfe']:.2f} NFE "
            f"({thr['mean_nfe'] / floor:.1f}x the floor of {floor}, one forward per block) and scores "
            f"{100 * (thr['accuracy'] - base['accuracy']):+.1f} points against its 1-token-per-step baseline "
            f"(real LLaDA on GSM8K: about -1 point at 3-8x fewer NFE than the baseline)."
        )
    console.print(
        f"Fewest NFE within 1 point of the teacher baseline's {100 * base['accuracy']:.1f}% (any policy setting):",
        highlight=False,
    )
    console.print(format_summary(rows), highlight=False, soft_wrap=True)
    console.print(f"all {len(rows)} rows: {out / 'results.json'}; Pareto plot: {out / 'pareto.png'}")
    return 0
