"""What exact ragged batching costs: padded rows attending apart (``RaggedMask``) against one masked call.

A batch of rows of different lengths runs one padded forward. The models give each row layout its own
attention call over exactly its real keys (bit-identical to the row alone, :mod:`fewstep.models.base`);
the old way was one SDPA call over the padded keys with a padding mask (not batch-invariant: its
rounding follows the padding). On the shipped student, CPU clock of this process, one thread:

* ``forward``: one full forward of ``B`` ragged rows (lengths ``--lengths``), ms per row, ragged
  attention against the masked call (the same shapes, the same work elsewhere), in bf16 and fp32, and
  how many rows' logits differ from the row alone under each;
* ``engine``: the matched-compute decoding (``llada:steps=64``, 64 tokens, blocks of 32) of ragged
  prompts through the engine at ``max_batch`` 32, CPU seconds per request, ragged against masked.

    taskset -c 0 python benchmarks/ragged.py     # writes benchmarks/results/ragged.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import fewstep  # noqa: E402
from fewstep.decoding.engine import Engine, Request  # noqa: E402
from fewstep.decoding.forward import Seqs, full_forward  # noqa: E402
from fewstep.models import base  # noqa: E402


@contextlib.contextmanager
def masked_attention():
    """The old path: every layer attends with the padding mask in one call (the ragged rows ignored)."""
    prop = base.AttentionInputs.attention_mask
    base.AttentionInputs.attention_mask = property(lambda self: self.mask)
    try:
        yield
    finally:
        base.AttentionInputs.attention_mask = prop


def prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 30) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@torch.no_grad()
def forward_row(model, batch: int, lo: int, hi: int, reps: int) -> dict:
    mask = int(model.config.mask_token_id)
    seqs = [Seqs(torch.tensor(p + [mask] * 64)[None], None, len(p), len(p) + 32) for p in prompts(batch, lo, hi)]
    alone = [full_forward(model, [s], 0, False)[0][0] for s in seqs]
    modes = (("ragged", contextlib.nullcontext), ("masked", masked_attention))
    times: dict[str, list[float]] = {name: [] for name, _ in modes}
    differ = {}
    for name, mode in modes:
        with mode():
            together = full_forward(model, seqs, 0, False)[0]
        differ[name] = sum(not torch.equal(a, b) for a, b in zip(alone, together))
    for _ in range(reps):  # interleaved: a busy machine's drift hits both alike
        for name, mode in modes:
            with mode():
                t = time.process_time()
                full_forward(model, seqs, 0, False)
                times[name].append((time.process_time() - t) / batch * 1e3)
    out = {}
    for name, v in times.items():
        out[name] = {"ms_per_row": round(statistics.median(v), 3), "ms_per_row_min": round(min(v), 3),
                     "rows_differ_from_alone": differ[name]}  # fmt: skip
    out["ragged_cost"] = round(out["ragged"]["ms_per_row"] / out["masked"]["ms_per_row"], 3)
    return out


def engine_row(model, n: int, lo: int, hi: int, reps: int) -> dict:
    ps = prompts(n, lo, hi, seed=1)
    reqs = lambda: [Request(p, policy="llada:steps=64", gen_length=64, block_length=32, early_stop=False) for p in ps]  # noqa: E731
    out = {}
    runs: dict[str, list[float]] = {"ragged": [], "masked": []}
    for _ in range(reps):  # interleaved: a busy machine's drift hits both alike
        for name, mode in (("ragged", contextlib.nullcontext), ("masked", masked_attention)):
            with mode():
                t = time.process_time()
                Engine(model, max_batch=32, max_padding=float("inf")).run(reqs())
                runs[name].append((time.process_time() - t) / n)
    for name, v in runs.items():
        out[name] = {"cpu_s_per_request": round(statistics.median(v), 4), "runs": [round(x, 4) for x in v]}
    out["ragged_cost"] = round(out["ragged"]["cpu_s_per_request"] / out["masked"]["cpu_s_per_request"], 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8,40", help="prompt lengths lo,hi (uniform; every row a different layout)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ragged.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lo, hi = (int(x) for x in args.lengths.split(","))
    from fewstep.assets import resolve_model

    load0 = os.getloadavg()[0]
    result = {"host": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1,
                       "cpu_count": os.cpu_count()},
              "prompt_lengths": [lo, hi], "answer": "64 tokens, first block of 32", "forward": [], "engine": []}  # fmt: skip
    for dtype in ("bfloat16", "float32"):
        model = fewstep.load_model(resolve_model("dparallel"), dtype=dtype)
        for b in (8, 32):
            row = {"dtype": dtype, "batch": b, **forward_row(model, b, lo, hi, args.reps)}
            result["forward"].append(row)
            print(json.dumps(row), flush=True)
        row = {"dtype": dtype, "requests": 32, **engine_row(model, 32, lo, hi, max(2, args.reps // 3))}
        result["engine"].append(row)
        print(json.dumps(row), flush=True)
    result["load_average_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
