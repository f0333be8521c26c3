"""`fewstep distill --method dparallel|cd4lm`: distil a diffusion LM for few-step decoding.

Trains with the chosen objective (``fewstep.distill``) on prompt/response JSONL, usually the folder
``fewstep rollout`` wrote, with LoRA (``peft``) or full fine-tuning, through ``accelerate``: plain
``fewstep distill ...`` uses one device; ``accelerate launch --config_file configs/accelerate/...
-m fewstep distill ...`` runs DDP, FSDP or DeepSpeed with the same flags. Writes OUT/ (merged HF
checkpoint that ``fewstep.load_model`` loads, OUT/adapter/ with LoRA, tokenizer, README.md model
card, training.json, train_log.jsonl, loss.png) and resumable checkpoints under OUT/checkpoints/.
Killed? Run the same command again: it resumes from the last checkpoint (same step, optimiser and
RNG state).

Defaults follow the papers (per architecture where they differ): dParallel = LoRA, lr 2e-5, 6 epochs
(LLaDA; Dream 3 with cosine and 5 % warm-up), entropy weight 2 (Dream 1), tau 0.5, block 32 (Dream
none); CD4LM = full fine-tuning with a frozen teacher, lr 5e-6, 200 warm-up steps, T 2.0, lambda
0.9 -> 0.5. docs/distillation.md lists the settings used for the tiny embedded model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  # the tiny embedded teacher on CPU (rollouts first, see `fewstep rollout --help`)
  fewstep distill --method dparallel --model runs/teacher --data data/rollouts --out runs/dparallel \\
      --lora-r 32 --lr 1e-3 --batch-size 32 --max-steps 600
  fewstep distill --method cd4lm --model runs/teacher --data data/rollouts --out runs/cd4lm \\
      --lr 3e-4 --warmup-steps 30 --batch-size 32 --max-steps 600
  # dParallel on LLaDA-8B-Instruct, 8 GPUs x 1 x grad-acc 8 (README, Distillation)
  accelerate launch --config_file configs/accelerate/deepspeed_zero2_8gpu.yaml -m fewstep distill \\
      --method dparallel --model /models/LLaDA-8B-Instruct --data data/llada-gsm8k --out runs/dparallel-llada \\
      --lora-r 128 --lora-targets dparallel --batch-size 64 --grad-accum 8 --max-length 384 --bf16
"""

# (LoRA, lr, epochs, schedule, warm-up (steps, or a ratio of the run when < 1)) per method and architecture
RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("dparallel", "llada"): {"finetune": "lora", "lr": 2e-5, "epochs": 6, "schedule": "constant", "warmup": 0},
    ("dparallel", "dream"): {"finetune": "lora", "lr": 2e-5, "epochs": 3, "schedule": "cosine", "warmup": 0.05},
    ("cd4lm", "llada"): {"finetune": "full", "lr": 5e-6, "epochs": 10, "schedule": "constant", "warmup": 200},
    ("cd4lm", "dream"): {"finetune": "full", "lr": 5e-6, "epochs": 10, "schedule": "constant", "warmup": 200},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--method", required=True, choices=["dparallel", "cd4lm"], help="distillation objective")
    parser.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="teacher / base checkpoint folder, or a shipped model name (teacher, ...)",
    )
    parser.add_argument(
        "--data", required=True, metavar="PATH", help="rollout folder (fewstep rollout) or prompt/response JSONL"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder: final model + checkpoints/")
    parser.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer folder (default: --model)")

    ft = parser.add_argument_group("fine-tuning (LoRA through peft, or full)")
    ft.add_argument(
        "--finetune", choices=["lora", "full"], default=None, help="default: lora for dparallel, full for cd4lm"
    )
    ft.add_argument("--lora-r", type=int, default=32, help="LoRA rank (dParallel: 128 on LLaDA, 32 on Dream)")
    ft.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default: = rank, as both papers)")
    ft.add_argument("--lora-dropout", type=float, default=0.0)
    ft.add_argument(
        "--lora-targets",
        default="all",
        help="projection roles, comma-separated from q,k,v,o,gate,up,down; 'all'; or 'dparallel' = the set "
        "dParallel's config effectively adapts (q,k,v,up on LLaDA, whose o/gate/down names it misses; all on Dream)",
    )

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=None, help="peak LR (default: 2e-5 dparallel, 5e-6 cd4lm)")
    opt.add_argument(
        "--schedule",
        choices=["constant", "cosine", "linear"],
        default=None,
        help="after warm-up (default: constant; dparallel on Dream: cosine)",
    )
    opt.add_argument(
        "--warmup-steps", type=int, default=None, help="linear warm-up (default: 0; Dream 5%% of the run; cd4lm 200)"
    )
    opt.add_argument("--min-lr-ratio", type=float, default=0.0, help="final LR / peak for cosine and linear")
    opt.add_argument("--weight-decay", type=float, default=0.01)
    opt.add_argument("--adam-beta2", type=float, default=0.999)
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    opt.add_argument("--batch-size", type=int, default=64, help="global batch: sequences per optimiser step")
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step (per process)")
    opt.add_argument("--epochs", type=float, default=None, help="passes over the data (default: 6 / 3 / 10)")
    opt.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    opt.add_argument(
        "--loss-normalization",
        choices=["sequence", "batch"],
        default="sequence",
        help="sequence: each sequence normalised by its own counts, mean over sequences (dParallel's loss at its "
        "batch 1 per device; independent of processes x micro-batches); batch: means over a micro-batch",
    )
    opt.add_argument("--seed", type=int, default=0, help="seed of the data order, the masks and LoRA init")

    obj = parser.add_argument_group("objective (papers' defaults)")
    obj.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="sequence length: dparallel pads prompt+response+EOS with EOS to it (paper: 384), cd4lm truncates "
        "(paper: 512); default: longest prompt + --gen-length",
    )
    obj.add_argument(
        "--gen-length",
        type=int,
        default=None,
        help="response room for the default --max-length = longest prompt + max(gen length, longest response + 1) "
        "(default: the rollout's gen_length, else longest response + 1)",
    )
    obj.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="dparallel: entropy temperature (0.5); cd4lm: KL temperature (2.0)",
    )
    obj.add_argument("--block-size", type=int, default=None, help="dparallel block (LLaDA 32; 0 = none, Dream's)")
    obj.add_argument("--entropy-weight", type=float, default=None, help="dparallel: weight w (LLaDA 2, Dream 1)")
    obj.add_argument("--mask-ratio", type=float, default=0.5, help="dparallel: Bernoulli ratio inside the block")
    obj.add_argument(
        "--reference-masking", action="store_true", help="dparallel: the official masker bit for bit (batch quirks)"
    )
    obj.add_argument("--lambda", dest="lam", type=float, default=None, help="cd4lm: fixed lambda (default: schedule)")
    obj.add_argument("--initial-lambda", type=float, default=0.9, help="cd4lm: lambda at the start")
    obj.add_argument("--final-lambda", type=float, default=0.5, help="cd4lm: lambda at the end")
    obj.add_argument("--lambda-warmup-ratio", type=float, default=0.1, help="cd4lm: flat share before the cosine")
    obj.add_argument("--clamp-max", type=float, default=5.0, help="cd4lm: clamp of each loss term (0 disables)")
    obj.add_argument("--mask-padding", action="store_true", help="cd4lm: attention mask over the padding")
    obj.add_argument(
        "--eos-pad",
        action="store_true",
        help="cd4lm: pad each answer with EOS to --gen-length (LLaDA's SFT canvas; the reference trains on the "
        "raw text). Use it for models trained on EOS-padded answers, like fewstep's tiny teacher",
    )
    obj.add_argument(
        "--teacher-visible",
        choices=["logits", "token"],
        default="logits",
        help="cd4lm: consistency target where only the student is masked: the teacher's output at that visible "
        "position (reference) or the token the teacher sees there",
    )
    obj.add_argument("--train-on-pad-id", action="store_true", help="cd4lm: keep in-answer tokens equal to the pad id")

    sys_ = parser.add_argument_group("precision, checkpoints, devices")
    sys_.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast) through accelerate")
    sys_.add_argument(
        "--dtype",
        default=None,
        help="weights dtype (default: float32; bfloat16 for the frozen base of LoRA on GPU)",
    )
    sys_.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    sys_.add_argument(
        "--save-dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: the base checkpoint's"
    )
    sys_.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: ~10 per run)")
    sys_.add_argument("--keep-checkpoints", type=int, default=2)
    sys_.add_argument("--log-every", type=int, default=None, help="log every N steps (default: ~100 records per run)")
    sys_.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    sys_.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sys_.add_argument("--overwrite", action="store_true", help="delete the run folder instead of resuming from it")
    sys_.add_argument("--no-progress", action="store_true", help="no progress bar")


# -- data ----------------------------------------------------------------------------------------------------


def read_data(path: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[Path]]:
    """Records of a JSONL file or of a rollout folder's shards, the rollout manifest (or None), the files."""
    from fewstep.distill.rollout import MANIFEST, shard_files
    from fewstep.train.data import read_jsonl

    p = Path(path)
    if p.is_dir():
        files = shard_files(p) or sorted(p.glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"no JSONL shards in {str(p)!r}")
        manifest = json.loads((p / MANIFEST).read_text()) if (p / MANIFEST).is_file() else None
        records = []
        for f in files:
            if f.stat().st_size:
                records.extend(read_jsonl(f))
        if not records:
            raise ValueError(f"the shards in {p} hold no records (did the rollout keep any answer?)")
        return records, manifest, files
    return read_jsonl(p), None, [p]


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def lora_roles(spec: str, architecture: str) -> tuple[str, ...]:
    from fewstep.train.lora import ALL_ROLES, DPARALLEL_LLADA_ROLES, ROLES

    if spec == "all":
        return ALL_ROLES
    if spec == "dparallel":
        return DPARALLEL_LLADA_ROLES if architecture == "llada" else ALL_ROLES
    roles = tuple(r.strip() for r in spec.split(",") if r.strip())
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise ValueError(f"--lora-targets: unknown role(s) {bad}; use all, dparallel or roles from {', '.join(ROLES)}")
    return roles


def build_objective(args: argparse.Namespace, architecture: str, ids, max_length: int, gen_length: int | None = None):
    """The objective of ``--method`` with the flags' hyper-parameters (papers' defaults per architecture)."""
    from fewstep.distill import objective_class
    from fewstep.distill.dparallel import DREAM_DEFAULTS, LLADA_DEFAULTS

    cls = objective_class(args.method)
    per_sequence = args.loss_normalization == "sequence"
    if args.method == "dparallel":
        d = LLADA_DEFAULTS if architecture == "llada" else DREAM_DEFAULTS
        block = d["block_size"] if args.block_size is None else (args.block_size or None)
        return cls(
            ids,
            max_length,
            block_size=block,
            temperature=d["temperature"] if args.temperature is None else args.temperature,
            entropy_weight=d["entropy_weight"] if args.entropy_weight is None else args.entropy_weight,
            mask_ratio=args.mask_ratio,
            reference_masking=args.reference_masking,
            per_sequence=per_sequence,
        )
    if not 0 <= args.lambda_warmup_ratio < 1:
        raise ValueError("--lambda-warmup-ratio must lie in [0, 1)")
    return cls(
        ids,
        max_length,
        temperature=2.0 if args.temperature is None else args.temperature,
        lam=args.lam,
        initial_lambda=args.initial_lambda,
        final_lambda=args.final_lambda,
        lambda_warmup_ratio=args.lambda_warmup_ratio,
        clamp_max=args.clamp_max or None,
        mask_padding=args.mask_padding,
        train_on_pad_id=args.train_on_pad_id,
        per_sequence=per_sequence,
        eos_pad_to=gen_length if args.eos_pad else None,
        teacher_visible=args.teacher_visible,
    )


# -- the command ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    import fewstep
    from fewstep.commands import resolve_model
    from fewstep.models.loading import architecture_of, read_config
    from fewstep.tasks.tokenizer import special_ids
    from fewstep.train import checkpoint as ckpt
    from fewstep.train.data import tokenize_pairs
    from fewstep.train.lora import LoraSpec, target_modules
    from fewstep.train.objective import SpecialIds
    from fewstep.train.presets import count_parameters
    from fewstep.train.trainer import TrainConfig, Trainer

    model_dir, out = resolve_model(args.model), Path(args.out)
    arch = architecture_of(read_config(model_dir))
    recipe = RECIPES[(args.method, arch)]
    finetune = args.finetune or recipe["finetune"]
    records, manifest, files = read_data(args.data)
    tok = fewstep.load_tokenizer(args.tokenizer or model_dir)
    examples = tokenize_pairs(records, tok)
    longest_prompt = max(len(e["prompt_ids"]) for e in examples)
    longest_response = max(len(e["response_ids"]) for e in examples)
    gen_length = args.gen_length or (manifest or {}).get("config", {}).get("gen_length") or longest_response + 1
    max_length = args.max_length or longest_prompt + max(gen_length, longest_response + 1)
    if args.method == "dparallel" and longest_prompt + longest_response + 1 > max_length:
        print(
            f"fewstep distill: warning: the longest prompt+response+EOS ({longest_prompt + longest_response + 1} "
            f"tokens) exceeds --max-length {max_length}; such sequences are truncated",
            file=sys.stderr,
        )

    # cpu=True on a machine without GPU, so that torchrun processes form a gloo group
    cpu = args.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", cpu=cpu)
    main = accelerator.is_main_process
    if args.overwrite and out.exists() and main:
        shutil.rmtree(out)
    accelerator.wait_for_everyone()
    on_gpu = accelerator.device.type != "cpu"
    dtype = args.dtype or ("bfloat16" if on_gpu and finetune == "lora" else "float32")
    model = fewstep.load_model(model_dir, dtype=dtype, device="cpu")
    context = int(getattr(model.config, "max_sequence_length", max_length) or max_length)
    if max_length > context:
        raise ValueError(f"--max-length {max_length} exceeds the model's context ({context})")
    ids = special_ids(tok)
    mask_id = getattr(model.config, "mask_token_id", None)
    eos_id = ids["eos"] if ids["eos"] is not None else getattr(model.config, "eos_token_id", None)
    mask_id = ids["mask"] if ids["mask"] is not None else mask_id
    if mask_id is None or eos_id is None:
        raise ValueError("the tokenizer/config define no mask or EOS token")
    pad_id = ids["pad"] if ids["pad"] is not None else eos_id
    objective = build_objective(
        args, arch, SpecialIds(mask=int(mask_id), eos=int(eos_id), pad=int(pad_id)), max_length, gen_length
    )

    n = len(examples)
    epochs = args.epochs if args.epochs is not None else recipe["epochs"]
    max_steps = args.max_steps or max(1, math.ceil(epochs * n / args.batch_size))
    warmup = args.warmup_steps
    if warmup is None:
        warmup = recipe["warmup"] if recipe["warmup"] >= 1 else round(recipe["warmup"] * max_steps)
    n_params = count_parameters(model)
    lora, n_targets = None, 0
    if finetune == "lora":
        roles = lora_roles(args.lora_targets, arch)
        lora = LoraSpec(r=args.lora_r, alpha=args.lora_alpha or args.lora_r, dropout=args.lora_dropout, roles=roles)
        n_targets = len(target_modules(model, roles))
    elif args.lora_targets != "all":
        raise ValueError("--lora-targets applies to --finetune lora")
    teacher = None
    if objective.needs_teacher and lora is None:
        teacher = frozen_teacher(model_dir, "bfloat16" if args.bf16 else dtype)
    train_cfg = TrainConfig(
        out_dir=str(out),
        max_steps=max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr or recipe["lr"],
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        betas=(0.9, args.adam_beta2),
        warmup_steps=warmup,
        schedule=args.schedule or recipe["schedule"],
        grad_clip=args.grad_clip,
        seed=args.seed,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        save_every=args.save_every or max(1, math.ceil(max_steps / 10)),
        keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every or max(1, max_steps // 100),
        lora=lora,
        progress=not args.no_progress,
        extra={
            "objective": args.method,
            "max_length": max_length,
            "gen_length": gen_length,
            "loss_normalization": args.loss_normalization,
            "objective_hparams": _hparams(objective),
            "data": str(args.data),
            "data_sha256_16": _hash_files(files),
        },
    )
    trainer = Trainer(model, objective, examples, train_cfg, tokenizer=tok, teacher=teacher, accelerator=accelerator)
    found = ckpt.latest_checkpoint(out)
    if found is not None:
        saved = ckpt.read_state(found)["config"]
        keys = ("batch_size", "seed", "lr", "schedule", "warmup_steps", "max_steps", "grad_accum", "lora", "extra")
        now = json.loads(json.dumps(train_cfg.to_dict()))  # tuples -> lists, as stored
        mismatch = [k for k in keys if saved.get(k) != now[k]]
        if mismatch:
            raise ValueError(
                f"{out} holds a run with different settings ({', '.join(mismatch)}); use another --out or --overwrite"
            )
        trainer.resume()
        if main:
            print(f"fewstep distill: resuming {out} from step {trainer.step}")
    if main:
        what = f"LoRA r={lora.r} on {','.join(lora.roles)} ({n_targets} modules)" if lora else "full fine-tuning"
        teacher_note = ""
        if objective.needs_teacher:
            teacher_note = ", teacher = base with adapter disabled" if lora else ", teacher = frozen copy"
        print(
            f"fewstep distill: {args.method} on {arch} ({n_params:,} parameters), {what}"
            f"{teacher_note}; {n:,} examples, max length {max_length}, {max_steps} steps of {args.batch_size} "
            f"on {accelerator.device} x{accelerator.num_processes}"
        )
    summary = trainer.train()
    trainer.export(out)
    if main:
        save_dtype = _save_dtype(args.save_dtype, model_dir)
        if save_dtype is not None:
            from fewstep.commands.pretrain import _cast_weights

            _cast_weights(out, save_dtype)
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
            "gen_length": gen_length,
            "max_length": max_length,
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
        trainer.write_logs()
        print(
            f"fewstep distill: done, {summary['steps']} steps in {summary['seconds']:.0f} s, final loss "
            f"{summary['final_loss']:.4f}; model in {out}" + (f", adapter in {out / 'adapter'}" if lora else "")
        )
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The full ``fewstep distill`` command of a run (every option spelled out, defaults included)."""
    parts = ["fewstep", "distill"]
    for key, value in vars(args).items():
        if key == "command" or value is None or value is False:
            continue
        flag = "--" + {"lam": "lambda"}.get(key, key).replace("_", "-")
        parts += [flag] if value is True else [flag, shlex.quote(str(value))]
    return " ".join(parts)


def frozen_teacher(model_dir: Path, dtype: str):
    """CD4LM's teacher for full fine-tuning: a separate copy of the original checkpoint, frozen, in eval
    mode (with LoRA the trainer uses the base model with its adapter disabled instead: no copy)."""
    import fewstep

    teacher = fewstep.load_model(model_dir, dtype=dtype, device="cpu")
    return teacher.eval().requires_grad_(False)


def _hparams(objective) -> dict[str, Any]:
    keys = [
        "block_size",
        "temperature",
        "entropy_weight",
        "mask_ratio",
        "reference_masking",
        "lam",
        "initial_lambda",
        "final_lambda",
        "lambda_warmup_ratio",
        "clamp_max",
        "mask_padding",
        "train_on_pad_id",
        "per_sequence",
        "eos_pad_to",
        "teacher_visible",
        "max_length",
    ]
    return {k: getattr(objective, k) for k in keys if hasattr(objective, k)}


def _save_dtype(choice: str, model_dir: Path):
    import torch

    if choice == "float32":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    cfg = json.loads((model_dir / "config.json").read_text())
    return torch.bfloat16 if str(cfg.get("torch_dtype", "")).endswith("bfloat16") else None


def write_model_card(folder: Path, info: dict[str, Any]) -> None:
    """README.md of the distilled checkpoint: what it is and exactly how it was made."""
    method = {"dparallel": "dParallel certainty forcing", "cd4lm": "CD4LM consistency distillation (DSCD)"}
    lines = [
        "---",
        "library_name: fewstep",
        f"tags: [diffusion-language-model, distillation, {info['method']}]",
        f"base_model: {info['base_model']}",
        "---",
        "",
        f"# {folder.name}",
        "",
        f"Distilled from `{info['base_model']}` with `fewstep distill` ({method[info['method']]}, "
        f"{'LoRA, merged; the adapter is in adapter/' if info['finetune'] == 'lora' else 'full fine-tuning'}).",
        "Load it with `fewstep.load_model(path)` and `fewstep.load_tokenizer(path)`.",
        "",
        "## Training",
        "",
        "```bash",
        info["command"],
        "```",
        "",
        "| | |",
        "|---|---|",
    ]
    for k, v in info.items():
        if k == "command":
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        lines.append(f"| {k} | {v} |")
    lines += ["", "The loss curve is `loss.png`; per-step logs are in `train_log.jsonl`.", ""]
    (folder / "README.md").write_text("\n".join(lines))
