"""`fewstep merge-lora`: fold a LoRA adapter into its base model and save a plain checkpoint.

The adapter is a ``peft`` folder (``adapter_config.json`` + ``adapter_model.safetensors``), as
``fewstep distill`` writes to OUT/adapter, together with the fingerprint of the base it was trained on
(``fewstep_base.json``): an adapter is merged only into that base (shapes are checked for any adapter).
The result is a drop-in replacement of the base folder: its config keys (``auto_map`` included), every
non-weight file (remote code, generation config, tokenizer, chat template) copied unchanged, its
sharding; ``fewstep.load_model`` loads it without peft. The merge itself is
:func:`fewstep.train.lora.merge_lora`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fewstep.assets import SHIPPED_HELP
from fewstep.commands.common import add_output_arguments, add_threads_argument, apply_threads, dtype_name, prepare_out

EPILOG = """\
examples:
  fewstep merge-lora --base teacher --adapter runs/dparallel-lora/adapter --out models/dparallel-lora
  fewstep merge-lora --base /models/LLaDA-8B-Instruct --adapter runs/dparallel-llada/adapter --out models/dparallel-llada
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument(
        "--base", required=True, metavar="PATH", help=f"base {SHIPPED_HELP} (LLaDA, Dream, LLaDA2-MoE or SDAR)"
    )
    parser.add_argument("--adapter", required=True, metavar="PATH", help="peft LoRA adapter folder")
    add_output_arguments(parser, required=True, help="output folder for the merged checkpoint")
    parser.add_argument(
        "--dtype",
        type=dtype_name,
        default=None,
        help="dtype of the saved weights: float32, bfloat16 (default: the base checkpoint's)",
    )
    parser.add_argument(
        "--max-shard-gb",
        type=float,
        default=None,
        help="split the weights into shards of this size (default: as the base)",
    )
    parser.add_argument(
        "--ignore-base-check",
        action="store_true",
        help="merge even when the adapter records another base than --base (its shapes must still fit)",
    )
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from fewstep.assets import resolve_model
    from fewstep.models.saving import save_checkpoint
    from fewstep.train.lora import check_adapter_base, merge_lora

    base, adapter = resolve_model(args.base), Path(args.adapter)
    if not base.is_dir():
        raise FileNotFoundError(f"base model folder {str(base)!r} does not exist")
    if args.max_shard_gb is not None and not args.max_shard_gb > 0:
        raise ValueError(f"--max-shard-gb must be > 0; got {args.max_shard_gb}")
    if not args.ignore_base_check:
        check_adapter_base(adapter, base)
    out = prepare_out(args, "merge-lora", inputs=[base, adapter], on_existing="refuse")
    apply_threads(args)
    merged = merge_lora(base, adapter, args.dtype)
    shard = int(args.max_shard_gb * (1 << 30)) if args.max_shard_gb else None
    copied = save_checkpoint(merged, out, base=base, max_shard_bytes=shard)
    print(
        f"fewstep merge-lora: merged {adapter} into {base} -> {out}"
        + (f" (with the base's {', '.join(copied)})" if copied else "")
    )
    return 0
