"""`fewstep generate`: answer prompts with a diffusion LM, a chosen unmasking policy and cache mode (through the
text layer, :mod:`fewstep.decoding.text`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fewstep.assets import SHIPPED_HELP, resolve_model
from fewstep.commands import EOS_FILL_HELP

#: What an unset decoding flag means when the model folder has no recommended decoding (decoding.json).
FALLBACK = {"policy": "threshold:0.9", "gen_length": 128, "block_length": None, "cache": "none", "early_stop": True}

EPILOG = """\
policies (--policy NAME, NAME:VALUE or NAME:key=value,...):
{policies}

examples:
  fewstep generate --model /models/LLaDA-8B-Instruct --prompt "What is 7*8?" --policy threshold:0.9 --cache dual
  fewstep generate --model M --prompt "..." --policy llada:steps=128 --gen-length 128 --block-length 32
  fewstep generate --model M --prompt "..." --policy cad:threshold=0.95,max_tokens=32 --trace
  fewstep generate --model M --prompt-ids "5 17 42" --policy entropy:0.5 --trace-json trace.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fewstep generate``."""
    from fewstep.decoding.policies import policy_help

    parser.epilog = EPILOG.format(policies=policy_help())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # defaults are written in the help texts
    parser.add_argument(
        "--model",
        default="teacher",
        metavar="PATH",
        help=f"{SHIPPED_HELP} (default: teacher)",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="prompt text (repeat for a batch)")
    src.add_argument(
        "--prompt-ids", action="append", metavar="IDS", help="prompt as space-separated token ids (repeatable)"
    )
    parser.add_argument(
        "--policy",
        default=None,
        metavar="NAME[:ARGS]",
        help="unmasking policy (default: the model's decoding.json, else threshold:0.9; names below)",
    )
    parser.add_argument(
        "--cache",
        default=None,
        choices=["none", "prefix", "dual"],
        help="KV cache mode (default: the model's decoding.json, else none)",
    )
    parser.add_argument(
        "--gen-length", type=int, default=None, help="tokens to generate (default: the model's decoding.json, else 128)"
    )
    parser.add_argument(
        "--block-length",
        type=int,
        default=None,
        help="semi-autoregressive block length (default: the model's decoding.json, else 32, or gen-length if smaller)",
    )
    parser.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale (default: 0, off)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for sampling policies; prompt i uses seed+i (default: torch's global RNG)",
    )
    parser.add_argument(
        "--no-early-stop",
        dest="early_stop",
        action="store_false",
        default=None,
        help="keep decoding after EOS (the reference samplers' behaviour; default: stop a prompt at EOS, unless "
        "the model's decoding.json says otherwise)",
    )
    parser.add_argument("--eos-fill", action="store_true", help=EOS_FILL_HELP)
    parser.add_argument(
        "--no-chat-template", dest="chat", action="store_false", help="tokenize the prompt as plain text"
    )
    parser.add_argument("--tokenizer", metavar="PATH", default=None, help="tokenizer folder (default: --model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--trace", action="store_true", help="show the canvas filling step by step")
    parser.add_argument("--trace-json", metavar="FILE", default=None, help="save the step trace as JSON")
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
    import torch

    import fewstep
    from fewstep.decoding import parse_policy
    from fewstep.decoding.text import GenerationSettings, TextGenerator
    from fewstep.decoding.trace import StepRecorder, completions_json
    from fewstep.models.saving import recommended

    model_dir = resolve_model(args.model)
    vars(args).update(recommended(model_dir, vars(args), FALLBACK))  # unset flags: the model's decoding.json
    policy = parse_policy(args.policy)  # fail fast on a bad spec, before loading a model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    tokenizer = _load_tokenizer(Path(args.tokenizer or model_dir), required=args.prompt is not None)
    prompts = _prompts(args)
    t0 = time.perf_counter()
    model = fewstep.load_model(model_dir, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
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
    progress, callback = _progress(len(prompts) * args.gen_length, quiet=args.json)
    recorder = StepRecorder(then=callback)
    try:
        gen = TextGenerator(model, tokenizer, max_batch=max(len(prompts), 1))  # one batch, as given
        comps = gen.generate(prompts, per, on_event=recorder, canvas=True)
    finally:
        if progress is not None:
            progress.stop()
    shown = [p if isinstance(p, str) else " ".join(map(str, p)) for p in prompts]
    if args.trace_json:
        _save_trace(args, completions_json(comps, recorder, policy.describe(), args.cache, tokenizer, shown), model_dir)
    gen_s = comps[0].batch_seconds
    summary = {
        "policy": policy.describe(),
        "cache": args.cache,
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
    if args.json:
        print(json.dumps({**summary, "results": results}, indent=1))
        return 0
    _print(args, results, summary, comps, recorder, tokenizer, int(model.config.mask_token_id))
    return 0


def _save_trace(args: argparse.Namespace, doc: dict, model_dir: Path) -> None:
    """``--trace-json``: the step trace with the model and the canvas geometry."""
    doc.update(model=str(model_dir), gen_length=args.gen_length, block_length=args.block_length or "default")
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
