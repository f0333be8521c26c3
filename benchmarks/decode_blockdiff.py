"""Block-diffusion decoding at 256 new tokens: the exact cache of committed blocks against recomputing.

A small random LLaDA2-MoE and a small random SDAR (4 layers, hidden 256, 32k vocabulary) decode one
64-token prompt with 256 new tokens, block length 32, through ``fewstep.generate``: ``cache="none"``
re-runs the canvas up to the current block every step (LLaDA2's official sampler), ``cache="prefix"``
prefills the complete prompt blocks, runs each denoising forward over the current block only against the
cache and stores every completed block with one more forward (SDAR's official sampler). Random weights
are not confident, so a fixed-step policy (``llada2:steps=8``: 8 forwards per block) makes both modes
run the same number of denoising forwards; tokens must be identical (the cache is exact).

    python benchmarks/decode_blockdiff.py   # writes benchmarks/results/decode_blockdiff.json
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import fewstep  # noqa: E402
from fewstep.models.llada2 import LLaDA2Config, LLaDA2Model  # noqa: E402
from fewstep.models.sdar import SDARConfig, SDARModel  # noqa: E402

COMMON = dict(vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
COMMON |= dict(head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6, mask_token_id=31999, eos_token_id=31998)
LLADA2 = dict(COMMON, intermediate_size=512, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4)
LLADA2 |= dict(n_group=4, topk_group=2, num_shared_experts=1, first_k_dense_replace=1, use_qk_norm=True)
SDAR = dict(COMMON, intermediate_size=768, block_size=32)


def build(name: str):
    if name == "llada2":
        model = LLaDA2Model(LLaDA2Config.from_dict(LLADA2))
    else:
        model = SDARModel(SDARConfig.from_dict(SDAR))
    model.init_weights(seed=0)
    return model.eval().requires_grad_(False)


def run(model, prompt: list[int], cache: str) -> dict:
    kw = dict(gen_length=256, block_length=32, cache=cache)
    fewstep.generate(model, [prompt], "llada2:steps=8", **{**kw, "gen_length": 32})  # warm-up
    t = time.perf_counter()
    out = fewstep.generate(model, [prompt], "llada2:steps=8", **kw)
    dt = time.perf_counter() - t
    return {"seconds": dt, "nfe": int(out.nfe[0]), "tokens_per_second": 256 / dt, "ids": out.sequences[0].tolist()}


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    prompt = torch.randint(0, 31000, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    results = []
    for name in ("llada2", "sdar"):
        model = build(name)
        none, prefix = run(model, prompt, "none"), run(model, prompt, "prefix")
        row = {"model": name, "prompt_length": 64, "gen_length": 256, "block_length": 32, "policy": "llada2:steps=8"}
        row["identical_tokens"] = none.pop("ids") == prefix.pop("ids")
        row |= {"recompute": none, "block_cache": prefix, "speedup": none["seconds"] / prefix["seconds"]}
        print(json.dumps(row))
        results.append(row)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or "cpu"}
    out = ROOT / "benchmarks" / "results" / "decode_blockdiff.json"
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
