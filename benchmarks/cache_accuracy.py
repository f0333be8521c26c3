"""Accuracy of each KV cache mode (none, prefix, dual) on every shipped model (issue 24, item 4).

Fast-dLLM's caches are approximations: ``prefix`` reuses the keys/values before the current block
(refreshed once per block), ``dual`` also those after it, computed while that part of the canvas was
still masked. How much accuracy each costs depends on the model; this measures it on the held-out
problems of the embedded task, for every model shipped in ``fewstep/assets/models`` (the teacher and
its students), with Fast-dLLM's threshold rule and each model's recommended policy (its
``decoding.json``; the teacher: dParallel's entropy rule), optionally the one-token-per-step baseline,
at the task's answer length and block.

One command, rerun whenever the shipped models change (they are retrained by the ``demo`` helper)::

    python benchmarks/cache_accuracy.py                  # all 512 held-out problems, ~10 min on one core
    python benchmarks/cache_accuracy.py --n 32           # a smoke run

Writes ``benchmarks/results/cache_accuracy.json`` (``--out``) and prints a table; docs/decoding.md
("KV caches: what they cost") quotes it. NFE follows the reference samplers (no early stop), as in
``fewstep demo``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "cache_accuracy.json"
CACHES = ("none", "prefix", "dual")
OWN_CACHE = ("multiblock", "multiblock-dream", "spd")  # policies whose cache is their own (no dual mode)


def policies_for(folder: Path, gen_length: int, baseline: bool) -> list[str]:
    """Fast-dLLM's threshold rule and the model's recommended policy (its decoding.json; without one,
    dParallel's entropy rule at the demo's 0.5) when it decodes one block at a time (multi-block and soft
    decoding keep their own caches: no Fast-dLLM dual cache), and with ``baseline`` the one-token-per-step
    baseline."""
    from fewstep.models.saving import read_decoding

    chosen = [f"llada:steps={gen_length}"] if baseline else []
    chosen.append("threshold:0.9")
    recommended = read_decoding(folder).get("policy", "entropy:0.5")
    if recommended not in chosen and recommended.split(":")[0] not in OWN_CACHE:
        chosen.append(recommended)
    return chosen


def measure(n: int, batch_size: int, seed: int, baseline: bool) -> dict:
    """Every (model, policy, cache) on the same ``n`` held-out problems."""
    import torch

    import fewstep
    from fewstep.assets import shipped_models
    from fewstep.eval.embedded import evaluate_policy
    from fewstep.tasks import BLOCK_LENGTH, GEN_LENGTH, NAME, generate_problems

    problems = generate_problems("test", n, seed=seed)
    rows = []
    for name, folder in shipped_models():
        model, tok = fewstep.load_model(folder, dtype="float32"), fewstep.load_tokenizer(folder)
        for policy in policies_for(folder, GEN_LENGTH, baseline):
            base = None
            for cache in CACHES:
                res, _ = evaluate_policy(model, tok, problems, policy, batch_size=batch_size, cache=cache)
                base = res.accuracy if cache == "none" else base
                row = {"model": name, "policy": policy, "cache": cache, **res.to_dict()}
                row["accuracy_change"] = res.accuracy - base
                rows.append(row)
                print(
                    f"{name:<18} {policy:<16} {cache:<7} {100 * res.accuracy:6.1f}% "
                    f"({100 * row['accuracy_change']:+6.1f})  NFE {res.mean_nfe:6.2f}  {res.seconds:6.1f} s",
                    flush=True,
                )
    return {
        "task": NAME,
        "n_problems": n,
        "seed": seed,
        "gen_length": GEN_LENGTH,
        "block_length": BLOCK_LENGTH,
        "early_stop": False,
        "rows": rows,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
    }


def summary(result: dict) -> list[str]:
    """Per model and policy, the accuracy under each cache mode (the table docs/decoding.md shows)."""
    lines = [f"{'model':<18} {'policy':<16} " + " ".join(f"{c:>16}" for c in CACHES)]
    by = {}
    for r in result["rows"]:
        by.setdefault((r["model"], r["policy"]), {})[r["cache"]] = r
    for (model, policy), caches in by.items():
        cells = [f"{100 * caches[c]['accuracy']:5.1f}% ({caches[c]['mean_nfe']:5.2f} NFE)" for c in CACHES]
        lines.append(f"{model:<18} {policy:<16} " + " ".join(f"{x:>16}" for x in cells))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="held-out problems (at most 512)")
    parser.add_argument("--batch-size", type=int, default=128, help="problems decoded together")
    parser.add_argument("--seed", type=int, default=0, help="which held-out problems")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--baseline", action="store_true", help="also the one-token-per-step baseline (64 NFE: ten times longer)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON results file")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    result = measure(args.n, args.batch_size, args.seed, args.baseline)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(summary(result)))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
