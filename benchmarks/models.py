"""Model benchmarks: forward throughput, checkpoint load time and peak memory.

Measured side by side in one run and written as JSON (default ``benchmarks/results/models.json``):

1. Forward throughput (tokens/s, no grad) over a grid of batch size x sequence length for the tiny
   parity fixtures and for a synthetic LLaDA-8B-shaped stack (real widths: d_model 4096, 32 heads, MLP
   12288, vocabulary 126464; only ``--layers`` blocks), in float32 and bfloat16.
2. Loading a synthetic multi-GB sharded bf16 checkpoint with the same widths: wall time and peak RSS
   of a fresh process, as a ratio to the weight bytes (the goal: at most 1.3x; weights never held twice).

Usage::

    python benchmarks/models.py            # full grid (minutes on 2 CPU cores)
    python benchmarks/models.py --quick    # small grid, 1-layer stack
    python benchmarks/models.py --device cuda --layers 4
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

from fewstep.models import LLaDAConfig, LLaDAModel, load_model, save_model  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
LLADA_8B = dict(
    d_model=4096,
    n_heads=32,
    n_kv_heads=32,
    mlp_hidden_size=12288,
    vocab_size=126464,
    embedding_size=126464,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    mask_token_id=126336,
    eos_token_id=126081,
    pad_token_id=126081,
    max_sequence_length=4096,
)


def synthetic_llada(layers: int) -> LLaDAModel:
    cfg = LLaDAConfig.from_dict({**LLADA_8B, "n_layers": layers, "model_type": "llada"})
    with torch.device("meta"):
        model = LLaDAModel(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def time_forward(model, batch: int, seq: int, device: str, repeats: int) -> float:
    """Best-of-``repeats`` seconds of one no-grad forward."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, min(vocab, 1000), (batch, seq), device=device)
    best = float("inf")
    with torch.no_grad():
        model(ids)  # warm-up
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(ids)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    return best


def throughput(args) -> list[dict]:
    rows = []
    models = [
        ("llada-tiny-a", lambda: load_model(FIXTURES / "llada-tiny-a")),
        ("dream-tiny-a", lambda: load_model(FIXTURES / "dream-tiny-a")),
        (f"llada-8b-shape-{args.layers}L", lambda: synthetic_llada(args.layers)),
    ]
    tiny_grid = [(1, 64), (8, 64), (32, 64), (1, 256), (8, 256), (32, 256)]
    big_grid = [(1, 64), (1, 256), (4, 256)] if not args.quick else [(1, 64), (2, 128)]
    if args.quick:
        tiny_grid = [(1, 64), (32, 64), (8, 256)]
    for name, make in models:
        base = make()
        for dtype in (torch.float32, torch.bfloat16):
            model = base.to(device=args.device, dtype=dtype)
            grid = big_grid if "8b" in name else tiny_grid
            for batch, seq in grid:
                sec = time_forward(model, batch, seq, args.device, args.repeats)
                row = dict(
                    model=name,
                    dtype=str(dtype).removeprefix("torch."),
                    batch=batch,
                    seq=seq,
                    seconds=sec,
                    tokens_per_s=batch * seq / sec,
                )
                rows.append(row)
                print(
                    f"{name:22s} {row['dtype']:9s} B={batch:3d} L={seq:4d}  {row['tokens_per_s']:12.0f} tok/s"
                    f"  ({sec * 1e3:.1f} ms)",
                    flush=True,
                )
        del base, model
    return rows


_PROBE = r"""
import json, sys, time
sys.path.insert(0, {src!r})
import torch
from fewstep.models import load_model
torch.set_num_threads(1)
t = time.perf_counter()
if {load}:
    m = load_model({path!r}, device={device!r})
    n = sum(p.numel() * p.element_size() for p in m.parameters())
else:
    n = 0
sec = time.perf_counter() - t
# VmHWM is this process's own peak (ru_maxrss would include the parent's RSS at fork time)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps(dict(seconds=sec, peak_rss=hwm, param_bytes=n)))
"""


def _probe(path: Path, load: bool, device: str) -> dict:
    code = _PROBE.format(src=str(ROOT / "src"), path=str(path), load=load, device=device)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_benchmark(args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "llada-synthetic"
        model = synthetic_llada(args.load_layers).to(torch.bfloat16)
        save_model(model, folder, max_shard_bytes=args.shard_gb << 30)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
        shards = sorted(folder.glob("*.safetensors"))
        print(f"synthetic checkpoint: {len(shards)} shards, {weight_bytes / 2**30:.2f} GiB of bf16 weights", flush=True)
        baseline = _probe(folder, load=False, device=args.device)
        loaded = _probe(folder, load=True, device=args.device)
    res = dict(
        layers=args.load_layers,
        shards=len(shards),
        weight_bytes=weight_bytes,
        seconds=loaded["seconds"],
        peak_rss=loaded["peak_rss"],
        baseline_rss=baseline["peak_rss"],
        peak_rss_over_weights=loaded["peak_rss"] / weight_bytes,
        peak_rss_minus_baseline_over_weights=(loaded["peak_rss"] - baseline["peak_rss"]) / weight_bytes,
        gib_per_s=weight_bytes / 2**30 / loaded["seconds"],
    )
    print(
        f"load: {res['seconds']:.1f} s ({res['gib_per_s']:.2f} GiB/s), peak RSS {res['peak_rss'] / 2**30:.2f} GiB = "
        f"{res['peak_rss_over_weights']:.3f}x the weights ({res['peak_rss_minus_baseline_over_weights']:.3f}x above "
        f"the {res['baseline_rss'] / 2**20:.0f} MiB torch+fewstep baseline)",
        flush=True,
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=2, help="blocks in the 8B-shaped throughput stack")
    ap.add_argument("--load-layers", type=int, default=4, help="blocks in the synthetic checkpoint to load")
    ap.add_argument("--shard-gb", type=int, default=1, help="maximum shard size in GiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="small grid, 1-layer stack, 2-layer checkpoint")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--tmp", default=None, help="where to write the synthetic checkpoint (needs a few GB)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "models.json"))
    args = ap.parse_args()
    if args.quick:
        args.layers, args.load_layers = 1, 2
    torch.set_num_threads(args.threads)
    result = dict(
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor(),
            cpus=os.cpu_count(),
            threads=args.threads,
            torch=torch.__version__,
            device=args.device,
            gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        ),
        throughput=[] if args.skip_throughput else throughput(args),
        load=None if args.skip_load else load_benchmark(args),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
