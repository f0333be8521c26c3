"""The GPU check (issue 26): every claim of fewstep that depends on the hardware, measured in one short run.

Two random models in bf16 with real widths: an **8B-shaped LLaDA** (LLaDA-8B-Instruct's widths, heads,
vocabulary, RoPE and special ids; ``--layers`` of its 32 layers) and a **LLaDA2.0-mini-shaped MoE**
(``--moe-layers`` of its 20, the first dense). Sections (every JSON field: ``docs/gpu.md``):

* ``invariance``: every policy x cache mode (the multi-block and soft policies too, once the registry
  knows them), 32 ragged prompts decoded alone and together, greedy: rows whose tokens or NFE differ, the
  largest logit difference at the first forward, per-kernel probes (each op alone and in a batch) and,
  when rows differ, a diagnosis: the same decode under candidate fixes and what each costs;
* ``speed``: forward time, tokens/s and the engine's own time per round at batch 1/8/32/128 for 256 new
  tokens (fixed steps and a threshold rule, each cache mode); the SDPA backend used with and without
  padding; ``torch.compile`` of the model forward on and off;
* ``peer``: the official Fast-dLLM LLaDA code (``--peer-dir``, brought separately) on the same weights and
  prompts at batch 1: token ids compared, time ratio;
* ``memory``: peak allocated memory per batch size and cache mode; LoRA and full training steps of the
  dParallel objective (``fewstep distill``'s trainer) on the 8B-shaped stack: time and peak memory;
* ``serving``: ``benchmarks/serve.py`` at 1, 8 and 32 concurrent clients on the 8B-shaped model.

The JSON (``benchmarks/results/gpu.json``) is rewritten after every section, and a run skips the sections
it already holds as done (``--force`` reruns them): a killed run loses only the section it was in.

    python benchmarks/gpu.py                       # the full check (at most 8 minutes on one H100)
    python benchmarks/gpu.py --smoke               # every section on tiny sizes, on the CPU (< 1 minute)
    python benchmarks/gpu.py --peer-dir .peer/Fast-dLLM       # with the official Fast-dLLM checkout
    python benchmarks/gpu.py --sections speed --force         # one section again
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import inspect
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode import BASELINE, ForwardTimer, print_table, sync  # noqa: E402
from decode import POLICIES as DECODE_POLICIES  # noqa: E402
from models import LLADA_8B  # noqa: E402
from models_blockdiff import LLADA2_MINI  # noqa: E402

from fewstep.decoding.engine import Engine, Quirks, Request, RequestError  # noqa: E402
from fewstep.decoding.forward import BlockRun, Seqs, block_forward, full_forward  # noqa: E402
from fewstep.decoding.policies import POLICIES, parse_policy  # noqa: E402
from fewstep.models import KVCache, LLaDA2Config, LLaDA2Model, LLaDAConfig, LLaDAModel  # noqa: E402
from fewstep.models.base import key_padding_mask  # noqa: E402
from fewstep.models.layers import RMSNorm  # noqa: E402

SECTIONS = ("invariance", "speed", "peer", "memory", "serving")
#: Policies that land later (multi-block decoding, soft parallel decoding), tried by the names they may
#: get: the ones the registry knows are checked, the others are listed under ``policies_unknown``.
FUTURE_POLICIES = ("multiblock", "multi-block", "d3llm", "spd", "soft", "dmax")
CACHES = {"llada": ("none", "prefix", "dual"), "moe": ("none", "prefix")}  # dual == prefix on block models
ENGINE_MAX_PADDING = inspect.signature(Engine.__init__).parameters["max_padding"].default
SCHEMA = 1


@dataclass(frozen=True)
class Sizes:
    """Every size of a run: the full check's defaults (the smoke run's are :data:`SMOKE`)."""

    layers: int = 4  # of LLaDA-8B's 32
    moe_layers: int = 3  # of LLaDA2.0-mini's 20 (the first dense)
    prompts: int = 32  # invariance: ragged prompts decoded alone and together
    prompt_lengths: tuple[int, int] = (16, 96)
    token_range: tuple[int, int] = (100, 30000)  # prompt token ids (no special id)
    inv_gen: int = 16  # two blocks: every cache mode rebuilds its cache once
    inv_block: int = 8
    fixed_rows: int = 256  # the fixed-shapes fix: rows per matrix product / reduction
    speed_batches: tuple[int, ...] = (1, 8, 32, 128)
    speed_gen: int = 256
    speed_block: int = 32
    speed_steps: int = 32  # the fixed-steps policy: llada:steps=32 (4 per block, 8 tokens per forward)
    threshold_max_nfe: int = 64  # random weights commit one token per forward under threshold rules
    compile_batch: int = 32
    peer_prompts: int = 4
    memory_max_nfe: int = 3  # the peak is reached in a block's first forwards
    train_batch: int = 4
    train_length: int = 384  # dParallel's sequence length
    train_steps: int = 3
    lora_r: int = 128  # dParallel's LLaDA recipe: r = alpha = 128 on q, k, v, up
    serve_clients: tuple[int, ...] = (1, 8, 32)
    budgets: tuple[tuple[str, float], ...] = (  # seconds; soft: the work in flight finishes
        ("invariance", 140),
        ("speed", 130),
        ("peer", 75),
        ("memory", 50),
        ("serving", 100),
    )
    llada: tuple[tuple[str, object], ...] = ()  # config overrides (the smoke run's tiny widths)
    moe: tuple[tuple[str, object], ...] = ()


SMOKE = Sizes(
    layers=1,
    moe_layers=2,
    prompts=4,
    prompt_lengths=(3, 10),
    token_range=(10, 900),
    inv_gen=4,
    inv_block=2,
    fixed_rows=16,
    speed_batches=(1, 4),
    speed_gen=8,
    speed_block=4,
    speed_steps=4,
    threshold_max_nfe=4,
    compile_batch=4,
    peer_prompts=2,
    memory_max_nfe=2,
    train_batch=2,
    train_length=24,
    train_steps=2,
    lora_r=4,
    serve_clients=(1, 4),
    budgets=tuple((s, 600.0) for s in SECTIONS),
    llada=(("d_model", 64), ("n_heads", 4), ("n_kv_heads", 4), ("mlp_hidden_size", 128), ("vocab_size", 1024),
           ("embedding_size", 1024), ("mask_token_id", 1020), ("eos_token_id", 1018), ("pad_token_id", 1018)),
    moe=(("vocab_size", 1024), ("hidden_size", 64), ("num_attention_heads", 4), ("num_key_value_heads", 2),
         ("head_dim", 16), ("intermediate_size", 128), ("moe_intermediate_size", 32), ("num_experts", 8),
         ("num_experts_per_tok", 2), ("n_group", 2), ("topk_group", 1), ("mask_token_id", 1020),
         ("eos_token_id", 1018), ("block_length", 4)),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# models, prompts, run context
# ---------------------------------------------------------------------------------------------------


def init_random(model: torch.nn.Module, seed: int) -> None:
    """Random weights drawn on the model's own device (an 8B-shaped init on a CPU takes minutes): unit
    RMSNorm gains, zero biases and buffers, N(0, 0.02) matrices."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in norms:
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
        for b in model.buffers():
            b.zero_()


def build_model(kind: str, layers: int, sizes: Sizes, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The 8B-shaped LLaDA (``"llada"``) or the LLaDA2.0-mini-shaped MoE (``"moe"``) with ``layers`` layers."""
    if kind == "llada":
        cfg = LLaDAConfig.from_dict({**LLADA_8B, **dict(sizes.llada), "n_layers": layers, "model_type": "llada"})
        cls = LLaDAModel
    else:
        cfg = LLaDA2Config.from_dict({**LLADA2_MINI, **dict(sizes.moe), "num_hidden_layers": layers})
        cls = LLaDA2Model
    with torch.device("meta"):
        model = cls(cfg)
    model.to(dtype).to_empty(device=device)
    init_random(model, seed)
    return model.eval().requires_grad_(False)


def describe(kind: str, model) -> dict:
    """What the JSON says of a model: its shape, how many of the real model's layers it has, its size."""
    c = model.config
    if kind == "llada":
        name, of, hidden, heads, vocab = "LLaDA-8B-shaped", 32, c.d_model, c.n_heads, c.vocab_size
        shape = {"mlp": c.mlp_hidden_size, "rope_theta": c.rope_theta}
    else:
        name, of, hidden, heads, vocab = (
            "LLaDA2.0-mini-shaped MoE",
            20,
            c.hidden_size,
            c.num_attention_heads,
            c.vocab_size,
        )
        shape = {"experts": c.num_experts, "experts_per_token": c.num_experts_per_tok,
                 "expert_mlp": c.moe_intermediate_size, "block_length": int(model.block_length)}  # fmt: skip
    layers = sum(1 for _ in model.stack()[1])
    return {
        "name": name,
        "layers": layers,
        "of_layers": of,
        "hidden": hidden,
        "heads": heads,
        "kv_heads": c.kv_heads,
        "vocab": vocab,
        **shape,
        "params": sum(p.numel() for p in model.parameters()),
        "weights_bytes": n_bytes(model),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def make_prompts(n: int, sizes: Sizes, seed: int = 0) -> list[list[int]]:
    """``n`` ragged prompts: lengths uniform in ``prompt_lengths``, ids uniform in ``token_range``."""
    rng = random.Random(seed)
    lo, hi = sizes.token_range
    return [[rng.randrange(lo, hi) for _ in range(rng.randint(*sizes.prompt_lengths))] for _ in range(n)]


def n_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Budget:
    """A section's soft time limit: loops stop starting new work once it is spent (and say so)."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def over(self, need: float = 0.0) -> bool:
        return time.monotonic() + need > self.end


@dataclass
class Ctx:
    """What every section gets: settings, device, the JSON being written and the models (built once)."""

    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    dtype: torch.dtype
    out: Path
    result: dict
    deadline: float = float("inf")  # time.monotonic() at which the whole run stops starting sections
    models: dict = field(default_factory=dict)

    @property
    def smoke(self) -> bool:
        return bool(self.args.smoke)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def model(self, kind: str):
        if kind not in self.models:
            layers = self.sizes.layers if kind == "llada" else self.sizes.moe_layers
            self.models[kind] = build_model(kind, layers, self.sizes, self.device, self.dtype)
            self.result.setdefault("models", {})[kind] = describe(kind, self.models[kind])
        return self.models[kind]

    def prompts(self, n: int) -> list[list[int]]:
        return make_prompts(max(n, self.sizes.prompts, *self.sizes.speed_batches), self.sizes)[:n]

    def budget(self, section: str) -> Budget:
        left = self.deadline - time.monotonic()
        return Budget(max(0.0, min(dict(self.sizes.budgets)[section] * self.args.budget_scale, left)))

    def geometry(self, kind: str, gen: int, block: int) -> tuple[int, int]:
        """(gen_length, block_length): a block model decodes in the blocks of its attention."""
        return (gen, int(self.model(kind).block_length)) if kind == "moe" else (gen, block)

    def peak_reset(self) -> int | None:
        """Start a peak measurement; returns the bytes allocated now (None on a CPU)."""
        if not self.cuda:
            return None
        sync(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return int(torch.cuda.memory_allocated(self.device))

    def peak(self) -> int | None:
        """Peak allocated bytes since :meth:`peak_reset` (a CUDA statistic: None on a CPU)."""
        return int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else None


def line(row: dict, cols: list[str]) -> None:
    """One result as a single ``key value`` line (progress while a section runs)."""

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    print("  " + "  ".join(f"{c} {fmt(row.get(c))}" for c in cols), flush=True)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def forward_timer(model):
    """``decode.ForwardTimer`` on ``model`` for the duration of the block (its ``forward`` restored after)."""
    own = vars(model).get("forward")
    timer = ForwardTimer(model)
    try:
        yield timer
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def timed(device, fn: Callable[[], object]) -> tuple[object, float]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def best_ms(device, fn: Callable[[], object], reps: int = 5) -> float:
    """Best of ``reps`` timed calls after one warm-up, in milliseconds."""
    fn()
    return 1000 * min(timed(device, fn)[1] for _ in range(reps))


# ---------------------------------------------------------------------------------------------------
# section: batch invariance
# ---------------------------------------------------------------------------------------------------


def policy_specs(kind: str, gen: int) -> tuple[list[str], list[str]]:
    """(specs the registry knows, future names it does not know yet) for a model kind.

    LLaDA: the decode benchmark's policies, the one-token-per-step baseline, every other registered
    policy by its name (so a policy that lands is checked at once) and the future names; the MoE:
    LLaDA2's own rule, the Fast-dLLM threshold and the future names."""
    if kind == "moe":
        base = ["llada2", "threshold:0.9"]
    else:
        base = [BASELINE] + [p.format(half=gen // 2) for p in DECODE_POLICIES]
    known, unknown = [], []
    for spec in [*base, *FUTURE_POLICIES]:
        try:
            parse_policy(spec)
            known.append(spec)
        except ValueError:
            unknown.append(spec)
    if kind == "llada":
        covered = {parse_policy(s).name for s in known}
        known += [name for name in POLICIES if name not in covered]
    return list(dict.fromkeys(known)), unknown


def requests(prompts, spec, cache, gen, block, **kw) -> list[Request]:
    """One engine request per prompt (ids 0..n-1, seeded per row, so even a sampling policy is row-local)."""
    return [
        Request(p, policy=spec, gen_length=gen, block_length=block, cache=cache, seed=i, id=i, **kw)
        for i, p in enumerate(prompts)
    ]


def decode_pair(model, prompts, spec, cache, gen, block, *, max_padding=None, mode=None):
    """The prompts decoded alone (an engine of one row) and together (one engine of them all):
    ``(alone, together, seconds alone, seconds together)``; ``mode``: a context for both."""
    kw = {} if max_padding is None else {"max_padding": max_padding}
    reqs = functools.partial(requests, prompts, spec, cache, gen, block)  # fresh ones per engine: it sets their ids
    with mode() if mode else contextlib.nullcontext():
        alone, t_alone = timed(model.device, lambda: Engine(model, max_batch=1).run(reqs()))
        together, t_together = timed(model.device, lambda: Engine(model, max_batch=len(prompts), **kw).run(reqs()))
    return alone, together, t_alone, t_together


def compare(alone, together) -> dict:
    tokens = [i for i, (a, b) in enumerate(zip(alone, together)) if a.answer != b.answer]
    nfe = [i for i, (a, b) in enumerate(zip(alone, together)) if a.nfe != b.nfe]
    return {
        "rows_differ_tokens": len(tokens),
        "rows_differ_nfe": len(nfe),
        "differing_rows": sorted(set(tokens) | set(nfe)),
    }


def invariance_row(model, prompts, spec, cache, gen, block) -> dict:
    alone, together, t_alone, t_together = decode_pair(model, prompts, spec, cache, gen, block)
    return {
        "policy": spec,
        "cache": cache,
        "rows": len(prompts),
        **compare(alone, together),
        "nfe_mean": sum(r.nfe for r in alone) / len(alone),
        "seconds_alone": t_alone,
        "seconds_together": t_together,
    }


def first_block(prompt: list[int], gen: int, block: int, mask: int, device) -> Seqs:
    """A prompt's canvas at its first block: what the engine's first (full) forward of it runs."""
    return Seqs(torch.tensor(prompt + [mask] * gen, device=device)[None], None, len(prompt), len(prompt) + block)


@torch.no_grad()
def first_forward_diff(model, prompts, gen: int, block: int) -> dict:
    """The engine's first forward of every prompt, all in one padded call and each alone: the largest
    absolute logit difference and how many block positions change their argmax."""
    pad, mask = Engine(model).pad_id, int(model.config.mask_token_id)
    dev = model.device
    if getattr(model, "block_diffusion", False):  # canvas up to the prompt tail's block, no cache

        def run(p):
            n = -(-(len(p) + gen) // block) * block
            s = len(p) // block * block
            x = torch.tensor(p + [mask] * (n - len(p)), device=dev)[None, : s + block]
            return BlockRun(x, None, 0, block, (s, s + block), False)

        items = [run(p) for p in prompts]
        together = block_forward(model, items, pad)[0]
        alone = [block_forward(model, [it], pad)[0][0] for it in items]
    else:
        items = [first_block(p, gen, block, mask, dev) for p in prompts]
        together = full_forward(model, items, pad, False)[0]
        alone = [full_forward(model, [it], pad, False)[0][0] for it in items]
    diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(alone, together)]
    flips = sum(int((a.argmax(-1) != b.argmax(-1)).sum()) for a, b in zip(alone, together))
    return {
        "max_abs_logit_diff": max(diffs),
        "rows_with_logit_diff": sum(d > 0 for d in diffs),
        "argmax_mismatches": flips,
        "positions": sum(int(a.shape[-2]) for a in alone),
        "logits_dtype": str(together[0].dtype).removeprefix("torch."),
    }


def section_invariance(ctx: Ctx) -> dict:
    s, budget = ctx.sizes, ctx.budget("invariance")
    prompts = ctx.prompts(s.prompts)
    out = {"prompts": len(prompts), "prompt_lengths": [min(map(len, prompts)), max(map(len, prompts))],
           "gen_length": s.inv_gen, "block_length": {}, "max_padding": ENGINE_MAX_PADDING, "first_forward": [],
           "rows": [], "skipped": [], "policies_unknown": []}  # fmt: skip
    for kind in ("llada", "moe"):
        model = ctx.model(kind)
        gen, block = ctx.geometry(kind, s.inv_gen, s.inv_block)
        out["block_length"][kind] = block
        out["first_forward"].append({"model": kind, **first_forward_diff(model, prompts, gen, block)})
        specs, unknown = policy_specs(kind, gen)
        out["policies_unknown"] = sorted(set(out["policies_unknown"]) | set(unknown))
        for spec in specs:
            for cache in CACHES[kind]:
                where = {"model": kind, "policy": spec, "cache": cache}
                if budget.over():
                    out["skipped"].append({**where, "reason": f"time budget ({budget.seconds:.0f} s) spent"})
                    continue
                try:
                    out["rows"].append({"model": kind, **invariance_row(model, prompts, spec, cache, gen, block)})
                except (RequestError, RuntimeError) as exc:
                    out["skipped"].append({**where, "reason": f"{type(exc).__name__}: {exc}"})
                else:
                    line(out["rows"][-1], ["model", "policy", "cache", "rows_differ_tokens", "rows_differ_nfe"])
    differ = [r for r in out["rows"] if r["differing_rows"]]
    out["rows_checked"] = len(out["rows"])
    out["rows_differing_runs"] = len(differ)
    out["invariant"] = not differ
    out["logits_invariant"] = all(f["max_abs_logit_diff"] == 0 for f in out["first_forward"])
    out["probes"] = op_probes(ctx)
    want = ctx.args.diagnose == "always" or (ctx.args.diagnose == "auto" and (differ or not out["logits_invariant"]))
    out["diagnosis"] = diagnose(ctx, (differ or out["rows"])[0], prompts, out["probes"], budget) if want else None
    n = sum(r["rows"] for r in out["rows"])
    out["headline"] = (
        f"{sum(len(r['differing_rows']) for r in out['rows'])} of {n} decoded rows differ alone vs together "
        f"({len(differ)} of {len(out['rows'])} policy x cache runs); first-forward max |logit diff| "
        + ", ".join(f"{f['model']} {f['max_abs_logit_diff']:.3g}" for f in out["first_forward"])
    )
    return out


# -- kernel probes and the diagnosis -------------------------------------------------------------------


def sdpa_backends() -> dict:
    """The SDPA backends this torch knows (name -> ``SDPBackend``)."""
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def row_diff(fn: Callable, x: torch.Tensor) -> float:
    """Largest absolute difference between ``fn(x)[i]`` and ``fn(x[i:i+1])`` over the rows ``i``."""
    full = fn(x)
    return max(float((fn(x[i : i + 1]).float() - full[i : i + 1].float()).abs().max()) for i in range(x.shape[0]))


def sdpa_diffs(qkv: torch.Tensor, lengths: list[int]) -> dict:
    """Per SDPA backend: row-alone vs batch difference without padding and with left padding (None:
    the backend refuses these inputs). ``qkv`` ``[B, 3, H, T, D]``; row ``i``'s real columns are its last
    ``lengths[i]``."""
    from torch.nn.attention import sdpa_kernel

    B, T = qkv.shape[0], qkv.shape[3]
    am = torch.zeros(B, T, dtype=torch.long, device=qkv.device)
    for i, n in enumerate(lengths):
        am[i, T - n :] = 1
    mask = key_padding_mask(am, T)
    out = {}
    for name, backend in sdpa_backends().items():
        try:
            with sdpa_kernel(backend):
                out[f"sdpa_{name}"] = row_diff(lambda t: F.scaled_dot_product_attention(*t.unbind(1)), qkv)
        except RuntimeError:
            out[f"sdpa_{name}"] = None
        try:
            with sdpa_kernel(backend):
                full = F.scaled_dot_product_attention(*qkv.unbind(1), attn_mask=mask)
                d = 0.0
                for i, n in enumerate(lengths):  # alone: the row's own columns, no mask
                    alone = F.scaled_dot_product_attention(*qkv[i : i + 1, :, :, T - n :].unbind(1))
                    d = max(d, float((alone.float() - full[i : i + 1, :, T - n :].float()).abs().max()))
                out[f"sdpa_{name}_padded"] = d
        except RuntimeError:
            out[f"sdpa_{name}_padded"] = None
    return out


@torch.no_grad()
def op_probes(ctx: Ctx) -> dict:
    """Each kernel of a forward on one batch of random activations, every row alone and in the batch:
    the largest absolute difference (0: batch-invariant here; None: the kernel refused the inputs)."""
    s, model = ctx.sizes, ctx.model("llada")
    cfg = model.config
    B, T, L = s.prompts, s.prompt_lengths[1] + s.inv_gen, s.inv_block
    g = torch.Generator(device=ctx.device).manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=ctx.device, dtype=ctx.dtype)

    embed, layers, norm, head = model.stack()
    blk = layers[0]
    x = randn(B, T, cfg.d_model)
    W = (head if head is not None else embed).weight
    probes = {
        "linear_q_proj": row_diff(blk.q_proj, x),
        "linear_mlp_up": row_diff(blk.up_proj, x),
        "linear_mlp_down": row_diff(blk.ff_out, randn(B, T, cfg.mlp_hidden_size)),
        "lm_head": row_diff(lambda t: F.linear(t, W), x[:, :L]),
        "rms_norm": row_diff(norm, x),
        "softmax_float64_vocab": row_diff(lambda t: torch.softmax(t.double(), -1), F.linear(x[:, :L], W).float()),
    }
    lengths = [len(p) + s.inv_gen for p in ctx.prompts(B)]
    probes.update(sdpa_diffs(randn(B, 3, cfg.n_heads, max(lengths), cfg.head_dim), lengths))
    moe = ctx.model("moe")
    mlp = moe.model.layers[-1].mlp
    probes["moe_layer"] = row_diff(mlp, randn(B, T, moe.config.hidden_size))
    return {"batch": B, "tokens": T, "dtype": str(ctx.dtype).removeprefix("torch."), "max_abs_diff": probes}


class FixedShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Every matrix product and every last-dimension reduction run on fixed-size chunks of rows (zero
    padded): each row is then computed by a kernel of one shape whatever shares its batch, so the
    per-row result cannot depend on the batch. A diagnostic fix: it measures what invariance costs."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows, aten = rows, torch.ops.aten
        reductions = [
            "mean.dim",
            "sum.dim_IntList",
            "_softmax.default",
            "_log_softmax.default",
            "_safe_softmax.default",
        ]
        self.handlers = {aten.mm.default: self._mm, aten.addmm.default: self._addmm, aten.bmm.default: self._bmm}
        for name in reductions:
            op, overload = name.split(".")
            if hasattr(aten, op):
                self.handlers[getattr(getattr(aten, op), overload)] = self._last_dim

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = self.handlers.get(func)
        return handler(func, args, kwargs) if handler else func(*args, **kwargs)

    def _chunks(self, x: torch.Tensor, fn: Callable, dim: int = 0) -> torch.Tensor:
        n, pad = x.shape[dim], -x.shape[dim] % self.rows
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim)
        return torch.cat([fn(c) for c in x.split(self.rows, dim)], dim).narrow(dim, 0, n)

    def _mm(self, func, args, kwargs):
        a, b = args
        return self._chunks(a, lambda c: func(c, b, **kwargs))

    def _addmm(self, func, args, kwargs):
        bias, a, b = args[:3]
        if bias.dim() == 2 and bias.shape[0] == a.shape[0] and a.shape[0] > 1:
            out = self._chunks(a, lambda c: func(torch.zeros_like(bias[: c.shape[0]]), c, b, *args[3:], **kwargs))
            return out + kwargs.get("beta", 1) * bias
        return self._chunks(a, lambda c: func(bias, c, b, *args[3:], **kwargs))

    def _bmm(self, func, args, kwargs):
        a, b = args  # [n, M, K] @ [n, K, N]: fixed groups of matrices and fixed row chunks
        groups = [self._chunks(a[i : i + self.rows], lambda c, i=i: func(c, b[i : i + c.shape[0]]), dim=1)
                  for i in range(0, a.shape[0], self.rows)]  # fmt: skip
        return torch.cat(groups)

    def _last_dim(self, func, args, kwargs):
        x, dim, rest = args[0], args[1], args[2:]
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        if x.dim() < 2 or len(dims) != 1 or dims[0] not in (-1, x.dim() - 1):
            return func(*args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])
        last = [-1] if isinstance(dim, (list, tuple)) else -1
        out = self._chunks(flat, lambda c: func(c, last, *rest, **kwargs))
        return out.reshape(*x.shape[:-1], *out.shape[1:])


@contextlib.contextmanager
def full_precision_reduction():
    """cuBLAS bf16 products without reduced-precision split-K reductions."""
    m = torch.backends.cuda.matmul
    old = m.allow_bf16_reduced_precision_reduction
    m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction = old


def fixes(rows: int) -> dict[str, dict]:
    """Candidate fixes: a context for the decode and the engine's ``max_padding``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def everything():
        stack = contextlib.ExitStack()
        for cm in (sdpa_kernel(SDPBackend.MATH), full_precision_reduction(), FixedShapes(rows)):
            stack.enter_context(cm)
        return stack

    return {
        "math_sdpa": {"mode": lambda: sdpa_kernel(SDPBackend.MATH)},
        "full_precision_reduction": {"mode": full_precision_reduction},
        "no_padding": {"max_padding": 0.0},
        "fixed_shapes": {"mode": lambda: FixedShapes(rows)},
        "all": {"mode": everything, "max_padding": 0.0},
    }


def diagnose(ctx: Ctx, row: dict, prompts, probes: dict, budget: Budget) -> dict:
    """Run-to-run determinism of the batched decode and, for each candidate fix, the rows that still
    differ and what the fix costs (batched decode time over the default's), on one policy x cache run."""
    model = ctx.model(row["model"])
    gen, block = ctx.geometry(row["model"], ctx.sizes.inv_gen, ctx.sizes.inv_block)
    args = (model, prompts, row["policy"], row["cache"], gen, block)
    base = decode_pair(*args)
    again = Engine(model, max_batch=len(prompts)).run(requests(*args[1:]))
    out = {"model": row["model"], "policy": row["policy"], "cache": row["cache"], **compare(base[0], base[1]),
           "rerun_rows_differ": len(compare(base[1], again)["differing_rows"]), "fixes": []}  # fmt: skip
    for name, fix in fixes(ctx.sizes.fixed_rows).items():
        if budget.over(-60):  # the diagnosis may overrun the section's budget by a minute, no more
            out["fixes"].append({"fix": name, "skipped": "time budget"})
            continue
        alone, together, t_alone, t_together = decode_pair(*args, **fix)
        out["fixes"].append(
            {
                "fix": name,
                **compare(alone, together),
                "seconds_together": t_together,
                "cost_vs_default": t_together / base[3],
                "alone_cost_vs_default": t_alone / base[2],
            }
        )
    diffs = probes["max_abs_diff"]
    out["cause"] = sorted((k for k, v in diffs.items() if v), key=lambda k: -diffs[k])
    works = [f for f in out["fixes"] if "skipped" not in f and not f["differing_rows"]]
    best = min(works, key=lambda f: f["cost_vs_default"]) if works else None
    out["summary"] = (
        f"kernels that vary with the batch: {', '.join(out['cause']) or 'none'}; "
        + (f"cheapest fix that restores invariance: {best['fix']} ({best['cost_vs_default']:.2f}x the batched time)"
           if best else "no candidate fix restores invariance")
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------
# section: speed
# ---------------------------------------------------------------------------------------------------


def speed_row(model, prompts, spec, cache, gen, block, max_nfe) -> dict:
    reqs = requests(prompts, spec, cache, gen, block, max_nfe=max_nfe)
    engine = Engine(model, max_batch=len(reqs))
    with forward_timer(model) as timer:
        res, wall = timed(model.device, lambda: engine.run(reqs))
    tokens = sum(sum(r.tokens_per_step) for r in res)
    return {
        "batch": len(reqs),
        "cache": cache,
        "policy": spec,
        "nfe_mean": sum(r.nfe for r in res) / len(res),
        "rounds": engine.rounds,
        "model_calls": engine.forward_calls,
        "seconds": wall,
        "forward_seconds": timer.seconds,
        "forward_ms_per_call": 1000 * timer.seconds / max(timer.calls, 1),
        "outside_ms_per_round": 1000 * (wall - timer.seconds) / max(engine.rounds, 1),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "complete": not any(r.stopped_by_max_nfe for r in res),
    }


def sdpa_used(device, fn: Callable) -> tuple[str, list[str]]:
    """The SDPA kernel a call runs, read from the profiler: (backend, the attention op/kernel names)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=acts) as prof:
            fn()
            sync(device)
    except RuntimeError:  # no CUPTI: the CPU-side op names still name the backend
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
            sync(device)
    keys = ("scaled_dot_product", "flash", "fmha", "cudnn", "attention")
    names = sorted({e.key for e in prof.key_averages() if any(k in e.key.lower() for k in keys)})
    ops = [n for n in names if "_scaled_dot_product" in n]
    used = next((b for b in ("cudnn", "flash", "efficient", "math") if any(b in n for n in ops)), "unknown")
    return used, names[:12]


@torch.no_grad()
def sdpa_report(ctx: Ctx) -> dict:
    """The backend the model's own forward uses without padding (equal prompts) and with it (ragged,
    left-padded, a key mask), and each backend forced on the same attention shapes: ms, or the refusal."""
    from torch.nn.attention import sdpa_kernel

    s, model = ctx.sizes, ctx.model("llada")
    cfg, B = model.config, min(32, max(s.speed_batches))
    prompts, pad, mask = ctx.prompts(B), Engine(model).pad_id, int(cfg.mask_token_id)
    P = max(map(len, prompts))
    cases = {"no_padding": [p[:1] * P for p in prompts], "padding": prompts}
    out = {"batch": B, "heads": cfg.n_heads, "head_dim": cfg.head_dim, "tokens": P + s.speed_gen}
    g = torch.Generator(device=ctx.device).manual_seed(2)
    for name, rows in cases.items():
        seqs = [first_block(p, s.speed_gen, s.speed_block, mask, ctx.device) for p in rows]
        used, names = sdpa_used(ctx.device, lambda seqs=seqs: full_forward(model, seqs, pad, False))
        T = P + s.speed_gen
        qkv = torch.randn(B, 3, cfg.n_heads, T, cfg.head_dim, generator=g, device=ctx.device, dtype=ctx.dtype)
        am = torch.ones(B, T, dtype=torch.long, device=ctx.device)
        for i, p in enumerate(rows):
            am[i, : P - len(p)] = 0
        kmask = key_padding_mask(am, T)
        backends = {}
        for bname, backend in sdpa_backends().items():
            try:
                with sdpa_kernel(backend):
                    ms = best_ms(
                        ctx.device, lambda q=qkv, m=kmask: F.scaled_dot_product_attention(*q.unbind(1), attn_mask=m)
                    )
                backends[bname] = {"ok": True, "ms": ms}
            except RuntimeError as exc:
                backends[bname] = {"ok": False, "error": str(exc).strip().splitlines()[0][:200]}
        out[name] = {"used": used, "kernels": names, "mask": kmask is not None, "backends": backends}
    return out


def compile_report(ctx: Ctx) -> dict:
    """One full-canvas forward and one dual-cache forward at a fixed shape, eager and under
    ``torch.compile`` (inductor; the smoke run uses the ``eager`` backend: tracing only, seconds)."""
    s, model = ctx.sizes, ctx.model("llada")
    B, P, G, L = s.compile_batch, s.prompt_lengths[1], s.speed_gen, s.speed_block
    ids = torch.full((B, P + G), int(model.config.mask_token_id), device=ctx.device)
    ids[:, :P] = torch.randint(*s.token_range, (B, P), device=ctx.device)
    win = {"start": P, "end": P + L, "logits_start": P, "logits_end": P + L}
    with torch.no_grad():
        kv = model.denoise(ids, None, use_cache=True, **win).past_key_values
        cache = KVCache([(k.clone(), v.clone()) for k, v in kv])
        calls = {"full": lambda: model.denoise(ids, None, **win),
                 "dual": lambda: model.denoise(ids, None, cache=cache, cache_mode="dual", **win)}  # fmt: skip
        eager = {k: best_ms(ctx.device, f) for k, f in calls.items()}
        backend = "eager" if ctx.smoke else "inductor"
        out = {"backend": backend, "batch": B, "tokens": P + G, "rows": [], "error": None}
        counters = torch._dynamo.utils.counters
        counters.clear()
        try:
            model.forward = torch.compile(model.forward, backend=backend, dynamic=False)
            for name, f in calls.items():
                _, first = timed(ctx.device, f)
                ms = best_ms(ctx.device, f)
                out["rows"].append({"forward": name, "eager_ms": eager[name], "compiled_ms": ms,
                                    "speedup": eager[name] / ms, "first_call_s": first})  # fmt: skip
        except Exception as exc:  # a compiler failure is a finding, not a crash of the check
            out["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        finally:
            vars(model).pop("forward", None)
            breaks = counters.get("graph_break", {})
            out["graph_breaks"] = sum(breaks.values())
            out["graph_break_reasons"] = sorted({str(k).strip().splitlines()[0][:160] for k in breaks})[:8]
            torch._dynamo.reset()
    return out


def section_speed(ctx: Ctx) -> dict:
    s, budget = ctx.sizes, ctx.budget("speed")
    prompts = ctx.prompts(max(s.speed_batches))
    out = {"gen_length": s.speed_gen, "block_length": {}, "batches": list(s.speed_batches),
           "threshold_max_nfe": s.threshold_max_nfe, "sdpa": sdpa_report(ctx), "rows": [], "skipped": []}  # fmt: skip
    fixed = f"llada:steps={s.speed_steps}"
    for kind, specs in (("llada", [fixed, "threshold:0.9"]), ("moe", ["llada2"])):
        model = ctx.model(kind)
        gen, block = ctx.geometry(kind, s.speed_gen, s.speed_block)
        out["block_length"][kind] = block
        for cache in CACHES[kind]:
            speed_row(model, prompts[:1], specs[0], cache, gen, block, 2)  # warm-up: kernels, RoPE tables
            for spec in specs:
                cap = None if spec == fixed else s.threshold_max_nfe
                for b in s.speed_batches:
                    if budget.over():
                        out["skipped"].append({"model": kind, "batch": b, "cache": cache, "policy": spec,
                                               "reason": "time budget"})  # fmt: skip
                        continue
                    out["rows"].append({"model": kind, **speed_row(model, prompts[:b], spec, cache, gen, block, cap)})
                    line(out["rows"][-1], SPEED_COLUMNS)
    need = 5 if ctx.smoke else 45  # inductor compiles two graphs
    out["compile"] = compile_report(ctx) if not budget.over(need) else {"skipped": "time budget"}
    best = max((r for r in out["rows"] if r["model"] == "llada"), key=lambda r: r["tokens_per_s"], default=None)
    out["headline"] = (
        f"SDPA used: {out['sdpa']['no_padding']['used']} without padding, {out['sdpa']['padding']['used']} with it"
        + (
            f"; best LLaDA tokens/s {best['tokens_per_s']:.0f} (batch {best['batch']}, {best['cache']}, "
            f"{best['policy']}); engine outside the model {best['outside_ms_per_round']:.1f} ms per round"
            if best
            else ""
        )
    )
    return out


SPEED_COLUMNS = ["model", "batch", "cache", "policy", "nfe_mean", "forward_ms_per_call", "outside_ms_per_round",
                 "tokens_per_s"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# section: the peer (official Fast-dLLM code)
# ---------------------------------------------------------------------------------------------------


def _no_compile(fn=None, *args, **kwargs):
    """``torch.compile`` as a no-op decorator (bare or called), for importing the peer on a CPU."""
    return fn if callable(fn) else (lambda f: f)


def load_peer(path: Path, device: torch.device) -> dict:
    """Fast-dLLM's ``llada/generate.py`` and ``llada/model`` imported from a checkout (never copied into
    fewstep). On a CPU only, its ``@torch.compile()`` attention helper is imported undecorated."""
    root = path / "llada" if (path / "llada" / "generate.py").is_file() else path
    if not (root / "generate.py").is_file() or not (root / "model" / "modeling_llada.py").is_file():
        raise FileNotFoundError(f"{path} is not a Fast-dLLM checkout (no llada/generate.py, llada/model/)")
    patches, real = [], torch.compile
    if device.type == "cpu":
        torch.compile = _no_compile
        patches.append("CPU: the @torch.compile() decorator of modeling_llada.scaled_dot_product_attention removed")
    sys.path.insert(0, str(root))
    try:
        modeling = importlib.import_module("model.modeling_llada")
        configuration = importlib.import_module("model.configuration_llada")
        generate = importlib.import_module("generate")
    finally:
        torch.compile = real
        sys.path.remove(str(root))
    commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    if not commit.strip() and (path / "COMMIT").is_file():  # an exported tree: the commit written beside it
        commit = (path / "COMMIT").read_text()
    return {"modeling": modeling, "configuration": configuration, "generate": generate, "patches": patches,
            "commit": commit.strip() or None, "root": root}  # fmt: skip


def peer_model(peer: dict, model) -> tuple[torch.nn.Module, list[str]]:
    """The peer's ``LLaDAModelLM`` holding ``model``'s weights (same dtype and device)."""
    shims = []
    pc = peer["configuration"].LLaDAConfig(**model.config.to_dict())
    if not hasattr(pc, "use_cache"):  # transformers >= 5 dropped the PretrainedConfig default the code reads
        pc.use_cache = False
        shims.append("config.use_cache = False (transformers >= 5 has no default)")
    from accelerate import init_empty_weights

    default = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)  # built in the weights' dtype, as from_pretrained(torch_dtype=) builds it
    try:
        with init_empty_weights():  # parameters on the meta device: no 8B-shaped CPU init
            m = peer["modeling"].LLaDAModelLM(pc, init_params=False)
    finally:
        torch.set_default_dtype(default)
    state = {model.checkpoint_key(k): v for k, v in model.state_dict().items()}
    missing, unexpected = m.load_state_dict(state, strict=False, assign=True)  # fewstep's tensors, shared
    params = {n for n, _ in m.named_parameters()}
    if params & set(missing) or unexpected:
        raise RuntimeError(
            f"the peer model does not take fewstep's weights: missing {missing}, unexpected {unexpected}"
        )
    shims.append("weights given with load_state_dict (from_pretrained of transformers >= 5 refuses the class)")
    return m.to(model.device).eval(), shims


def section_peer(ctx: Ctx) -> dict:
    if not ctx.args.peer_dir:
        return {"status": "skipped", "reason": "no --peer-dir: bring a checkout of NVlabs/Fast-dLLM (docs/gpu.md)"}
    s, budget, model = ctx.sizes, ctx.budget("peer"), ctx.model("llada")
    peer = load_peer(Path(ctx.args.peer_dir), ctx.device)
    pmodel, shims = peer_model(peer, model)
    G, L, prompts = s.speed_gen, s.speed_block, ctx.prompts(s.peer_prompts)
    import transformers

    out = {
        "peer_dir": str(ctx.args.peer_dir),
        "peer_commit": peer["commit"],
        "patches": peer["patches"],
        "transformers": transformers.__version__,
        "compat_shims": shims,
        "prompts": len(prompts),
        "gen_length": G,
        "block_length": L,
        "rows": [],
        "skipped": [],
    }
    fns = {"none": "generate", "prefix": "generate_with_prefix_cache", "dual": "generate_with_dual_cache"}
    runs = [(f"llada:steps={s.speed_steps},probs_dtype=float64", s.speed_steps, None), ("threshold:0.9", G, 0.9)]
    for (spec, steps, threshold), cache in ((r, c) for r in runs for c in fns):
        fn = getattr(peer["generate"], fns[cache], None)
        if fn is None or budget.over():
            out["skipped"].append(
                {"policy": spec, "cache": cache, "reason": "no such function" if fn is None else "time budget"}
            )
            continue
        kw = {"steps": steps, "block_length": L, "temperature": 0.0, "remasking": "low_confidence",
              "mask_id": int(model.config.mask_token_id), "threshold": threshold}  # fmt: skip
        row = peer_row(ctx, model, pmodel, fn, kw, prompts, spec, cache)
        out["rows"].append({"policy": spec, "peer_function": fns[cache], "cache": cache, **row})
        line(out["rows"][-1], ["policy", "cache", "rows_identical", "token_agreement", "nfe_equal", "peer_ratio"])
    del pmodel
    free_memory()
    ratios = [x["peer_ratio"] for x in out["rows"]] or [float("nan")]
    out["headline"] = (
        f"peer time / fewstep time at batch 1: {min(ratios):.2f}-{max(ratios):.2f}x; identical rows "
        f"{sum(x['rows_identical'] for x in out['rows'])} of {sum(x['prompts'] for x in out['rows'])}"
    )
    return out


def peer_row(ctx, model, pmodel, fn, kw, prompts, spec, cache) -> dict:
    """The peer and fewstep on each prompt in turn (the same load on the machine for both)."""
    G, dev = ctx.sizes.speed_gen, ctx.device
    quirks = Quirks(cache_extra_nfe=cache != "none", mask_prediction=True)  # the peer's loop
    for p in prompts[:2]:  # warm-up at two shapes: the peer's compiled attention recompiles once for dynamic shapes
        fn(pmodel, torch.tensor([p], device=dev), gen_length=kw["block_length"], **{**kw, "steps": kw["block_length"]})
    t_peer = t_ours = 0.0
    same = equal = total = nfe_equal = 0
    for i, p in enumerate(prompts):
        res, dt = timed(dev, lambda p=p: fn(pmodel, torch.tensor([p], device=dev), gen_length=G, **kw))
        t_peer += dt
        x, nfe = res if isinstance(res, tuple) else (res, None)
        peer_answer = x[0, len(p) :].tolist()
        req = Request(p, policy=spec, gen_length=G, block_length=kw["block_length"], cache=cache, id=i, quirks=quirks)
        (ours,), dt = timed(dev, lambda req=req: Engine(model, max_batch=1).run([req]))
        t_ours += dt
        same += ours.answer == peer_answer
        equal += sum(a == b for a, b in zip(ours.answer, peer_answer))
        total += G
        nfe_equal += nfe is not None and int(nfe) == ours.nfe
    return {
        "prompts": len(prompts),
        "rows_identical": same,
        "token_agreement": equal / total,
        "nfe_equal": nfe_equal,
        "peer_seconds": t_peer,
        "fewstep_seconds": t_ours,
        "peer_ratio": t_peer / t_ours,
    }


# ---------------------------------------------------------------------------------------------------
# section: memory
# ---------------------------------------------------------------------------------------------------


def section_memory(ctx: Ctx) -> dict:
    s, budget = ctx.sizes, ctx.budget("memory")
    prompts = ctx.prompts(max(s.speed_batches))
    out = {"gen_length": s.speed_gen, "max_nfe": s.memory_max_nfe, "inference": [], "training": [], "skipped": []}
    for kind, spec in (("llada", f"llada:steps={s.speed_steps}"), ("moe", "llada2")):
        model = ctx.model(kind)
        gen, block = ctx.geometry(kind, s.speed_gen, s.speed_block)
        for cache in CACHES[kind]:
            for b in s.speed_batches:
                reqs = requests(prompts[:b], spec, cache, gen, block, max_nfe=s.memory_max_nfe)
                resident = ctx.peak_reset()
                row = {"model": kind, "batch": b, "cache": cache, "weights_bytes": n_bytes(model), "oom": False}
                try:
                    Engine(model, max_batch=b).run(reqs)
                except (
                    torch.cuda.OutOfMemoryError,
                    RuntimeError,
                ) as exc:  # the engine reports a policy's as a row error
                    if "out of memory" not in str(exc).lower():
                        raise
                    row["oom"] = True
                    free_memory()
                peak = ctx.peak()
                row["resident_bytes"], row["peak_allocated_bytes"] = resident, peak
                row["decode_bytes"] = None if peak is None else peak - resident
                row["peak_over_weights"] = None if peak is None else 1 + row["decode_bytes"] / row["weights_bytes"]
                out["inference"].append(row)
    for finetune in ("lora", "full"):
        if budget.over():
            out["skipped"].append({"finetune": finetune, "reason": "time budget"})
            continue
        out["training"].append(train_row(ctx, finetune))
        line(out["training"][-1], ["finetune", "layers", "batch", "length", "step_seconds", "peak_allocated_bytes"])
    print_table(out["inference"], ["model", "batch", "cache", "peak_allocated_bytes", "peak_over_weights", "oom"])
    gib = [r["peak_allocated_bytes"] for r in out["inference"] if r["peak_allocated_bytes"]]
    out["headline"] = f"largest inference peak {max(gib) / 2**30:.1f} GiB" if gib else "peak memory: CUDA only"
    return out


def train_row(ctx: Ctx, finetune: str) -> dict:
    """Optimiser steps of the dParallel objective through ``fewstep distill``'s trainer (accelerate, bf16
    autocast; LoRA on a bf16 base, full fine-tuning on float32 weights: what ``fewstep distill`` does on a
    GPU), on a fresh 8B-shaped stack. Step time (steps after the first) and peak allocated memory."""
    from accelerate import Accelerator

    from fewstep.distill import build_objective
    from fewstep.train.config import TrainConfig
    from fewstep.train.lora import LoraSpec, lora_roles
    from fewstep.train.objective import SpecialIds
    from fewstep.train.trainer import Trainer

    s = ctx.sizes
    dtype = torch.bfloat16 if finetune == "lora" else torch.float32
    resident = ctx.peak_reset()  # the inference models stay loaded: their bytes are not the run's
    model = build_model("llada", s.layers, s, ctx.device, dtype, seed=3)
    cfg = model.config
    objective = build_objective("dparallel", "llada", SpecialIds(cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id),
                                s.train_length)  # fmt: skip
    rng, P = random.Random(0), s.train_length // 6
    lo, hi = s.token_range
    examples = [{"prompt_ids": [rng.randrange(lo, hi) for _ in range(P)],
                 "response_ids": [rng.randrange(lo, hi) for _ in range(s.train_length - P - 1)]}
                for _ in range(s.train_batch * s.train_steps)]  # fmt: skip
    lora = LoraSpec(r=s.lora_r, alpha=s.lora_r, roles=lora_roles("dparallel", "llada")) if finetune == "lora" else None
    row = {
        "finetune": finetune,
        "layers": s.layers,
        "batch": s.train_batch,
        "length": s.train_length,
        "weights_dtype": str(dtype).removeprefix("torch."),
        "autocast": "bf16",
        "lora_r": s.lora_r if lora else None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tc = TrainConfig(out_dir=tmp, max_steps=s.train_steps, batch_size=s.train_batch, lr=2e-5, warmup_steps=0,
                         bf16=True, lora=lora, progress=False)  # fmt: skip
        acc = Accelerator(mixed_precision="bf16", cpu=ctx.device.type == "cpu")
        trainer = Trainer(model, objective, examples, tc, accelerator=acc)
        times, logs = [], {}
        for _ in range(s.train_steps):
            logs, dt = timed(ctx.device, trainer.train_step)
            times.append(dt)
        row.update(
            first_step_seconds=times[0],
            step_seconds=sum(times[1:]) / max(len(times) - 1, 1),
            peak_allocated_bytes=None if resident is None else ctx.peak() - resident,
            trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            loss=logs.get("loss"),
        )
    del trainer, model
    free_memory()
    return row


# ---------------------------------------------------------------------------------------------------
# section: serving (benchmarks/serve.py in a subprocess)
# ---------------------------------------------------------------------------------------------------


def section_serving(ctx: Ctx) -> dict:
    s, budget = ctx.sizes, ctx.budget("serving")
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "serve.json"
        cmd = [
            "benchmarks/serve.py",
            "--models",
            "8b-shaped",
            "--layers",
            str(s.layers),
            "--device",
            str(ctx.device),
            "--dtype",
            str(ctx.dtype).removeprefix("torch."),
            "--clients",
            ",".join(map(str, s.serve_clients)),
        ]
        cmd += ["--quick"] if ctx.smoke else []
        try:
            proc = subprocess.run([sys.executable, *cmd, "--out", str(out_json)], cwd=ROOT, capture_output=True,
                                  text=True, timeout=budget.seconds)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"serve.py did not finish within the section's budget ({budget.seconds:.0f} s)"
            ) from None
        if proc.returncode:
            raise RuntimeError(f"serve.py exited with {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
        res = json.loads(out_json.read_text())
    m = res["models"][0]
    out = {"command": "python " + " ".join(cmd), "layers": s.layers, "clients": list(s.serve_clients),
           "policy": m["policy"], "max_tokens": m["max_tokens"], "cache": m["cache"], "rows": m["rows"]}  # fmt: skip
    print_table(m["rows"], ["mode", "clients", "requests_per_s", "output_tokens_per_s", "ttfd_p50_s", "latency_p50_s"])
    top = max(m["rows"], key=lambda r: r["requests_per_s"])
    out["headline"] = f"{top['requests_per_s']:.1f} requests/s at {top['clients']} clients ({top['mode']})"
    return out


# ---------------------------------------------------------------------------------------------------
# the run: resumable by section
# ---------------------------------------------------------------------------------------------------

RUNNERS = {
    "invariance": section_invariance,
    "speed": section_speed,
    "peer": section_peer,
    "memory": section_memory,
    "serving": section_serving,
}


def host_info(device: torch.device) -> dict:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "git_commit": commit.stdout.strip() or None,
    }


def run_key(args, sizes: Sizes, device: torch.device) -> dict:
    """What a resumed run must share with the JSON it continues (else sections would not compare)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    key = {"smoke": bool(args.smoke), "device": device.type, "gpu": gpu, "dtype": "bfloat16", "sizes": asdict(sizes)}
    return json.loads(json.dumps(key))


def load_result(out: Path, key: dict, force: bool) -> dict:
    fresh = {"schema": SCHEMA, "run": key, "sections": {}}
    if not out.is_file():
        return fresh
    try:
        old = json.loads(out.read_text())
    except json.JSONDecodeError:
        raise SystemExit(f"gpu.py: {out} is not valid JSON; move it away or pass --out") from None
    if old.get("run") == key:
        return old
    if force:
        print(f"gpu.py: {out} holds a run with other settings; --force starts it afresh")
        return fresh
    raise SystemExit(f"gpu.py: {out} holds a run with other settings (device, sizes or --smoke); pass --force "
                     "to replace it or --out for another file")  # fmt: skip


def write_json(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)


def run_section(ctx: Ctx, name: str) -> dict:
    print(f"\n== {name} ==", flush=True)
    t = time.perf_counter()
    try:
        data = RUNNERS[name](ctx)
    except Exception as exc:  # recorded; the other sections still run
        traceback.print_exc()
        data = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
        free_memory()
    data.setdefault("status", "done")
    data["seconds"] = time.perf_counter() - t
    data["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return data


def summary(result: dict) -> None:
    rows = [{"section": k, "status": v["status"], "seconds": v.get("seconds", 0.0),
             "headline": v.get("headline") or v.get("reason") or v.get("error", "")[:100]}
            for k, v in result["sections"].items()]  # fmt: skip
    print("\n== summary ==")
    print_table(rows, ["section", "status", "seconds", "headline"])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, in this order: {', '.join(SECTIONS)}"
    )
    p.add_argument("--force", action="store_true", help="rerun sections the JSON already holds as done")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: every section in under a minute")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available; cpu with --smoke)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/gpu.json; gpu_smoke.json)")
    p.add_argument("--peer-dir", default=None, help="a checkout of NVlabs/Fast-dLLM for the peer section")
    p.add_argument("--layers", type=int, default=None, help="layers of the 8B-shaped LLaDA (default 4; 1 smoke)")
    p.add_argument("--moe-layers", type=int, default=None, help="layers of the LLaDA2.0-mini-shaped MoE (default 3)")
    p.add_argument("--diagnose", choices=["auto", "always", "never"], default="auto",
                   help="the invariance diagnosis: when rows or logits differ (auto), always, never")  # fmt: skip
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=8.0,
        help="no section starts after this; the ones left are recorded as skipped (a rerun does them)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p, p.parse_args(argv)


def main(argv=None) -> int:
    p, args = parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [n for n in names if n not in SECTIONS]
    if bad or not names:
        p.error(f"--sections: unknown {bad}; choose from {', '.join(SECTIONS)}")
    sizes = SMOKE if args.smoke else Sizes()
    sizes = replace(sizes, layers=args.layers or sizes.layers, moe_layers=args.moe_layers or sizes.moe_layers)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    default = "gpu_smoke.json" if args.smoke else "gpu.json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / default
    result = load_result(out, run_key(args, sizes, device), args.force)
    result["host"] = host_info(device)
    ctx = Ctx(args, sizes, device, torch.bfloat16, out, result, deadline=time.monotonic() + 60 * args.max_minutes)
    torch.manual_seed(0)
    for name in (n for n in SECTIONS if n in names):
        old = result["sections"].get(name)
        if old and old.get("status") == "done" and not args.force:
            print(f"\n== {name}: done at {old['finished_at']} in {out.name}; skipped (--force reruns it)")
            continue
        if time.monotonic() > ctx.deadline:
            result["sections"][name] = {"status": "skipped", "reason": f"--max-minutes {args.max_minutes:g} spent"}
        else:
            result["sections"][name] = run_section(ctx, name)
        write_json(out, result)
    write_json(out, result)
    summary(result)
    print(f"\nresults: {out}")
    return 1 if any(v["status"] == "error" for v in result["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
