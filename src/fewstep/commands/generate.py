"""`fewstep generate`: answer prompts with a diffusion LM, a chosen unmasking policy and cache mode (through the
text layer, :mod:`fewstep.decoding.text`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fewstep.assets import SHIPPED_HELP, resolve_model
from fewstep.commands.common import (
    add_decoding_arguments,
    add_device_arguments,
    apply_threads,
    decoding_settings,
    device_and_dtype,
)

EPILOG = """\
policies (--policy NAME, NAME:VALUE or NAME:key=value,...):
{policies}

examples:
  fewstep generate --prompt "3 + 4 - 2 + 8 - 1 ?" --no-chat-template       # the shipped teacher
  fewstep generate --model dparallel --prompt "5 + 9 - 1 - 7 + 1 ?" --trace  # a student, its decoding.json
  fewstep generate --model /models/LLaDA-8B-Instruct --prompt "What is 7*8?" --policy threshold:0.9 --cache prefix
  fewstep generate --model /models/LLaDA-8B-Instruct --prompt "..." --policy llada:steps=128 --gen-length 128
  fewstep generate --model cd4lm --prompt-ids "5 17 12" --policy cad:threshold=0.95,max_tokens=32 --trace-json trace.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fewstep generate``."""
    from fewstep.decoding.policies import policy_help

    parser.epilog = EPILOG.format(policies=policy_help())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # defaults are written in the help texts
    parser.add_argument("--model", default="teacher", metavar="PATH", help=f"{SHIPPED_HELP} (default: teacher)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="prompt text (repeat for a batch)")
    src.add_argument(
        "--prompt-ids", action="append", metavar="IDS", help="prompt as space-separated token ids (repeatable)"
    )
    add_decoding_arguments(parser)
    parser.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale (default: 0, off)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for sampling policies; prompt i uses seed+i (default: torch's global RNG)",
    )
    parser.add_argument(
        "--no-chat-template", dest="chat", action="store_false", help="tokenize the prompt as plain text"
    )
    parser.add_argument("--tokenizer", metavar="PATH", default=None, help="tokenizer folder (default: --model)")
    add_device_arguments(parser)
    parser.add_argument("--trace", action="store_true", help="show the canvas filling step by step")
    parser.add_argument(
        "--trace-json", metavar="FILE", default=None, help="save the step trace as JSON (a new file, or one it wrote)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")


def _load_tokenizer(path: Path, required: bool):
    from fewstep.models import load_tokenizer

    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ValueError) as exc:
        if required:
            raise ValueError(f"{exc} (pass --tokenizer PATH, or give --prompt-ids)") from None
        return None


def _prompts(args: argparse.Namespace) -> list:
    """The prompts as given: texts (``--prompt``) or token id lists (``--prompt-ids``)."""
    if args.prompt is not None:
        return list(args.prompt)
    try:
        return [[int(t) for t in s.replace(",", " ").split()] for s in args.prompt_ids]
    except ValueError:
        raise ValueError("--prompt-ids expects space-separated integers") from None


def run(args: argparse.Namespace) -> int:
    """Load the model, answer the prompts through the text layer, print answers with NFE, tokens per forward
    and time."""
    import fewstep
    from fewstep.decoding import parse_policy
    from fewstep.decoding.trace import StepRecorder, completions_json
    from fewstep.models.loading import read_config, weight_files

    model_dir = resolve_model(args.model)
    read_config(model_dir)  # a file, a folder without config.json or weights: one line before anything else
    weight_files(model_dir)
    vars(args).update(decoding_settings(args, model_dir))  # unset flags: the model's decoding.json, else defaults
    policy = parse_policy(args.policy)  # fail fast on a bad spec, before loading a model
    device, dtype = device_and_dtype(args)
    apply_threads(args)
    _check_trace_file(args.trace_json)
    tokenizer = _load_tokenizer(Path(args.tokenizer or model_dir), required=args.prompt is not None)
    prompts = _prompts(args)
    t0 = time.perf_counter()
    model = fewstep.load_model(model_dir, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    progress, callback = _progress(len(prompts) * args.gen_length, quiet=args.json)
    recorder = StepRecorder(then=callback)
    try:
        comps = _generate(args, model, tokenizer, prompts, policy, recorder)
    finally:
        if progress is not None:
            progress.stop()
    shown = [p if isinstance(p, str) else " ".join(map(str, p)) for p in prompts]
    if args.trace_json:
        _save_trace(args, completions_json(comps, recorder, policy.describe(), args.cache, tokenizer, shown), model_dir)
    summary, results = _results(args, policy, comps, shown, load_s)
    if args.json:
        print(json.dumps({**summary, "results": results}, indent=1))
        return 0
    _print(args, results, summary, comps, recorder, tokenizer, int(model.config.mask_token_id))
    return 0


def _generate(args: argparse.Namespace, model, tokenizer, prompts: list, policy, recorder) -> list:
    """The prompts through the text layer, in one batch (prompt i seeded with ``--seed`` + i)."""
    from fewstep.decoding.text import GenerationSettings, TextGenerator

    base = GenerationSettings(
        policy=policy,
        max_tokens=args.gen_length,
        block_length=args.block_length,
        cache=args.cache,
        cfg_scale=args.cfg_scale,
        early_stop=args.early_stop,
        eos_fill=args.eos_fill,
        chat=args.chat,
        special_tokens=True,  # plain prompts get the tokenizer's BOS (the chat template writes its own)
    )
    per = [base.replace(seed=None if args.seed is None else args.seed + i) for i in range(len(prompts))]
    gen = TextGenerator(model, tokenizer, max_batch=max(len(prompts), 1))  # one batch, as given
    return gen.generate(prompts, per, on_event=recorder, canvas=True)


def _results(args: argparse.Namespace, policy, comps: list, shown: list[str], load_s: float) -> tuple[dict, list]:
    """The run's summary (policy, cache, times) and one result per prompt."""
    gen_s = comps[0].batch_seconds
    summary = {
        "policy": policy.describe(),
        "cache": args.cache,
        "gen_length": args.gen_length,
        "seconds": gen_s,
        "load_seconds": load_s,
        "tokens_per_second": sum(c.committed for c in comps) / max(gen_s, 1e-9),
    }
    results = [
        {
            "prompt": p,
            "answer": c.text,
            "nfe": c.nfe,
            "tokens_per_forward": c.tokens_per_forward,
            "positions_per_forward": c.positions_per_forward,
            "revisions": c.revisions,
            "revised_fraction": c.stats()["revised_fraction"],
        }
        for p, c in zip(shown, comps)
    ]
    return summary, results


def _check_trace_file(path: str | None) -> None:
    """``--trace-json`` may name a new file or a trace fewstep wrote; never a folder or another file."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--trace-json {p} is a folder; give a file name")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"--trace-json {p}: the folder {p.parent} does not exist")
    if p.exists():
        try:
            ours = json.loads(p.read_text(encoding="utf-8")).get("made_by") == "fewstep generate"
        except (ValueError, AttributeError, OSError):
            ours = False
        if not ours:
            raise ValueError(f"--trace-json {p} exists and is not a trace fewstep wrote; choose another file")


def _save_trace(args: argparse.Namespace, doc: dict, model_dir: Path) -> None:
    """``--trace-json``: the step trace with the model and the canvas geometry."""
    doc.update(model=str(model_dir), gen_length=args.gen_length, block_length=args.block_length or "default")
    doc["made_by"] = "fewstep generate"
    Path(args.trace_json).write_text(json.dumps(doc, indent=1) + "\n")


def _print(args, results, summary, comps, recorder, tokenizer, mask_id: int) -> None:
    """The human output: per prompt its trace (``--trace``), answer and speed; then the totals."""
    from rich.console import Console

    from fewstep.decoding.trace import render_steps

    console = Console(highlight=False)
    for i, (r, c) in enumerate(zip(results, comps)):
        if args.trace:
            console.rule(f"trace, prompt {i + 1}" if len(results) > 1 else "trace")
            render_steps(recorder.steps.get(c.id, []), args.gen_length, tokenizer, mask_id, console)
        if len(results) > 1:
            console.print(f"[bold]prompt {i + 1}:[/bold] {r['prompt']}")
        console.print(r["answer"], markup=False)
        revised = (
            f" · {r['revisions']} revisions ({r['revised_fraction']:.0%} of tokens changed)" if r["revisions"] else ""
        )
        console.print(
            f"[dim]NFE {r['nfe']} · {r['tokens_per_forward']:.2f} tokens/forward (before EOS) · "
            f"{r['positions_per_forward']:.2f} positions/forward{revised} · policy {summary['policy']} · "
            f"cache {args.cache}[/dim]"
        )
    gen_s, load_s = summary["seconds"], summary["load_seconds"]
    console.print(
        f"[dim]{gen_s:.2f} s generation ({summary['tokens_per_second']:.1f} tokens/s) · {load_s:.2f} s model load[/dim]"
    )
    if args.trace_json:
        console.print(f"[dim]trace saved to {args.trace_json}[/dim]")


def _progress(total: int, quiet: bool):
    """A rich progress bar on stderr (committed tokens), only on an interactive terminal."""
    if quiet or not sys.stderr.isatty():
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fewstep.decoding.text import Canvas

    progress = Progress(
        TextColumn("decoding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True)
    )
    task = progress.add_task("decoding", total=total)
    progress.start()

    def callback(event) -> None:
        if isinstance(event, Canvas):
            progress.advance(task, len(event.committed))

    return progress, callback
