"""`fewstep merge-lora`: fold a LoRA adapter into its base model and save a plain checkpoint.

The adapter is a ``peft`` folder (``adapter_config.json`` + ``adapter_model.safetensors``), as
``fewstep distill`` writes to OUT/adapter. The result is a Hugging Face folder in the base model's own
layout (config.json, model.safetensors, the base's tokenizer files) that ``fewstep.load_model`` loads
without peft.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

EPILOG = """\
example:
  fewstep merge-lora --base /models/LLaDA-8B-Instruct --adapter runs/dparallel-llada/adapter --out models/dparallel-llada
"""

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--base", required=True, metavar="PATH", help="base checkpoint folder (LLaDA or Dream)")
    parser.add_argument("--adapter", required=True, metavar="PATH", help="peft LoRA adapter folder")
    parser.add_argument("--out", required=True, metavar="PATH", help="output folder for the merged checkpoint")
    parser.add_argument(
        "--dtype", default=None, help="dtype of the saved weights: float32, bfloat16 (default: the base checkpoint's)"
    )
    parser.add_argument("--max-shard-gb", type=float, default=None, help="split the weights into shards of this size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def merge_lora(base: str | Path, adapter: str | Path, dtype=None):
    """The base model with the adapter merged in (a plain fewstep model; float32 merge arithmetic)."""
    import torch
    from peft import PeftModel

    import fewstep
    from fewstep.models.loading import parse_dtype

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter_config.json in {str(adapter)!r} (expected a peft LoRA adapter folder)")
    model = fewstep.load_model(base, dtype="float32")
    target = parse_dtype(dtype) or _checkpoint_dtype(Path(base))
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"the adapter in {adapter} does not fit the base model {base}: {exc}") from None
    merged = peft_model.merge_and_unload()
    merged.requires_grad_(False)
    return merged.to(target) if target != torch.float32 else merged


def _checkpoint_dtype(folder: Path):
    from fewstep.models.loading import checkpoint_dtype, weight_files

    return checkpoint_dtype(folder, weight_files(folder))


def run(args: argparse.Namespace) -> int:
    from fewstep.models.loading import save_model

    base, out = Path(args.base), Path(args.out)
    if not base.is_dir():
        raise FileNotFoundError(f"base model folder {str(base)!r} does not exist")
    if out.exists():
        if not args.overwrite:
            raise ValueError(f"{out} exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    merged = merge_lora(base, args.adapter, args.dtype)
    shard = int(args.max_shard_gb * (1 << 30)) if args.max_shard_gb else None
    save_model(merged, out, max_shard_bytes=shard)
    copied = [f for f in _TOKENIZER_FILES if (base / f).is_file()]
    for f in copied:
        shutil.copy2(base / f, out / f)
    print(
        f"fewstep merge-lora: merged {args.adapter} into {base} -> {out}"
        + (" (with the base's tokenizer)" if copied else "")
    )
    return 0
