"""`fewstep task`: write the embedded task's train/test JSONL and its tokenizer.

Each line is ``{"id", "prompt", "response", "gold"}``; ``response`` is one valid derivation (sampled
among the several the task allows) and ``gold`` the final value. Train and test prompts never
overlap (the split is a hash of the prompt). The tokenizer folder is what `fewstep pretrain
--tokenizer` takes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fewstep.commands.common import add_output_arguments, prepare_out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fewstep.tasks.arith import ArithConfig

    d = ArithConfig()
    parser.epilog = "example:\n  fewstep task --out data/arith --n-train 200000 --n-test 512"
    add_output_arguments(
        parser,
        default="arith-data",
        help="folder for train.jsonl, test.jsonl, tokenizer/, task.json (an existing dataset is replaced only "
        "with --overwrite)",
    )
    parser.add_argument("--n-train", type=_count, default=200_000, help="training examples")
    parser.add_argument("--n-test", type=_count, default=512, help="held-out problems (distinct prompts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--unique-train",
        action="store_true",
        help="each training prompt once (default: prompts may repeat with other derivations)",
    )
    parser.add_argument("--min-leaves", type=int, default=d.min_leaves, help="fewest numbers in an expression")
    parser.add_argument("--max-leaves", type=int, default=d.max_leaves, help="most numbers in an expression")
    parser.add_argument("--max-value", type=int, default=d.max_value, help="largest intermediate value")
    parser.add_argument("--p-swap", type=float, default=d.p_swap, help="probability a '+' step swaps its operands")
    parser.add_argument(
        "--p-shuffle",
        type=float,
        default=d.p_shuffle,
        help="probability a step reduces a random ready sub-expression instead of the leftmost",
    )


def _count(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0; got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from fewstep.models.tokenizer import build_word_tokenizer
    from fewstep.tasks.arith import NAME, ArithConfig, generate_problems

    cfg = ArithConfig(
        min_leaves=args.min_leaves,
        max_leaves=args.max_leaves,
        max_value=args.max_value,
        p_swap=args.p_swap,
        p_shuffle=args.p_shuffle,
    )
    out = Path(prepare_out(args, "task", on_existing="refuse"))
    from tqdm.auto import tqdm

    for split, n in (("test", args.n_test), ("train", args.n_train)):
        problems = generate_problems(split, n, args.seed, cfg, unique=args.unique_train)
        with open(out / f"{split}.jsonl", "w") as fh:
            for p in tqdm(problems, desc=f"write {split}", unit="ex", leave=False):
                fh.write(json.dumps(p.to_json()) + "\n")
        print(f"fewstep task: {len(problems):,} {split} examples -> {out / (split + '.jsonl')}")
    build_word_tokenizer(cfg.vocabulary(), out / "tokenizer")
    meta = {"task": NAME, "seed": args.seed, "n_train": args.n_train, "n_test": args.n_test, "config": cfg.__dict__}
    (out / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"fewstep task: tokenizer -> {out / 'tokenizer'}")
    return 0
