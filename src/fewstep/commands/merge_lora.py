"""`fewstep merge-lora`: fold a LoRA adapter into its base model and save a plain checkpoint.

The adapter is a ``peft`` folder (``adapter_config.json`` + ``adapter_model.safetensors``), as
``fewstep distill`` writes to OUT/adapter. The result is a drop-in replacement of the base folder: its
config keys (``auto_map`` included), every non-weight file (remote code, generation config, tokenizer,
chat template) copied unchanged, its sharding; ``fewstep.load_model`` loads it without peft. The merge
itself is :func:`fewstep.train.lora.merge_lora`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from fewstep.assets import SHIPPED_HELP

EPILOG = """\
example:
  fewstep merge-lora --base /models/LLaDA-8B-Instruct --adapter runs/dparallel-llada/adapter --out models/dparallel-llada
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument(
        "--base", required=True, metavar="PATH", help=f"base {SHIPPED_HELP} (LLaDA, Dream, LLaDA2-MoE or SDAR)"
    )
    parser.add_argument("--adapter", required=True, metavar="PATH", help="peft LoRA adapter folder")
    parser.add_argument("--out", required=True, metavar="PATH", help="output folder for the merged checkpoint")
    parser.add_argument(
        "--dtype", default=None, help="dtype of the saved weights: float32, bfloat16 (default: the base checkpoint's)"
    )
    parser.add_argument(
        "--max-shard-gb",
        type=float,
        default=None,
        help="split the weights into shards of this size (default: as the base)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def run(args: argparse.Namespace) -> int:
    from fewstep.assets import resolve_model
    from fewstep.models.saving import save_checkpoint
    from fewstep.train.lora import merge_lora

    base, out = resolve_model(args.base), Path(args.out)
    if not base.is_dir():
        raise FileNotFoundError(f"base model folder {str(base)!r} does not exist")
    if out.exists():
        if not args.overwrite:
            raise ValueError(f"{out} exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    merged = merge_lora(base, args.adapter, args.dtype)
    shard = int(args.max_shard_gb * (1 << 30)) if args.max_shard_gb else None
    copied = save_checkpoint(merged, out, base=base, max_shard_bytes=shard)
    print(
        f"fewstep merge-lora: merged {args.adapter} into {base} -> {out}"
        + (f" (with the base's {', '.join(copied)})" if copied else "")
    )
    return 0
