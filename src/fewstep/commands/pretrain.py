"""`fewstep pretrain`: train a masked-diffusion LM from scratch with LLaDA's objective.

Takes a JSONL of prompt/response pairs, a model config (preset name or config.json) and a tokenizer
folder; writes a Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer files,
README.md model card, loss.png, train_log.jsonl) and resumable checkpoints under OUT/checkpoints/.
Runs through `accelerate`: plain `fewstep pretrain ...` uses one device; `accelerate launch
--config_file CFG -m fewstep pretrain ...` runs DDP / FSDP / DeepSpeed with the same flags.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

EPILOG = """examples:
  fewstep task --out data/arith
  fewstep pretrain --data data/arith/train.jsonl --tokenizer data/arith/tokenizer \\
      --model-config llada-tiny --gen-length 64 --max-steps 8000 --out runs/teacher
  # killed? run the same command again: it resumes from the last checkpoint.
"""


#: The trainer settings (``fewstep.train.config.TrainConfig`` fields, their defaults and help) that are flags.
OPTIONS = (
    "max_steps",
    "batch_size",
    "grad_accum",
    "lr",
    "schedule",
    "warmup_steps",
    "decay_steps",
    "min_lr_ratio",
    "weight_decay",
    "grad_clip",
    "seed",
    "bf16",
    "gradient_checkpointing",
    "save_every",
    "keep_checkpoints",
    "log_every",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fewstep.train.config import TrainConfig, add_options

    parser.epilog = EPILOG
    parser.add_argument("--data", required=True, help="JSONL with 'prompt' and 'response' string fields")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.json + tokenizer_config.json)")
    parser.add_argument(
        "--model-config", default="llada-tiny", help="preset name (llada-tiny, llada-small) or a config.json"
    )
    parser.add_argument("--out", required=True, help="run folder: final HF checkpoint + checkpoints/ for resuming")
    parser.add_argument(
        "--gen-length",
        type=int,
        default=None,
        help="pad every response with EOS to this many tokens (default: longest response + 1)",
    )
    add_options(parser, TrainConfig, OPTIONS)
    parser.add_argument("--eps", type=float, default=1e-3, help="t ~ U(eps, 1)")
    parser.add_argument(
        "--save-dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the final model.safetensors"
    )
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an existing run folder instead of resuming from its last checkpoint",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(args: argparse.Namespace, gen_length: int, data_hash: str, n: int):
    from fewstep.train.config import TrainConfig

    extra = {"objective": "mdm", "gen_length": gen_length, "eps": args.eps, "data": str(args.data)}
    extra.update(data_sha256_16=data_hash, n_examples=n)
    settings = {name: getattr(args, name) for name in OPTIONS}
    return TrainConfig(out_dir=str(args.out), **settings, progress=not args.no_progress, extra=extra)


def _setup(args: argparse.Namespace):
    """The tokenizer, the tokenized examples, the generation length, the config and the objective."""
    from fewstep.models.loading import load_tokenizer
    from fewstep.models.tokenizer import special_ids
    from fewstep.train.data import read_jsonl, tokenize_pairs
    from fewstep.train.mdm import MaskedDiffusionObjective
    from fewstep.train.objective import SpecialIds
    from fewstep.train.presets import model_config

    tok = load_tokenizer(args.tokenizer)
    examples = tokenize_pairs(read_jsonl(args.data), tok)
    longest = max(len(e["response_ids"]) for e in examples)
    gen_length = args.gen_length or longest + 1
    if longest > gen_length:
        raise ValueError(f"the longest response has {longest} tokens, more than --gen-length {gen_length}")
    cfg = model_config(args.model_config, special_ids(tok), len(tok))
    max_len = max(len(e["prompt_ids"]) for e in examples) + gen_length
    if max_len > int(cfg.get("max_sequence_length", max_len)):
        raise ValueError(f"prompt + generation is {max_len} tokens, over the model's max_sequence_length")
    objective = MaskedDiffusionObjective(SpecialIds.from_tokenizer(tok), max_len, gen_length=gen_length, eps=args.eps)
    return tok, examples, gen_length, cfg, objective


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from fewstep.train.data import hash_files
    from fewstep.train.launch import open_run, resume
    from fewstep.train.presets import count_parameters, init_model
    from fewstep.train.trainer import Trainer

    out = Path(args.out)
    command = "fewstep pretrain " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else ""
    accelerator = open_run(out, bf16=args.bf16, cpu=args.cpu, overwrite=args.overwrite)
    main = accelerator.is_main_process
    tok, examples, gen_length, cfg, objective = _setup(args)
    model = init_model(cfg, args.seed)
    train_cfg = _train_config(args, gen_length, hash_files([args.data]), len(examples))
    trainer = Trainer(model, objective, examples, train_cfg, tokenizer=tok, accelerator=accelerator)
    resume(trainer, "pretrain")
    if trainer.step >= args.max_steps and main:
        print(f"fewstep pretrain: the run is already at step {trainer.step} (--max-steps {args.max_steps})")
    trainer.invocations.append({"command": command or "fewstep pretrain (API)", "start_step": trainer.step})
    if main:
        print(
            f"fewstep pretrain: {count_parameters(model):,} parameters, {len(examples):,} examples, "
            f"gen length {gen_length}, {args.max_steps} steps of {args.batch_size} on {accelerator.device} "
            f"x{accelerator.num_processes}"
        )
    summary = trainer.train()
    trainer.export(out)
    if main:
        _finish(args, out, command, trainer, model, summary, accelerator, cfg)
    return 0


def _finish(args, out: Path, command: str, trainer, model, summary, accelerator, cfg: dict) -> None:
    """Cast the saved weights, write training.json and the model card, print the result."""
    import torch

    from fewstep.models.saving import cast_weights
    from fewstep.train.presets import count_parameters

    if args.save_dtype == "bfloat16":
        cast_weights(out, torch.bfloat16)
    info = {
        "command": command or f"fewstep pretrain --data {args.data} ...",
        "invocations": trainer.invocations,
        "seed": args.seed,
        "data": str(args.data),
        "data_sha256_16": trainer.cfg.extra["data_sha256_16"],
        "n_examples": trainer.cfg.extra["n_examples"],
        "gen_length": trainer.cfg.extra["gen_length"],
        "parameters": count_parameters(model),
        "steps": summary["steps"],
        "batch_size": args.batch_size,
        "final_loss": summary["final_loss"],
        "train_seconds": summary["seconds"],
        "device": f"{accelerator.device} x{accelerator.num_processes}",
        "torch_threads": torch.get_num_threads(),
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(out, info, cfg)
    trainer.write_logs()
    print(
        f"fewstep pretrain: done, {summary['steps']} steps in {summary['seconds']:.0f} s, "
        f"final loss {summary['final_loss']:.4f}; model in {out}"
    )


def write_model_card(folder: Path, info: dict[str, Any], cfg: dict[str, Any]) -> None:
    """README.md of the checkpoint (:func:`fewstep.train.card.write_model_card`)."""
    from fewstep.train.card import write_model_card as write_card

    invocations = info["invocations"]
    commands = [
        (f"# from step {inv['start_step']}:\n" if len(invocations) > 1 else "") + inv["command"] for inv in invocations
    ]
    keys = ("seed", "data", "data_sha256_16", "n_examples", "gen_length", "parameters", "steps", "batch_size")
    keys += ("final_loss", "train_seconds", "device", "torch_threads")
    write_card(
        folder,
        tags=["diffusion-language-model", "masked-diffusion", "llada"],
        description=f"A {cfg.get('model_type', 'llada')} masked-diffusion language model trained from scratch with "
        "`fewstep pretrain` (LLaDA's objective: t ~ U(eps, 1), response tokens masked with probability t, "
        "cross-entropy on the masked tokens weighted by 1/t; prompts never masked; answers padded with EOS).\n",
        commands=commands,
        table={k: info.get(k) for k in keys},
        note="Re-running these commands in order reproduces the weights exactly (resumes are deterministic)."
        if len(invocations) > 1
        else "",
    )
