"""Block-diffusion model benchmarks: LLaDA2.0-mini-shaped MoE on this machine (CPU by default).

Written as JSON (default ``benchmarks/results/models_blockdiff.json``):

1. Load memory: a random LLaDA2.0-mini-shaped checkpoint (its real widths: hidden 2048, 16 heads /
   4 kv heads of 128, 256 experts of width 512, top-8 in 4 of 8 groups, 1 shared expert, vocabulary
   157184; only ``--layers`` layers, the first dense) is saved sharded in bf16, then loaded with
   ``fewstep.load_model`` in a fresh process: wall time and peak RSS against the weight bytes.
2. Forward throughput (tokens/s, no grad, bf16) of that model at batch 1 x ``--seq`` tokens,
   block-causal attention with block 32.
3. One MoE layer of those widths: batched (all experts in one padded batched matmul per projection over
   the tokens sorted by expert) against the per-expert Python loop over the same sorted slices.

Usage::

    python benchmarks/models_blockdiff.py               # 3 layers (minutes on 2 CPU cores)
    python benchmarks/models_blockdiff.py --layers 2 --seq 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from fewstep.models.llada2 import LLaDA2Config, LLaDA2Model  # noqa: E402
from fewstep.models.loading import save_model  # noqa: E402

LLADA2_MINI = dict(
    vocab_size=157184,
    hidden_size=2048,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    intermediate_size=5120,
    moe_intermediate_size=512,
    num_experts=256,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    num_shared_experts=1,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    partial_rotary_factor=0.5,
    rope_theta=600000.0,
    rms_norm_eps=1e-6,
    use_qk_norm=True,
    max_position_embeddings=8192,
    mask_token_id=156895,
    eos_token_id=156892,
)

# Peak RSS from VmHWM (per address space, so it starts fresh at exec; ru_maxrss would carry the forked
# parent's resident set over) and the interpreter + torch baseline before loading.
LOAD_CHILD = """
import sys, time, torch
sys.path.insert(0, sys.argv[2])
import fewstep
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) * 1024
base = kib("VmRSS:")
t = time.perf_counter()
m = fewstep.load_model(sys.argv[1], dtype="bfloat16")
dt = time.perf_counter() - t
n = sum(p.numel() * p.element_size() for p in m.state_dict().values())
print(dt, n, kib("VmHWM:"), base)
"""


def build(layers: int, dtype: torch.dtype) -> LLaDA2Model:
    cfg = LLaDA2Config.from_dict({**LLADA2_MINI, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = LLaDA2Model(cfg)
    model.to(dtype).to_empty(device="cpu")
    model.init_weights(seed=0)
    return model.eval().requires_grad_(False)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def bench_moe(model: LLaDA2Model, token_counts: list[int], repeats: int) -> list[dict]:
    """One MoE layer: the batched path against the per-expert loop over the same sorted slices."""
    moe = model.model.layers[-1].mlp
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        moe.to(dtype)
        for tokens in token_counts if dtype == torch.bfloat16 else token_counts[:1]:
            x = torch.randn(1, tokens, LLADA2_MINI["hidden_size"], dtype=dtype)
            times = {}
            with torch.no_grad():
                for batched in (True, False):
                    moe.batched = batched
                    times[batched] = timed(lambda: moe(x), repeats)  # noqa: B023
            moe.batched = True
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "tokens": tokens,
                    "batched_ms": round(times[True] * 1e3, 1),
                    "per_expert_loop_ms": round(times[False] * 1e3, 1),
                    "speedup": round(times[False] / times[True], 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    moe.to(torch.bfloat16)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "models_blockdiff.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}}
    model = build(args.layers, torch.bfloat16)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    result["config"] = {**LLADA2_MINI, "num_hidden_layers": args.layers, "weight_bytes": weight_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp, max_shard_bytes=1 << 30)
        proc = subprocess.run(
            [sys.executable, "-c", LOAD_CHILD, tmp, str(ROOT / "src")], capture_output=True, text=True, check=True
        )
        dt, n, rss, base = (float(v) for v in proc.stdout.split())
        result["load"] = {
            "seconds": round(dt, 2),
            "weight_bytes": int(n),
            "peak_rss_bytes": int(rss),
            "baseline_rss_bytes": int(base),
            "rss_over_weights": round(rss / n, 3),
            "rss_above_baseline_over_weights": round((rss - base) / n, 3),
        }
    print(json.dumps(result["load"]), flush=True)
    ids = torch.randint(0, 150000, (1, args.seq))
    with torch.no_grad():
        sec = timed(lambda: model(ids), args.repeats)
        sec_window = timed(lambda: model(ids, logits_range=(args.seq - 32, args.seq)), args.repeats)
    result["forward_bf16"] = {
        "batch": 1,
        "seq": args.seq,
        "block_length": model.block_length,
        "seconds": round(sec, 3),
        "tokens_per_s": round(args.seq / sec, 1),
        "seconds_lm_head_on_last_block_only": round(sec_window, 3),
    }
    print(json.dumps(result["forward_bf16"]), flush=True)
    result["moe_layer"] = bench_moe(model, [32, args.seq, 4 * args.seq], args.repeats)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
