"""`fewstep distill --method NAME`: distil a diffusion LM for few-step decoding.

Trains with the chosen method's objective (``fewstep.distill.METHODS``) on prompt/response JSONL, usually
the folder ``fewstep rollout`` wrote, with LoRA (``peft``) or full fine-tuning, through ``accelerate``:
plain ``fewstep distill ...`` uses one device; ``accelerate launch --config_file configs/accelerate/...
-m fewstep distill ...`` runs DDP, FSDP or DeepSpeed with the same flags. Writes OUT/ (merged HF
checkpoint that ``fewstep.load_model`` loads, OUT/adapter/ with LoRA, tokenizer, README.md model
card, training.json, train_log.jsonl, loss.png) and resumable checkpoints under OUT/checkpoints/.
Killed? Run the same command again: it resumes from the last checkpoint (same step, optimiser and
RNG state).

Block-diffusion models (LLaDA2-MoE, SDAR) get the block-diffusion objectives (dFactory's dParallel, CD4LM
with both views inside the block-causal structure: docs/distillation.md, "Block-diffusion models").
Defaults follow the papers, per model family: the recipe flags are generated from the recipe dataclasses
of the paper files (their ``RECIPES``), the run's flags from ``fewstep.train.config.TrainConfig``, and an
unset recipe flag takes the recipe's value for the model's family. docs/distillation.md lists the settings
used for the tiny embedded model. This module is wiring: the library does the work
(``fewstep.distill.build_objective``, ``read_training_data``, ``fewstep.train``).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewstep.assets import SHIPPED_HELP
from fewstep.commands.common import add_device_arguments, add_output_arguments, apply_threads, positive_int

EPILOG = """\
examples:
  # the shipped tiny teacher on CPU (rollouts first, see `fewstep rollout --help`)
  fewstep distill --method dparallel --model teacher --data data/rollouts --out runs/dparallel \\
      --finetune full --lr 1e-4 --batch-size 64 --max-steps 1000
  fewstep distill --method dparallel --model teacher --data data/rollouts --out runs/dparallel-lora \\
      --finetune lora --lora-r 8 --lr 1e-3 --max-steps 600    # then: fewstep merge-lora --help
  fewstep distill --method cd4lm --model teacher --data data/rollouts --out runs/cd4lm \\
      --finetune full --lr 1e-4 --batch-size 64 --max-steps 1000 --eos-pad --teacher-visible token
  # d3LLM on the tiny teacher: trajectory rollouts (fewstep rollout --trajectory), then the objective
  fewstep distill --method d3llm --model teacher --data data/trajectories --out runs/d3llm \\
      --lora-r 32 --lr 1e-3 --batch-size 32 --max-steps 600
  # dParallel on LLaDA-8B-Instruct, 8 GPUs x 1 x grad-acc 8 (docs/distillation.md)
  accelerate launch --config_file configs/accelerate/deepspeed_zero2_8gpu.yaml -m fewstep distill \\
      --method dparallel --model /models/LLaDA-8B-Instruct --data data/llada-gsm8k --out runs/dparallel-llada \\
      --lora-r 128 --lora-targets dparallel --batch-size 64 --grad-accum 8 --max-length 384 --bf16
  # block-diffusion models (LLaDA2-MoE, SDAR): dFactory's dParallel objective, full fine-tuning by default
  # (in the FSDP config wrap DecoderLayer for LLaDA2, SDARLayer for SDAR)
  accelerate launch --config_file configs/accelerate/fsdp_8gpu.yaml -m fewstep distill --method dparallel \\
      --model /models/LLaDA2.0-mini --data data/llada2-gsm8k --out runs/dparallel-llada2 --batch-size 8 --bf16
  # DMax OPUT on LLaDA2.0-mini at the official settings (docs/distillation.md, "DMax")
  accelerate launch --config_file configs/accelerate/fsdp_8gpu.yaml -m fewstep distill --method dmax \\
      --model /models/LLaDA2.0-mini --data data/dmax-math --out runs/dmax-llada2 --batch-size 8 \\
      --max-length 2048 --bf16 --gradient-checkpointing
"""


#: The trainer settings (``TrainConfig`` fields) that are flags of this command; the optimiser's come from
#: the recipe. An unset ``--max-steps`` / ``--save-every`` / ``--log-every`` follows the run's length.
OPTIMISATION = ("batch_size", "grad_accum", "max_steps", "decay_steps", "grad_clip", "seed")
SYSTEM = ("bf16", "gradient_checkpointing", "save_every", "keep_checkpoints", "log_every")
RUN_LENGTH = {
    "max_steps": (None, "--epochs of the data"),
    "save_every": (None, "about 10 checkpoints per run"),
    "log_every": (None, "about 100 records per run"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fewstep.distill import METHODS, all_recipes
    from fewstep.train.config import TrainConfig, add_options
    from fewstep.train.recipe import add_recipe_arguments

    parser.epilog = EPILOG
    parser.add_argument(
        "--method",
        required=True,
        choices=list(METHODS),
        help="distillation objective (dmax: DMax's on-policy uniform training, each example trained twice; d3llm: "
        "masks cut from the teacher's trajectories, fewstep rollout --trajectory)",
    )
    parser.add_argument("--model", required=True, metavar="PATH", help=f"teacher / base {SHIPPED_HELP}")
    parser.add_argument(
        "--data", required=True, metavar="PATH", help="rollout folder (fewstep rollout) or prompt/response JSONL"
    )
    parser.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer folder (default: --model)")
    parser.add_argument(
        "--trajectories",
        default=None,
        metavar="PATH",
        help="d3llm: teacher trajectories (a fewstep rollout --trajectory folder or JSONL) joined on the record id "
        "(default: the ones --data's records carry; a record without one gets Bernoulli masks)",
    )
    rec = parser.add_argument_group("recipe (the papers' defaults, per model family; unset = the recipe's)")
    add_recipe_arguments(rec, all_recipes())
    _lora_arguments(parser.add_argument_group("LoRA (through peft, with --finetune lora)"))
    opt = parser.add_argument_group("optimisation")
    add_options(opt, TrainConfig, OPTIMISATION, RUN_LENGTH)
    _length_arguments(opt)
    sys_ = parser.add_argument_group("precision, checkpoints, devices")
    add_options(sys_, TrainConfig, SYSTEM, RUN_LENGTH)
    _system_arguments(sys_)


def _lora_arguments(ft) -> None:
    ft.add_argument("--lora-r", type=int, default=32, help="LoRA rank (dParallel: 128 on LLaDA, 32 on Dream)")
    ft.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default: = rank, as both papers)")
    ft.add_argument("--lora-dropout", type=float, default=0.0)
    ft.add_argument(
        "--lora-targets",
        default="all",
        help="projection roles, comma-separated from q,k,v,o,gate,up,down; 'all'; or 'dparallel' = the set "
        "dParallel's config effectively adapts (q,k,v,up on LLaDA, whose o/gate/down names it misses; all on the "
        "other families). LLaDA2-MoE: q/k/v = the fused query_key_value, gate/up/down = every routed and shared "
        "expert and the dense MLPs, never the router",
    )


def _length_arguments(opt) -> None:
    opt.add_argument(
        "--loss-normalization",
        choices=["sequence", "batch"],
        default="sequence",
        help="sequence: each sequence normalised by its own counts, mean over sequences (dParallel's loss at its "
        "batch 1 per device; independent of processes x micro-batches); batch: means over a micro-batch",
    )
    opt.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="sequence length: dparallel and dmax pad prompt+response+EOS with EOS to it (papers: 384, 2048), "
        "cd4lm truncates (paper: 512); default: longest prompt + --gen-length",
    )
    opt.add_argument(
        "--gen-length",
        type=positive_int,
        default=None,
        help="response room for the default --max-length = longest prompt + max(gen length, longest response + 1) "
        "(default: the rollout's gen_length, else longest response + 1)",
    )


def _system_arguments(sys_) -> None:
    add_device_arguments(
        sys_, device=False, dtype_help="weights dtype (default: float32; bfloat16 for the frozen base of LoRA on GPU)"
    )
    sys_.add_argument(
        "--save-dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: the base checkpoint's"
    )
    sys_.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    add_output_arguments(sys_, required=True, help="run folder: final model + checkpoints/ (resumed if it made it)")
    sys_.add_argument("--no-progress", action="store_true", help="no progress bar")


# -- the command ---------------------------------------------------------------------------------------------


def _lengths(args: argparse.Namespace, examples: list[dict[str, Any]], manifest: dict | None) -> tuple[int, int]:
    """``(gen_length, max_length)`` from the flags, the rollout manifest and the data."""
    longest_prompt = max(len(e["prompt_ids"]) for e in examples)
    longest_response = max(len(e["response_ids"]) for e in examples)
    gen_length = args.gen_length or (manifest or {}).get("config", {}).get("gen_length") or longest_response + 1
    return gen_length, args.max_length or longest_prompt + max(gen_length, longest_response + 1)


def _warn_truncation(objective: Any, examples: list[dict[str, Any]]) -> None:
    """Warn when an objective that pads every sequence to ``max_length`` has to cut some."""
    longest = max(len(e["prompt_ids"]) + len(e["response_ids"]) + 1 for e in examples)
    if objective.pads_to_max_length and longest > objective.max_length:
        print(
            f"fewstep distill: warning: the longest prompt+response+EOS ({longest} tokens) exceeds --max-length "
            f"{objective.max_length}; such sequences are truncated",
            file=sys.stderr,
        )


def _lora_spec(args: argparse.Namespace, finetune: str, arch: str):
    from fewstep.train.lora import LoraSpec, lora_roles

    if finetune != "lora":
        if args.lora_targets != "all":
            raise ValueError("--lora-targets applies to --finetune lora")
        return None
    roles = lora_roles(args.lora_targets, arch)
    return LoraSpec(r=args.lora_r, alpha=args.lora_alpha or args.lora_r, dropout=args.lora_dropout, roles=roles)


def _train_config(args, recipe, lora, objective, n: int, data_hash: str):
    """The trainer's settings: the run's flags, the recipe's optimiser, the run-length defaults."""
    from fewstep.train.config import TrainConfig

    max_steps = args.max_steps or max(1, math.ceil(recipe.epochs * n / args.batch_size))
    run = {name: getattr(args, name) for name in (*OPTIMISATION, *SYSTEM)}
    run.update(
        max_steps=max_steps,
        save_every=args.save_every or max(1, math.ceil(max_steps / 10)),
        log_every=args.log_every or max(1, max_steps // 100),
    )
    extra = {
        "objective": args.method,
        "max_length": objective.max_length,
        "gen_length": objective.gen_length,
        "loss_normalization": args.loss_normalization,
        "objective_hparams": objective.hparams(),
        "data": str(args.data),
        "data_sha256_16": data_hash,
    }
    return TrainConfig(
        out_dir=str(args.out),
        **run,
        **recipe.optimiser(max_steps),
        lora=lora,
        progress=not args.no_progress,
        extra=extra,
    )


def _objective(args: argparse.Namespace, arch: str, tok: Any, model: Any, examples, manifest):
    """The method's objective for this model and data (lengths from the flags, the rollout and the data)."""
    from fewstep.distill import build_objective
    from fewstep.train.objective import SpecialIds

    gen_length, max_length = _lengths(args, examples, manifest)
    context = int(getattr(model.config, "max_sequence_length", max_length) or max_length)
    if max_length > context:
        raise ValueError(f"--max-length {max_length} exceeds the model's context ({context})")
    ids = SpecialIds.from_tokenizer(tok, model.config)
    per_sequence = args.loss_normalization == "sequence"
    objective = build_objective(
        args.method, arch, ids, max_length, gen_length=gen_length, per_sequence=per_sequence, overrides=vars(args)
    )
    _warn_truncation(objective, examples)
    return objective


@dataclass
class _Run:
    """What :func:`_setup` reads before training."""

    model_dir: Path
    out: Path
    arch: str
    recipe: Any
    manifest: dict | None
    tok: Any
    examples: list[dict[str, Any]]
    data_hash: str
    accelerator: Any


def run(args: argparse.Namespace) -> int:
    from fewstep.train.launch import resume
    from fewstep.train.trainer import Trainer

    r = _setup(args)
    main = r.accelerator.is_main_process
    model, objective, lora, teacher = _model_and_objective(args, r)
    examples = objective.training_examples(r.examples)  # DMax: each example once per view
    train_cfg = _train_config(args, r.recipe, lora, objective, len(examples), r.data_hash)
    trainer = Trainer(
        model, objective, examples, train_cfg, tokenizer=r.tok, teacher=teacher, accelerator=r.accelerator
    )
    resume(trainer, "distill")
    if main:
        _announce(args, r.arch, model, lora, objective, len(examples), train_cfg, r.accelerator)
    summary = trainer.train()
    trainer.export(r.out)
    if main:
        _finish(args, r.model_dir, r.out, r.recipe.finetune, train_cfg, summary, len(examples), r.accelerator)
        trainer.write_logs()
    return 0


def _setup(args: argparse.Namespace) -> _Run:
    """Everything read before training: the model's family and recipe, the data, the tokenizer, the run
    folder (checked and claimed: :mod:`fewstep.outputs`) and the accelerator."""
    from fewstep.assets import resolve_model
    from fewstep.distill import read_training_data, recipe_for
    from fewstep.models.loading import architecture_of, load_tokenizer, read_config
    from fewstep.train.data import hash_files
    from fewstep.train.launch import open_run

    model_dir, out = resolve_model(args.model), Path(args.out)
    arch = architecture_of(read_config(model_dir))
    recipe = recipe_for(args.method, arch, vars(args))
    records, manifest, files = read_training_data(args.data)
    tok = load_tokenizer(args.tokenizer or model_dir)
    examples = _examples(args, recipe, records, tok)
    accelerator = open_run(
        out,
        bf16=args.bf16,
        cpu=args.cpu,
        overwrite=args.overwrite,
        command="distill",
        inputs=[model_dir, args.data, args.tokenizer, args.trajectories],
        allow_existing=args.allow_existing,
    )
    apply_threads(args, accelerator.num_processes if accelerator.device.type == "cpu" else None)
    if accelerator.is_main_process:
        _warn_unused(args, arch, recipe)
    return _Run(model_dir, out, arch, recipe, manifest, tok, examples, hash_files(files), accelerator)


def _model_and_objective(args: argparse.Namespace, r: _Run):
    """The student (loaded on the CPU; the trainer places it), the objective, the LoRA spec, the teacher."""
    from fewstep.distill import frozen_teacher
    from fewstep.models.loading import load_model

    on_gpu = r.accelerator.device.type != "cpu"
    dtype = args.dtype or ("bfloat16" if on_gpu and r.recipe.finetune == "lora" else "float32")
    model = load_model(r.model_dir, dtype=dtype, device="cpu")
    objective = _objective(args, r.arch, r.tok, model, r.examples, r.manifest)
    lora = _lora_spec(args, r.recipe.finetune, r.arch)
    teacher = None
    if objective.needs_teacher and lora is None:
        teacher = frozen_teacher(r.model_dir, "bfloat16" if args.bf16 else dtype)
    return model, objective, lora, teacher


def _examples(args: argparse.Namespace, recipe: Any, records: list[dict], tok: Any) -> list[dict[str, Any]]:
    """The tokenized examples, prepared by the method's objective (d3LLM joins the teacher's trajectories:
    the records' own or ``--trajectories``); its notes are printed as warnings."""
    from fewstep.distill import METHODS, read_training_data, recipes
    from fewstep.train.data import tokenize_pairs

    objective_class = type(recipe).objective_class
    if args.trajectories and not objective_class.reads_trajectories:
        users = [m for m in METHODS if any(type(r).objective_class.reads_trajectories for r in recipes(m).values())]
        raise ValueError(f"--trajectories applies to --method {' or '.join(users)}")
    examples = tokenize_pairs(records, tok)
    trajectories = read_training_data(args.trajectories)[0] if args.trajectories else None
    for note in objective_class.prepare(examples, records, trajectories):
        print(f"fewstep distill: warning: {note}", file=sys.stderr)
    return examples


def _warn_unused(args: argparse.Namespace, arch: str, recipe: Any) -> None:
    """Name the recipe flags given that the chosen method/family has no field for (they would be silently
    ignored otherwise), on stderr; the run goes on."""
    from fewstep.distill import all_recipes
    from fewstep.train.recipe import unused_flags

    unused = unused_flags(recipe, all_recipes(), args)
    if unused:
        verb = "does" if len(unused) == 1 else "do"
        print(
            f"fewstep distill: warning: {', '.join(unused)} {verb} not apply to {args.method} on {arch} "
            "(ignored; the recipe flags of each method and family: fewstep distill --help)",
            file=sys.stderr,
        )


def _announce(args, arch, model, lora, objective, n, train_cfg, accelerator) -> None:
    from fewstep.train.lora import target_modules
    from fewstep.train.presets import count_parameters

    what = "full fine-tuning"
    if lora:
        what = f"LoRA r={lora.r} on {','.join(lora.roles)} ({len(target_modules(model, lora.roles))} modules)"
    teacher_note = ""
    if objective.needs_teacher:
        teacher_note = ", teacher = base with adapter disabled" if lora else ", teacher = frozen copy"
    print(
        f"fewstep distill: {args.method} on {arch} ({count_parameters(model):,} parameters), {what}"
        f"{teacher_note}; {n:,} examples, max length {train_cfg.extra['max_length']}, {train_cfg.max_steps} "
        f"steps of {args.batch_size} on {accelerator.device} x{accelerator.num_processes}"
    )


def _finish(args, model_dir: Path, out: Path, finetune: str, train_cfg, summary, n: int, accelerator) -> None:
    """Cast the saved weights, write training.json and the model card, print the result."""
    from fewstep.distill import save_dtype_for
    from fewstep.models.saving import cast_weights

    save_dtype = save_dtype_for(args.save_dtype, model_dir)
    if save_dtype is not None:
        cast_weights(out, save_dtype)
    info = {
        "command": command_line(args),
        "method": args.method,
        "base_model": str(model_dir),
        "finetune": finetune,
        "lora": train_cfg.to_dict()["lora"],
        "seed": args.seed,
        "data": str(args.data),
        "data_sha256_16": train_cfg.extra["data_sha256_16"],
        "n_examples": n,
        "gen_length": train_cfg.extra["gen_length"],
        "max_length": train_cfg.extra["max_length"],
        "objective_hparams": train_cfg.extra["objective_hparams"],
        "lr": train_cfg.lr,
        "schedule": train_cfg.schedule,
        "warmup_steps": train_cfg.warmup_steps,
        "steps": summary["steps"],
        "batch_size": args.batch_size,
        "final_loss": summary["final_loss"],
        "train_seconds": summary["seconds"],
        "device": f"{accelerator.device} x{accelerator.num_processes}",
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(out, info)
    if finetune == "lora":
        from fewstep.train.lora import record_adapter_base

        record_adapter_base(out / "adapter", model_dir)  # merge-lora merges it only into this base
    print(
        f"fewstep distill: done, {summary['steps']} steps in {summary['seconds']:.0f} s, final loss "
        f"{summary['final_loss']:.4f}; model in {out}"
        + (f", adapter in {out / 'adapter'}" if finetune == "lora" else "")
    )


def command_line(args: argparse.Namespace) -> str:
    """The full ``fewstep distill`` command of a run (every option spelled out, defaults included)."""
    from fewstep.distill import all_recipes
    from fewstep.train.recipe import recipe_flags

    flags = recipe_flags(all_recipes())
    parts = ["fewstep", "distill"]
    for key, value in vars(args).items():
        if key == "command" or value is None or value is False:
            continue
        flag = flags.get(key) or "--" + key.replace("_", "-")
        text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)  # as the flag takes it
        parts += [flag] if value is True else [flag, shlex.quote(text)]
    return " ".join(parts)


def write_model_card(folder: Path, info: dict[str, Any]) -> None:
    """README.md of the distilled checkpoint (:func:`fewstep.train.card.write_model_card`)."""
    from fewstep.distill import method
    from fewstep.train.card import write_model_card as write_card

    how = "LoRA, merged; the adapter is in adapter/" if info["finetune"] == "lora" else "full fine-tuning"
    title = method(info["method"]).title
    write_card(
        folder,
        tags=["diffusion-language-model", "distillation", info["method"]],
        base_model=info["base_model"],
        description=f"Distilled from `{info['base_model']}` with `fewstep distill` ({title}, {how}).",
        commands=[info["command"]],
        table={k: v for k, v in info.items() if k != "command"},
    )
