"""Decoding benchmark: every policy x cache mode at batch 1 and 32, the engine's own cost, and the
dual / prefix KV cache against no cache at 256 new tokens. Results: a printed table and JSON.

Sections (all measured side by side in one run, same process, same thread count):

* ``policies``: a *trained* model (default: the repo's tiny LLaDA fixture, whose confidences are
  those of a real masked-diffusion model, so NFE and tokens/step are meaningful) on 32 prompts of its
  training distribution. For each policy x cache x batch {1, 32}: mean NFE per row, tokens per step,
  wall-clock (best of ``--repeats`` runs), tokens/s, speedup over the one-token-per-step baseline
  (LLaDA, ``steps = gen_length``, no cache, same batch) and the fraction of the time spent outside
  ``model.forward``.
* ``overhead``: the engine's cost per step with the real LLaDA vocabulary (126,464 entries), measured
  with a null model whose forward is a free slice of fixed logits; set against the measured forward
  time of the ``cache`` section's synthetic model at batch 32 (dual cache, the cheapest forward).
* ``batching``: continuous batching (:class:`fewstep.decoding.engine.Engine`, ``max_batch`` rows, a
  finished row's place refilled at once) against the old lockstep loop (``lockstep_reference.py``:
  fixed batches of equal settings, one after the other, rows waiting for the slowest at every block)
  on requests with mixed prompt and answer lengths: rows/s and mean/p50/p99 latency, all requests at
  once and arriving at random (Poisson); and the engine's cost per step over a bare loop of the same
  forwards. Timed on this thread's CPU clock (one torch thread), so other jobs on a shared machine do
  not enter the numbers; waiting for an arrival advances that clock without sleeping.
* ``cache``: (wall-clock, and a contention-robust time that prices every forward at the fastest
  forward of the same shape in the run) a synthetic random LLaDA with LLaDA-8B's widths (d_model 4096, 32 heads, MLP 12288,
  vocabulary 126,464) but few layers; batch 1, 256 new tokens in blocks of 32, a fixed number of steps
  per block (random weights make threshold rules commit one token per step, which would only make the
  run longer without changing the per-forward costs compared here).

    python benchmarks/decode.py                      # everything (about 15 minutes on one CPU core)
    python benchmarks/decode.py --sections policies  # one section
    python benchmarks/decode.py --quick              # seconds; a smoke run with tiny sizes
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lockstep_reference import lockstep_generate  # noqa: E402

import fewstep  # noqa: E402
from fewstep.decoding import generate  # noqa: E402
from fewstep.decoding.engine import Engine, Request  # noqa: E402
from fewstep.models import KVCache, LLaDAConfig, LLaDAModel, ModelOutput  # noqa: E402

BASELINE = "llada"  # steps = gen_length: one token per step
POLICIES = [
    "llada:steps={half}",
    "threshold:0.9",
    "factor:1.0",
    "entropy:0.5",
    "entropy-dream:0.5",
    "cad:threshold=0.95,max_tokens=32",
    "dream:alg=confidence_threshold,steps={half}",
]
CACHES = ["none", "prefix", "dual"]
LLADA_VOCAB = 126464


# ---------------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------------


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class ForwardTimer:
    """Wraps ``model.forward`` and accumulates the seconds spent inside it."""

    def __init__(self, model):
        self.model, self.seconds, self.calls = model, 0.0, 0
        self.durations: list[tuple[tuple, float]] = []  # (input shape, seconds) of every call
        self._orig = model.forward
        model.forward = self._timed

    def _timed(self, input_ids, *args, **kwargs):
        sync(self.model.device)
        t = time.perf_counter()
        out = self._orig(input_ids, *args, **kwargs)
        sync(self.model.device)
        dt = time.perf_counter() - t
        self.seconds += dt
        self.calls += 1
        self.durations.append((tuple(input_ids.shape), dt))
        return out

    def robust_seconds(self) -> float:
        """Forward time with each call priced at the fastest call of the same input shape: the cost
        without the slowdowns other processes cause on a shared machine."""
        best: dict[tuple, float] = {}
        for shape, dt in self.durations:
            best[shape] = min(dt, best.get(shape, dt))
        return sum(best[shape] for shape, _ in self.durations)

    @contextmanager
    def measure(self):
        self.seconds, self.calls, self.durations = 0.0, 0, []
        yield self


def timed_generate(model, timer, prompts, spec, **kw):
    """Run ``generate`` and return (output, wall seconds, forward seconds)."""
    sync(model.device)
    with timer.measure():
        t = time.perf_counter()
        out = generate(model, prompts, spec, **kw)
        sync(model.device)
        wall = time.perf_counter() - t
    return out, wall, timer.seconds


def synthetic_llada(d_model, n_layers, n_heads, mlp, vocab, seed=0, dtype=torch.float32) -> LLaDAModel:
    """A random-weight LLaDA (tied embeddings, to save memory; the cost per token is the same)."""
    cfg = LLaDAConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        vocab_size=vocab,
        mlp_hidden_size=mlp,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        mask_token_id=vocab - 2,
        eos_token_id=vocab - 4,
        pad_token_id=vocab - 4,
        weight_tying=True,
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LLaDAModel(cfg)
    model.init_weights(seed=seed)
    return model.to(dtype).eval().requires_grad_(False)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# section 1: policies x caches x batch on a trained model
# ---------------------------------------------------------------------------------------------------


def task_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts like the tiny fixture's training data: 6-14 content tokens in [0, 100)."""
    rng = random.Random(seed)
    return [[rng.randrange(100) for _ in range(rng.randint(6, 14))] for _ in range(n)]


def section_policies(args) -> dict:
    model_dir = Path(args.model)
    model = fewstep.load_model(model_dir, dtype="float32", device=args.device)
    timer = ForwardTimer(model)
    G, L = args.gen_length, args.block_length
    prompts = task_prompts(args.batch)
    specs = [BASELINE] + [p.format(half=G // 2) for p in POLICIES]
    rows = []
    print(f"\n== policies: {model_dir.name} ({n_params(model):,} params), gen {G}, block {L} ==")
    for batch in (1, args.batch):
        for cache in CACHES:
            for spec in specs:
                generate(model, prompts[:batch], spec, gen_length=G, block_length=L, cache=cache)  # warm-up
                groups = [
                    prompts[i : i + batch] for i in range(0, args.batch if batch > 1 else args.single_runs, batch)
                ]
                best = None
                for _ in range(args.repeats):  # best of N: the run least disturbed by other processes
                    wall = fwd = 0.0
                    nfe, tokens = [], 0
                    for group in groups:
                        out, w, f = timed_generate(model, timer, group, spec, gen_length=G, block_length=L, cache=cache)
                        wall, fwd = wall + w, fwd + f
                        nfe += out.nfe.tolist()
                        tokens += sum(sum(t) for t in out.tokens_per_step)
                    if best is None or wall < best[0]:
                        best = (wall, fwd)
                wall, fwd = best
                rows.append(
                    {
                        "batch": batch,
                        "cache": cache,
                        "policy": spec,
                        "nfe": sum(nfe) / len(nfe),
                        "tokens_per_step": tokens / sum(nfe),
                        "seconds": wall,
                        "prompts": len(nfe),
                        "tokens_per_s": tokens / wall,
                        "outside_forward": 1 - fwd / wall,
                    }
                )
    for r in rows:
        base = next(b for b in rows if b["batch"] == r["batch"] and b["cache"] == "none" and b["policy"] == BASELINE)
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
    print_table(
        rows,
        ["batch", "cache", "policy", "nfe", "tokens_per_step", "seconds", "tokens_per_s", "speedup", "outside_forward"],
    )
    b1 = {(r["cache"], r["policy"]): r["tokens_per_s"] for r in rows if r["batch"] == 1}
    scaling = {
        f"{c}|{p}": r["tokens_per_s"] / b1[(c, p)]
        for r in rows
        if r["batch"] > 1
        for c, p in [(r["cache"], r["policy"])]
    }
    print(
        f"batch {args.batch} / batch 1 throughput: min {min(scaling.values()):.1f}x, max {max(scaling.values()):.1f}x"
    )
    return {"model": str(model_dir), "params": n_params(model), "gen_length": G, "block_length": L, "rows": rows,
            "batch_scaling": scaling}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# section 2: engine cost per step with a real vocabulary (null model)
# ---------------------------------------------------------------------------------------------------


class NullModel(torch.nn.Module):
    """Answers every forward with a slice of fixed logits: the loop's cost without the network's."""

    logit_shift = 0

    def __init__(self, vocab: int, batch: int, block: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(batch, block, vocab, generator=g)
        # a spread of confidences: a boosted token per position, boost ~ U(8, 18) nats
        top = torch.randint(vocab - 8, (batch, block), generator=g)
        boost = 8 + 10 * torch.rand(batch, block, generator=g)
        logits.scatter_add_(-1, top[..., None], boost[..., None])
        self.logits = logits
        self.config = LLaDAConfig(
            d_model=8, n_heads=1, n_layers=0, vocab_size=vocab, mlp_hidden_size=8, rope_theta=1.0,
            rms_norm_eps=1e-5, mask_token_id=vocab - 2, eos_token_id=vocab - 4, pad_token_id=vocab - 4,
        )  # fmt: skip
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.dummy.device

    def forward(self, input_ids, **_):
        return ModelOutput(logits=self.logits[: input_ids.shape[0]])

    def denoise(self, input_ids, attention_mask=None, **kw):
        return self(input_ids)


def section_overhead(args, forward_b32: float | None) -> dict:
    V, L = args.vocab, args.block_length
    null = NullModel(V, args.batch, L)
    timer = ForwardTimer(null)
    prompts = task_prompts(args.batch)
    rows = []
    print(f"\n== engine overhead: null model, vocabulary {V:,}, one block of {L} ==")
    generate(null, prompts[:1], BASELINE, gen_length=L, block_length=L)  # warm-up
    for batch in (1, args.batch):
        for spec in [BASELINE] + [p.format(half=L // 2) for p in POLICIES]:
            per_step = []
            for _ in range(args.repeats):
                _, wall, fwd = timed_generate(null, timer, prompts[:batch], spec, gen_length=L, block_length=L)
                per_step.append((wall - fwd) / timer.calls)
            steps = timer.calls
            row = {"batch": batch, "policy": spec, "steps": steps, "ms_per_step": 1000 * min(per_step)}
            if forward_b32 is not None and batch == args.batch:
                row["fraction_vs_synthetic_dual_b32"] = row["ms_per_step"] / (row["ms_per_step"] + 1000 * forward_b32)
            rows.append(row)
    print_table(rows, list(rows[-1]))
    return {"vocab": V, "block_length": L, "synthetic_dual_forward_b32_s": forward_b32, "rows": rows}


# ---------------------------------------------------------------------------------------------------
# section 3: KV caches at 256 new tokens on a synthetic model with real widths
# ---------------------------------------------------------------------------------------------------


def section_cache(args) -> tuple[dict, float | None]:
    s = args.synthetic
    model = synthetic_llada(s["d_model"], s["n_layers"], s["n_heads"], s["mlp"], args.vocab)
    timer = ForwardTimer(model)
    G, L, P = args.cache_gen_length, args.block_length, args.prompt_length
    spec = f"llada:steps={args.cache_steps}"
    prompt = [list(range(1, P + 1))]
    print(
        f"\n== caches: synthetic LLaDA {n_params(model) / 1e6:.0f}M params (d_model {s['d_model']}, "
        f"{s['n_layers']} layers, vocab {args.vocab:,}), prompt {P}, gen {G}, block {L}, {spec} =="
    )
    generate(model, prompt, "llada:steps=1", gen_length=L, block_length=L, cache="dual")  # warm-up
    rows = []
    for cache in CACHES:
        out, wall, fwd = timed_generate(model, timer, prompt, spec, gen_length=G, block_length=L, cache=cache)
        robust = timer.robust_seconds() + (wall - fwd)
        rows.append({"cache": cache, "nfe": int(out.nfe[0]), "seconds": wall, "robust_seconds": robust,
                     "tokens_per_s": G / wall, "outside_forward": 1 - fwd / wall})  # fmt: skip
        print(f"  {cache:6s} nfe {rows[-1]['nfe']:3d}  {wall:8.1f} s  (robust {robust:.1f} s)", flush=True)
    for r in rows:
        r["speedup_vs_none"] = rows[0]["seconds"] / r["seconds"]
        r["robust_speedup_vs_none"] = rows[0]["robust_seconds"] / r["robust_seconds"]
    print_table(rows, list(rows[0]))
    forward_b32 = None
    if args.batch > 1:  # one dual-cache forward at batch 32 (the cheapest forward: worst case for overhead)
        ids = torch.full((args.batch, P + G), model.config.mask_token_id)
        ids[:, :P] = torch.arange(1, P + 1)
        cfg = model.config  # a cache of the right shape; its content does not change the cost
        shape = (args.batch, cfg.kv_heads, P + G, cfg.head_dim)
        cache = KVCache([(torch.randn(shape), torch.randn(shape)) for _ in range(cfg.n_layers)])
        with torch.no_grad():
            t = time.perf_counter()
            model.denoise(ids, start=P, end=P + L, cache=cache, cache_mode="dual", logits_start=P, logits_end=P + L)
            forward_b32 = time.perf_counter() - t
        print(f"  one dual-cache forward at batch {args.batch}: {forward_b32:.2f} s")
    return {"model": {**s, "vocab": args.vocab, "params": n_params(model)}, "prompt_length": P, "gen_length": G,
            "block_length": L, "policy": spec, "rows": rows, "dual_forward_b32_s": forward_b32}, forward_b32  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# section 4: continuous batching against the old lockstep loop, and the engine's cost over bare forwards
# ---------------------------------------------------------------------------------------------------


class Clock:
    """The batching section's clock: this thread's CPU time (torch runs on this thread with one thread),
    so other jobs on a shared machine do not enter the measurement; waiting for an arrival advances it
    without sleeping."""

    def __init__(self):
        self.t0, self.skipped = time.thread_time(), 0.0

    def __call__(self) -> float:
        return time.thread_time() - self.t0 + self.skipped

    def wait_until(self, t: float) -> None:
        self.skipped += max(0.0, t - self())


def batching_requests(n: int, gen_lengths: list[int], L: int, seed: int = 1) -> list[Request]:
    """``n`` requests with mixed prompt lengths, answer lengths and two adaptive policies."""
    rng = random.Random(seed)
    return [
        Request(
            p,
            policy=rng.choice(["threshold:0.9", "entropy:0.5"]),
            gen_length=rng.choice(gen_lengths),
            block_length=L,
            id=i,
        )
        for i, p in enumerate(task_prompts(n, seed))
    ]


def run_lockstep(model, reqs: list[Request], batch: int) -> tuple[dict, float]:
    """The old way: requests of equal settings in fixed batches (arrival order), one batch after the
    other, each decoded in lockstep. Returns ``{id: (answer, nfe, finish time)}`` and the makespan."""
    groups: dict[tuple, list[Request]] = {}
    for r in reqs:
        groups.setdefault((r.gen_length, r.policy), []).append(r)
    chunks = [g[i : i + batch] for g in groups.values() for i in range(0, len(g), batch)]
    chunks.sort(key=lambda c: c[0].id)  # first come, first served
    out, clock = {}, Clock()
    for c in chunks:
        res = lockstep_generate(
            model, [r.prompt for r in c], c[0].policy, gen_length=c[0].gen_length, block_length=c[0].block_length
        )
        t = clock()
        for i, r in enumerate(c):
            out[r.id] = (res.answers[i].tolist(), int(res.nfe[i]), t)
    return out, clock()


def run_continuous(model, reqs: list[Request], batch: int, max_padding: float = 0.25) -> tuple[dict, float, Engine]:
    """The engine: every request submitted at once, ``max_batch`` rows running, a freed place refilled."""
    engine = Engine(model, max_batch=batch, max_padding=max_padding)
    out, clock = {}, Clock()
    for r in reqs:
        engine.submit(replace(r))
    while engine.has_work():
        for u in engine.step():
            if u.done:
                out[u.id] = (u.result.answer, u.result.nfe, clock())
    return out, clock(), engine


def arrivals_continuous(model, reqs: list[Request], at: list[float], batch: int) -> tuple[dict, float]:
    """Requests submitted at their arrival times (between rounds); ``{id: (answer, nfe, latency)}``."""
    engine, out, i, clock = Engine(model, max_batch=batch), {}, 0, Clock()
    while i < len(reqs) or engine.has_work():
        while i < len(reqs) and at[i] <= clock():
            engine.submit(replace(reqs[i]))
            i += 1
        if not engine.has_work():
            clock.wait_until(at[i])
            continue
        for u in engine.step():
            if u.done:
                out[u.id] = (u.result.answer, u.result.nfe, clock() - at[u.id])
    return out, clock()


def arrivals_lockstep(model, reqs: list[Request], at: list[float], batch: int) -> tuple[dict, float]:
    """The old way under arrivals: when the running batch ends, the oldest waiting request's settings
    make the next batch (up to ``batch`` waiting requests with those settings), decoded in lockstep."""
    out, waiting, i, clock = {}, [], 0, Clock()
    while i < len(reqs) or waiting:
        while i < len(reqs) and at[i] <= clock():
            waiting.append(reqs[i])
            i += 1
        if not waiting:
            clock.wait_until(at[i])
            continue
        key = (waiting[0].gen_length, waiting[0].policy)
        chunk = [r for r in waiting if (r.gen_length, r.policy) == key][:batch]
        waiting = [r for r in waiting if r not in chunk]
        res = lockstep_generate(model, [r.prompt for r in chunk], key[1], gen_length=key[0],
                                block_length=chunk[0].block_length)  # fmt: skip
        for j, r in enumerate(chunk):
            out[r.id] = (res.answers[j].tolist(), int(res.nfe[j]), clock() - at[r.id])
    return out, clock()


def latency_stats(res: dict, makespan: float) -> dict:
    lat = sorted(t for _, _, t in res.values())
    return {
        "rows_per_s": len(lat) / makespan,
        "seconds": makespan,
        "mean_latency_s": sum(lat) / len(lat),
        "p50_latency_s": lat[len(lat) // 2],
        "p99_latency_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def bare_forward_loop(model, reqs: list[Request], rounds: int) -> float:
    """``rounds`` forwards of the same batch with no engine at all: a fixed canvas, block logits only."""
    P, G, L = len(reqs[0].prompt), reqs[0].gen_length, reqs[0].block_length
    ids = torch.full((len(reqs), P + G), model.config.mask_token_id)
    ids[:, :P] = torch.tensor([r.prompt for r in reqs])
    t = time.thread_time()
    with torch.no_grad():
        for k in range(rounds):
            s = P + (k % (G // L)) * L
            model.denoise(ids, start=s, end=s + L, logits_start=s, logits_end=s + L)
    return time.thread_time() - t


def engine_overhead(model, batch: int, G: int, L: int, repeats: int) -> dict:
    """Engine and old lockstep loop against a bare forward loop, same forwards (fixed steps, no cache)."""
    prompt = task_prompts(1, seed=5)[0]
    reqs = [Request(prompt, policy=f"llada:steps={G}", gen_length=G, block_length=L, id=i) for i in range(batch)]
    eng = lock = bare = float("inf")
    for _ in range(repeats):
        t = time.thread_time()
        Engine(model, max_batch=batch).run([replace(r) for r in reqs])
        eng = min(eng, time.thread_time() - t)
        t = time.thread_time()
        lockstep_generate(model, [prompt] * batch, f"llada:steps={G}", gen_length=G, block_length=L)
        lock = min(lock, time.thread_time() - t)
        bare = min(bare, bare_forward_loop(model, reqs, G))
    return {
        "batch": batch,
        "forwards": G,
        "engine_ms_per_step": 1000 * eng / G,
        "lockstep_ms_per_step": 1000 * lock / G,
        "bare_forward_ms_per_step": 1000 * bare / G,
        "engine_overhead": 1 - bare / eng,
        "lockstep_overhead": 1 - bare / lock,
    }


def section_batching(args) -> dict:
    model = fewstep.load_model(Path(args.model), dtype="float32", device=args.device)
    n, B, L = args.batching_requests, args.batch, args.block_length
    lengths = [L, 2 * L, 4 * L]
    reqs = batching_requests(n, lengths, L)
    print(f"\n== batching: {n} requests, answer lengths {lengths} (blocks of {L}), threshold/entropy, max batch {B} ==")
    run_continuous(model, reqs[:2], B)  # warm-up
    best = {}
    engines = {}
    for name in ("lockstep", "continuous", "continuous, max_padding=inf"):
        for _ in range(args.repeats):
            if name == "lockstep":
                res, span = run_lockstep(model, reqs, B)
            else:
                res, span, engines[name] = run_continuous(
                    model, reqs, B, 0.25 if name == "continuous" else float("inf")
                )
            if name not in best or span < best[name][1]:
                best[name] = (res, span)
    rows = [{"scheduler": k, **latency_stats(*v)} for k, v in best.items()]
    lock = best["lockstep"][0]
    same = min(sum(lock[i][:2] == v[0][i][:2] for i in lock) / len(lock) for v in best.values())
    for r in rows[1:]:
        r["rounds"], r["model_calls"] = engines[r["scheduler"]].rounds, engines[r["scheduler"]].forward_calls
    print_table(rows, list(rows[1]))
    print(
        f"  continuous / lockstep: {rows[1]['rows_per_s'] / rows[0]['rows_per_s']:.2f}x rows/s, "
        f"{rows[0]['mean_latency_s'] / rows[1]['mean_latency_s']:.2f}x lower mean latency; same answers+NFE: {same:.0%}"
    )
    rate = args.arrival_load * rows[0]["rows_per_s"]
    rng = random.Random(2)
    at = list(itertools.accumulate(rng.expovariate(rate) for _ in reqs))
    print(f"\n== the same requests arriving at random (Poisson, {rate:.1f}/s = {args.arrival_load:.0%} of the "
          "lockstep throughput above) ==")  # fmt: skip
    arr = []
    for name, fn in (("lockstep", arrivals_lockstep), ("continuous", arrivals_continuous)):
        res, span = fn(model, reqs, at, B)
        arr.append({"scheduler": name, **latency_stats(res, span)})
        arr[-1]["same_answers_and_nfe"] = sum(res[i][:2] == lock[i][:2] for i in lock) / len(lock)
    print_table(arr, list(arr[0]))
    G = args.gen_length
    over = [engine_overhead(model, b, G, L, args.repeats) for b in (1, B)]
    print(f"\n== engine overhead over a bare forward loop ({Path(args.model).name}, gen {G}, fixed steps) ==")
    print_table(over, list(over[0]))
    return {
        "model": str(args.model),
        "requests": n,
        "gen_lengths": lengths,
        "block_length": L,
        "max_batch": B,
        "rows": rows,
        "same_answers_and_nfe": same,
        "arrival_rate_per_s": rate,
        "arrivals": arr,
        "speedup_rows_per_s": rows[1]["rows_per_s"] / rows[0]["rows_per_s"],
        "mean_latency_ratio": rows[0]["mean_latency_s"] / rows[1]["mean_latency_s"],
        "overhead": over,
    }


# ---------------------------------------------------------------------------------------------------


def print_table(rows: list[dict], cols: list[str]) -> None:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)), flush=True)


def markdown(result: dict) -> str:
    """The tables of docs/results.md from a results JSON (``--report``)."""
    out = []
    if "policies" in result:
        rows = result["policies"]["rows"]

        def get(b, c, p):
            return next(x for x in rows if x["batch"] == b and x["cache"] == c and x["policy"] == p)

        big = max(r["batch"] for r in rows)
        out += [
            f"| policy | NFE | tokens/step | b1 none | b1 dual | b{big} none | b{big} prefix | b{big} dual "
            f"| outside forward, b{big} none / dual |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for p in dict.fromkeys(r["policy"] for r in rows):
            a = get(big, "none", p)
            cells = [
                f"{get(b, c, p)['tokens_per_s']:.0f} ({get(b, c, p)['speedup']:.1f}x)"
                for b, c in [(1, "none"), (1, "dual"), (big, "none"), (big, "prefix"), (big, "dual")]
            ]
            out.append(
                f"| `{p}` | {a['nfe']:.1f} | {a['tokens_per_step']:.2f} | "
                + " | ".join(cells)
                + f" | {100 * a['outside_forward']:.0f} % / {100 * get(big, 'dual', p)['outside_forward']:.0f} % |"
            )
        sc = result["policies"]["batch_scaling"].values()
        out += ["", f"batch {big} / batch 1 throughput: {min(sc):.1f}x to {max(sc):.1f}x", ""]
    if "overhead" in result:
        o = result["overhead"]["rows"]
        big = max(r["batch"] for r in o)
        out += [f"| policy | ms/step, batch 1 | ms/step, batch {big} | share of a batch-{big} dual forward |",
                "| --- | --- | --- | --- |"]  # fmt: skip
        for p in dict.fromkeys(r["policy"] for r in o):
            a = next(r for r in o if r["policy"] == p and r["batch"] == 1)
            b = next(r for r in o if r["policy"] == p and r["batch"] == big)
            share = b.get("fraction_vs_synthetic_dual_b32")
            share = "" if share is None else f"{100 * share:.1f} %"
            out.append(f"| `{p}` | {a['ms_per_step']:.1f} | {b['ms_per_step']:.0f} | {share} |")
        out.append("")
    if "cache" in result:
        c = result["cache"]
        out += ["| cache | NFE | wall s | speedup | robust s | robust speedup | outside forward |",
                "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in c["rows"]:
            rs = r.get("robust_seconds")
            out.append(
                f"| {r['cache']} | {r['nfe']} | {r['seconds']:.1f} | {r['speedup_vs_none']:.2f}x | "
                + (f"{rs:.1f} | {r['robust_speedup_vs_none']:.2f}x" if rs else "- | -")
                + f" | {100 * r['outside_forward']:.2f} % |"
            )
    if "batching" in result:
        b = result["batching"]
        out += [
            "",
            "| workload | scheduler | rows/s | mean latency s | p50 s | p99 s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for label, rows in (("all at once", b["rows"]), (f"Poisson {b['arrival_rate_per_s']:.1f}/s", b["arrivals"])):
            for r in rows:
                out.append(f"| {label} | {r['scheduler']} | {r['rows_per_s']:.1f} | {r['mean_latency_s']:.2f} | "
                           f"{r['p50_latency_s']:.2f} | {r['p99_latency_s']:.2f} |")  # fmt: skip
        out += ["", "| batch | engine ms/step | old lockstep ms/step | bare forward ms/step | engine overhead |",
                "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in b["overhead"]:
            out.append(f"| {r['batch']} | {r['engine_ms_per_step']:.1f} | {r['lockstep_ms_per_step']:.1f} | "
                       f"{r['bare_forward_ms_per_step']:.1f} | {100 * r['engine_overhead']:.0f} % |")  # fmt: skip
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sections",
        default="policies,cache,overhead,batching",
        help="comma-separated: policies, cache, overhead, batching",
    )
    p.add_argument("--batching-requests", type=int, default=96, help="batching section: requests in the workload")
    p.add_argument("--arrival-load", type=float, default=0.7, help="batching section: arrival rate / lockstep rows/s")
    p.add_argument(
        "--model", default=str(ROOT / "tests" / "fixtures" / "llada-tiny-a"), help="trained model (policies)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="policies/overhead sections: best of N runs")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--single-runs", type=int, default=8, help="prompts run one by one for the batch-1 rows")
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--cache-gen-length", type=int, default=256)
    p.add_argument("--cache-steps", type=int, default=32, help="fixed steps for the cache section (4 per block)")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--vocab", type=int, default=LLADA_VOCAB)
    p.add_argument("--layers", type=int, default=2, help="layers of the synthetic model (LLaDA-8B has 32)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
    p.add_argument("--report", metavar="JSON", help="print the markdown tables of a results file and exit")
    args = p.parse_args(argv)
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())))
        return 0
    torch.set_num_threads(args.threads)
    args.synthetic = {"d_model": 4096, "n_layers": args.layers, "n_heads": 32, "mlp": 12288}
    if args.quick:
        args.batch, args.single_runs, args.gen_length, args.block_length, args.repeats = 4, 2, 16, 8, 1
        args.cache_gen_length, args.cache_steps, args.prompt_length, args.vocab = 32, 8, 8, 1024
        args.synthetic = {"d_model": 64, "n_layers": 1, "n_heads": 4, "mlp": 128}
        args.batching_requests = 8
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    result = {
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                 "device": args.device, "cpu": platform.processor() or platform.machine()},
        "quick": args.quick,
    }  # fmt: skip
    t0 = time.perf_counter()
    if "policies" in sections:
        result["policies"] = section_policies(args)
    forward_b32 = None
    if "cache" in sections:
        result["cache"], forward_b32 = section_cache(args)
    if "overhead" in sections:
        result["overhead"] = section_overhead(args, forward_b32)
    if "batching" in sections:
        result["batching"] = section_batching(args)
    result["total_seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults written to {out} ({result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
