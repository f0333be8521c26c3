"""`fewstep rollout`: the teacher answers a prompt set; verified answers become distillation data.

Writes OUT/shard-RRRRR-of-WWWWW.jsonl (one per process) with records ``{"id", "prompt", "response",
"correct", "question", "nfe", "tokens_per_forward", "positions_per_forward", "response_tokens", "finished",
"seconds", ...}`` and
OUT/rollout.json (settings and summary). ``fewstep distill --data OUT`` reads the shards. Killed? Run
the same command again: it continues where it stopped, without losing or repeating a record.
``--trajectory`` records d3LLM's teacher trajectories (``commit_rank`` etc., docs/distillation.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from fewstep.commands import EOS_FILL_HELP

EPILOG = """\
prompt sets (--prompts NAME, or a JSONL file with a "prompt" field per line):
{sets}

verifiers (--verifier NAME): {verifiers}

examples:
  # the embedded task: the tiny teacher answers 8192 train prompts, keep the verified answers
  fewstep rollout --model runs/teacher --prompts arith --out data/rollouts --gen-length 64
  # dParallel's data recipe on LLaDA-8B-Instruct, 8 GPUs (each process writes its own shard)
  accelerate launch --num_processes 8 -m fewstep rollout --model /models/LLaDA-8B-Instruct \\
      --prompts gsm8k --out data/llada-gsm8k --policy llada --gen-length 256 --block-length 32 --batch-size 32
  # any prompts, no verifier: keep everything
  fewstep rollout --model M --prompts prompts.jsonl --keep all --out data/r
  # d3LLM trajectories: one token per forward, retries at temperature 0.1, 0.2, ... until verified
  fewstep rollout --model runs/teacher --prompts arith --out data/trajectories --gen-length 64 --trajectory
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fewstep.decoding.policies import policy_help
    from fewstep.distill import rollout as ro
    from fewstep.eval.benchmarks import get_task

    sets = "\n".join(f"  {n}: {get_task(n).train.description}" for n in ro.prompt_set_names())
    parser.epilog = EPILOG.format(sets=sets, verifiers=", ".join([*ro.verifier_names(), "none"]))
    parser.epilog += "\npolicies (--policy):\n" + policy_help()
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="teacher checkpoint folder (LLaDA, Dream, LLaDA2-MoE, SDAR), or a shipped model name (teacher, ...)",
    )
    parser.add_argument("--prompts", required=True, metavar="NAME|JSONL", help="a prompt set name or a JSONL file")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (shards + rollout.json)")
    parser.add_argument(
        "--policy",
        default=None,
        metavar="NAME[:ARGS]",
        help="decoding policy of the teacher (default: with --trajectory the family's one-token-per-forward "
        "teacher: llada:steps=GEN_LENGTH,probs_dtype=float64 on LLaDA, entropy-dream:threshold=0 on Dream; else "
        "the model's decoding.json, else llada)",
    )
    parser.add_argument(
        "--trajectory",
        action="store_true",
        help="d3LLM trajectory rollout: one token per forward, no early stop, every record also holds commit_rank "
        "(per answer position, the 0-based forward that committed it); rejected answers are retried at "
        "temperature 0.1 x attempt (default --keep all: the last attempt is kept with correct false)",
    )
    parser.add_argument(
        "--attempts",
        type=int,
        default=5,
        help="--trajectory: tries per prompt until the verifier accepts (d3LLM: 5, temperatures 0.0..0.4)",
    )
    parser.add_argument(
        "--gen-length",
        type=int,
        default=None,
        help="answer length in tokens (default: the model's decoding.json, else its training gen_length if "
        "recorded, else 256)",
    )
    parser.add_argument(
        "--block-length",
        type=int,
        default=None,
        help="semi-autoregressive block length (default: the model's decoding.json, else its own block size for "
        "block-diffusion models (LLaDA2-MoE, SDAR), as fewstep generate; 32 otherwise; at most --gen-length)",
    )
    parser.add_argument(
        "--cache",
        choices=["none", "prefix", "dual"],
        default=None,
        help="KV cache mode (default: the model's decoding.json, else none)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (per process)")
    parser.add_argument(
        "--keep",
        choices=["correct", "all", "incorrect"],
        default=None,
        help="which answers to write (default: correct when a verifier exists, else all)",
    )
    parser.add_argument(
        "--verifier", default=None, metavar="NAME", help="answer checker (default: the prompt set's; 'none' to skip)"
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--seed", type=int, default=0, help="prompt set seed; sampling seed of prompt i is seed + i")
    parser.add_argument(
        "--chat-template",
        dest="chat",
        choices=["auto", "on", "off"],
        default="auto",
        help="wrap prompts in the tokenizer's chat template (auto: when it has one)",
    )
    parser.add_argument("--protocol", default=None, help="prompt protocol of a benchmark prompt set (e.g. dparallel)")
    parser.add_argument("--prompt-field", default="prompt", help="JSONL field holding the prompt text")
    parser.add_argument(
        "--no-early-stop",
        dest="early_stop",
        action="store_false",
        default=None,
        help="decode every block even after EOS (same answers, more NFE; default: stop, unless the model's "
        "decoding.json says otherwise)",
    )
    parser.add_argument("--eos-fill", action="store_true", help=EOS_FILL_HELP)
    parser.add_argument(
        "--no-sort", dest="sort", action="store_false", help="keep the prompt order (default: batch by length)"
    )
    parser.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer folder (default: --model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: this process's accelerate device)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing output folder first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def default_gen_length(model_dir: Path) -> int:
    """The generation length the model was trained with (``training.json``), else dParallel's 256."""
    info = model_dir / "training.json"
    if info.is_file():
        try:
            g = json.loads(info.read_text()).get("gen_length")
        except json.JSONDecodeError:
            g = None
        if isinstance(g, int) and g > 0:
            return g
    return 256


def _trajectory_teacher(model_dir: Path, gen_length: int) -> str:
    """The family's one-token-per-forward teacher policy (d3LLM's stage 1)."""
    from fewstep.distill.d3llm import teacher_policy
    from fewstep.models.loading import architecture_of, read_config

    return teacher_policy(architecture_of(read_config(model_dir)), gen_length)


#: What an unset decoding flag means when the model folder has no decoding.json.
FALLBACK = {"policy": "llada", "gen_length": None, "block_length": None, "cache": "none", "early_stop": True}


def rollout_config(args: argparse.Namespace, model_dir: Path, verifier: str | None):
    """The run's settings: the flags, else the model's recommended decoding (``decoding.json``), else the
    rollout defaults (llada, the training gen_length or 256, the default block, no cache, early stop). A
    trajectory rollout takes the family's one-token-per-forward teacher and never stops early."""
    from fewstep.decoding.engine import default_block_length
    from fewstep.distill import rollout as ro
    from fewstep.models import checkpoint_block_length
    from fewstep.models.saving import recommended

    d = recommended(model_dir, vars(args), FALLBACK)
    gen_length = d["gen_length"] or default_gen_length(model_dir)
    policy = args.policy or (_trajectory_teacher(model_dir, gen_length) if args.trajectory else d["policy"])
    return ro.RolloutConfig(
        out_dir=args.out,
        model=str(model_dir.resolve()),
        prompts=args.prompts if args.prompts in ro.prompt_set_names() else str(Path(args.prompts).resolve()),
        policy=policy,
        gen_length=gen_length,
        block_length=default_block_length(checkpoint_block_length(model_dir), gen_length, d["block_length"]),
        cache=d["cache"],
        batch_size=args.batch_size,
        keep=args.keep or ("correct" if verifier and not args.trajectory else "all"),
        verifier=verifier,
        limit=args.limit,
        seed=args.seed,
        chat=args.chat,
        early_stop=d["early_stop"] and not args.trajectory,
        eos_fill=args.eos_fill,
        sort_by_length=args.sort,
        prompt_field=args.prompt_field,
        protocol=args.protocol,
        trajectory=args.trajectory,
        attempts=args.attempts,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import PartialState

    import fewstep
    from fewstep.assets import resolve_model
    from fewstep.decoding import parse_policy
    from fewstep.distill import rollout as ro
    from fewstep.distributed import close_process_group_at_exit

    model_dir = resolve_model(args.model)
    records, default_verifier = ro.load_prompts(
        args.prompts, limit=args.limit, seed=args.seed, prompt_field=args.prompt_field, protocol=args.protocol
    )
    verifier = default_verifier if args.verifier is None else (None if args.verifier == "none" else args.verifier)
    if verifier is not None:
        ro.get_verifier(verifier)  # unknown name -> one-line error before loading the model
    cfg = rollout_config(args, model_dir, verifier)
    parse_policy(cfg.policy)  # fail fast on a bad spec
    # cpu=True on a machine without GPU, so that torchrun processes form a gloo group
    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    close_process_group_at_exit()
    main = state.is_main_process
    out = Path(args.out)
    if args.overwrite and out.exists() and main:
        shutil.rmtree(out)
    state.wait_for_everyone()
    device = args.device or state.device
    dtype = args.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    tokenizer = fewstep.load_tokenizer(args.tokenizer or model_dir)
    model = fewstep.load_model(model_dir, dtype=dtype, device=device)
    if main:
        print(
            f"fewstep rollout: {len(records):,} prompts, policy {cfg.policy}, gen {cfg.gen_length} / block "
            f"{cfg.block_length}, keep {cfg.keep} (verifier {verifier or 'none'}), {state.num_processes} process(es)"
            + (f", trajectories ({args.attempts} attempts)" if args.trajectory else "")
        )
    summary = ro.run_rollout(
        cfg,
        model,
        tokenizer,
        records,
        rank=state.process_index,
        world=state.num_processes,
        progress=not args.no_progress,
        barrier=state.wait_for_everyone,
    )
    if main:
        _print_summary(summary, out)
    return 0


def _print_summary(summary: dict, out: Path) -> None:
    acc = summary["accuracy"]
    print(
        f"fewstep rollout: kept {summary['kept']:,} of {summary['prompts']:,} answers "
        f"({summary['acceptance']:.1%}"
        + (f"; teacher accuracy {acc:.1%}" if acc is not None else "")
        + f"), mean NFE {summary['mean_nfe']:.1f}, {summary['tokens_per_forward']:.2f} tokens/forward (TPF), "
        f"{summary['positions_per_forward']:.2f} positions/forward, "
        f"{summary['prompts_per_second']:.1f} prompts/s; data in {out}"
    )
