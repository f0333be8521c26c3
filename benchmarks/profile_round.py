"""Where one engine round spends its time, at batch 1, 8 and 32 (issue 27's profile).

The matched-compute setting of ``benchmarks/serve.py --matched``: the shipped ``dparallel`` student,
64 embedded-task prompts, ``llada:steps=64`` (64 fixed forwards, blocks of 32, greedy), no EOS early
stop, one torch thread. ``B`` requests start together and run to the end (64 rounds of ``B`` rows).

Three views of the same rounds, each on this process's CPU clock (``time.process_time``: other jobs on
a shared machine do not enter it; run it pinned, ``taskset -c 0``):

* **phases**: wrappers around the engine's and the model's functions split each round (exclusive CPU
  time) into ``forward`` (the network), ``attention_mask`` (the padded batch's ids/mask and the model's
  positions and key mask), ``forward_io`` (gathering the rows' inputs, slicing the logits per row),
  ``policy_select``, ``commit`` (writing the selection into the rows, counters), ``policy_state``
  (building each group's ``StepState``), ``block_start``/``block_done`` (the policy's other hooks) and
  ``bookkeeping`` (admission, the per-row updates, everything else of ``Engine.step``); ``text_layer``
  is what :class:`~fewstep.decoding.text.TextGenerator` adds per round (detokenising, events);
* **cProfile**: the functions with the most own time at batch 32;
* **torch profiler**: the forward's ops at batch 1 and 32, grouped (matrix products, attention,
  element-wise, other).

    taskset -c 0 python benchmarks/profile_round.py                 # writes benchmarks/results/profile_round.json + .md
    taskset -c 0 python benchmarks/profile_round.py --label before  # profile_round_before.*
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import platform
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import fewstep  # noqa: E402
from fewstep.decoding import engine as engine_mod  # noqa: E402
from fewstep.decoding import forward as forward_mod  # noqa: E402
from fewstep.decoding.engine import Engine, Request  # noqa: E402
from fewstep.decoding.policies import POLICIES, parse_policy  # noqa: E402
from fewstep.decoding.text import GenerationSettings, TextGenerator  # noqa: E402

POLICY = "llada:steps=64"  # 64 fixed forwards: every request runs all of them
GEN, BLOCK = 64, 32
PHASES = ("forward", "attention_mask", "forward_io", "policy_select", "commit", "policy_state", "block_start",
          "block_done", "bookkeeping", "text_layer")  # fmt: skip


class PhaseClock:
    """Exclusive CPU time per phase: a wrapped call charges its own time to its phase, minus the time of
    the wrapped calls inside it (which charge theirs)."""

    def __init__(self):
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.stack: list[float] = []  # children's time of each open call

    def wrap(self, fn, phase: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.process_time()
            self.stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                children = self.stack.pop()
                spent = time.process_time() - t
                self.totals[phase] += spent - children
                if self.stack:
                    self.stack[-1] += spent

        timed.__wrapped_by_clock__ = True
        return timed

    def reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)


def patch(clock: PhaseClock, model) -> None:
    """Wrap the functions of every phase (module attributes and class methods, as the engine calls them)."""

    def put(owner, name, phase):
        fn = getattr(owner, name, None)
        if fn is not None and not getattr(fn, "__wrapped_by_clock__", False):
            setattr(owner, name, clock.wrap(fn, phase))

    put(TextGenerator, "step", "text_layer")
    put(Engine, "step", "bookkeeping")
    for name in ("_forward", "_call", "_calls"):
        put(Engine, name, "forward_io")
    for name in ("full_forward", "prefix_forward", "dual_forward", "block_forward"):
        put(engine_mod, name, "forward_io")
    for name in ("_place", "_stack", "_block_mask"):
        put(forward_mod, name, "attention_mask")
    import fewstep.models.layers as layers_mod

    put(layers_mod, "attention_inputs", "attention_mask")
    put(type(model), "forward", "forward")
    put(Engine, "_select", "commit")
    put(Engine, "_start_block", "block_start")
    put(Engine, "_block_done", "block_done")
    put(engine_mod, "_state", "policy_state")
    for cls in {type(parse_policy(name)) for name in POLICIES}:
        put(cls, "select", "policy_select")
        put(cls, "start_block", "block_start")
        put(cls, "block_done", "block_done")


def load(device: str = "cpu"):
    from fewstep.assets import resolve_model
    from fewstep.tasks import arith

    d = resolve_model("dparallel")
    model, tok = fewstep.load_model(d, device=device), fewstep.load_tokenizer(d)
    prompts = [p.prompt for p in arith.generate("test", 64, seed=0)]
    return model, tok, prompts


def settings() -> GenerationSettings:
    return GenerationSettings(policy=POLICY, max_tokens=GEN, block_length=BLOCK, early_stop=False)


def engine_run(model, ids: list[list[int]]) -> tuple[float, int]:
    """All of ``ids`` at once through a fresh engine of that batch: (CPU seconds, rounds)."""
    eng = Engine(model, max_batch=len(ids))
    reqs = [Request(p, policy=POLICY, gen_length=GEN, block_length=BLOCK, early_stop=False) for p in ids]
    t = time.process_time()
    eng.run(reqs)
    return time.process_time() - t, eng.rounds


def text_run(gen: TextGenerator, prompts: list[str]) -> tuple[float, int]:
    """The same through the text layer (what the server's engine thread runs)."""
    rounds = gen.engine.rounds
    t = time.process_time()
    gen.generate(prompts, settings())
    return time.process_time() - t, gen.engine.rounds - rounds


def phase_profile(model, tok, prompts, batches, repeats: int) -> list[dict]:
    """Per batch size: CPU ms per round in each phase (median over ``repeats`` runs), engine only and
    through the text layer."""
    clock = PhaseClock()
    patch(clock, model)
    gen = TextGenerator(model, tok, max_batch=max(batches))
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    engine_run(model, ids[:2])  # warm-up
    out = []
    for b in batches:
        for layer in ("engine", "text"):
            runs = []
            for _ in range(repeats):
                clock.reset()
                if layer == "engine":
                    cpu, rounds = engine_run(model, ids[:b])
                else:
                    cpu, rounds = text_run(gen, prompts[:b])
                runs.append((cpu, rounds, dict(clock.totals)))
            cpu, rounds, totals = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            ms = {k: round(v / rounds * 1e3, 3) for k, v in totals.items() if layer == "text" or k != "text_layer"}
            out.append({
                "batch": b, "layer": layer, "rounds": rounds,
                "cpu_ms_per_round": round(cpu / rounds * 1e3, 3),
                "cpu_ms_per_row_step": round(cpu / rounds / b * 1e3, 3),
                "cpu_s_per_request": round(cpu / b, 4),
                "phases_ms_per_round": ms,
                "phases_share": {k: round(v / max(1e-12, sum(ms.values())), 3) for k, v in ms.items()},
                "cpu_s_per_request_runs": [round(r[0] / b, 4) for r in runs],
            })  # fmt: skip
            print(json.dumps(out[-1]), flush=True)
    return out


def python_profile(model, tok, prompts, batch: int, top: int = 25) -> dict:
    """cProfile of ``batch`` requests through the text layer: the functions with the most own time."""
    gen = TextGenerator(model, tok, max_batch=batch)
    gen.generate(prompts[:2], settings())
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    gen.generate(prompts[:batch], settings())
    prof.disable()
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    funcs = [{"function": f"{Path(f).name}:{line}({name})", "calls": v[1], "own_s": round(v[2], 4),
              "own_share": round(v[2] / total, 3), "cumulative_s": round(v[3], 4)}
             for (f, line, name), v in rows]  # fmt: skip
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return {"batch": batch, "total_own_s": round(total, 4), "top": funcs, "text": text.getvalue()}


OP_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "elementwise": ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::neg", "aten::rsqrt", "aten::mean",
                    "aten::cat", "aten::div", "aten::sub", "aten::where", "aten::copy_", "aten::_to_copy", "aten::fill_"),
}  # fmt: skip


def torch_profile(model, tok, prompts, batches) -> list[dict]:
    """The forward of each batch size under the torch profiler: own CPU time per op group."""
    from torch.profiler import ProfilerActivity, profile

    ids = tok(prompts[0], add_special_tokens=False)["input_ids"]
    n = len(ids) + GEN
    out = []
    for b in batches:
        x = torch.tensor([ids + [int(model.config.mask_token_id)] * GEN] * b)
        kw = {"start": len(ids), "end": n, "logits_start": len(ids), "logits_end": len(ids) + BLOCK}
        with torch.no_grad():
            model.denoise(x, None, **kw)
            reps = max(4, 64 // b)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(reps):
                    model.denoise(x, None, **kw)
        groups = dict.fromkeys([*OP_GROUPS, "other"], 0.0)
        ops = []
        for e in prof.key_averages():
            own = e.self_cpu_time_total / 1e3 / reps  # ms per forward
            group = next((g for g, names in OP_GROUPS.items() if e.key.startswith(names)), "other")
            groups[group] += own
            ops.append((own, e.key, e.count // reps))
        total = sum(groups.values())
        out.append({
            "batch": b, "tokens": n, "ms_per_forward": round(total, 3), "ms_per_row": round(total / b, 3),
            "groups_share": {g: round(v / total, 3) for g, v in groups.items()},
            "top_ops": [{"op": k, "ms_per_forward": round(v, 3), "calls": c} for v, k, c in sorted(ops, reverse=True)[:10]],
        })  # fmt: skip
        print(json.dumps({k: v for k, v in out[-1].items() if k != "top_ops"}), flush=True)
    return out


def markdown(result: dict) -> str:
    lines = [f"# One engine round at batch 1, 8, 32 ({result['label']})", "",
             f"Setting: {result['setting']}. Load: 1-min average {result['load_average_1min'][0]} -> "
             f"{result['load_average_1min'][1]} on {result['host']['cpu_count']} cores; CPU clock of this process, "
             f"one torch thread, pinned: {result['host']['pinned']}.", "",
             "CPU ms per round by phase (exclusive; median run of " + str(result["repeats"]) + "):", "",
             "| batch | layer | per round | per row-step | s/request | " + " | ".join(PHASES) + " |",
             "|---|---|---|---|---|" + "---|" * len(PHASES)]  # fmt: skip
    for r in result["phases"]:
        ph = r["phases_ms_per_round"]
        cells = " | ".join(f"{ph[p]:.2f} ({r['phases_share'][p] * 100:.0f}%)" if p in ph else "–" for p in PHASES)
        lines.append(f"| {r['batch']} | {r['layer']} | {r['cpu_ms_per_round']:.2f} | {r['cpu_ms_per_row_step']:.3f} "
                     f"| {r['cpu_s_per_request']:.3f} | {cells} |")  # fmt: skip
    lines += ["", "The forward under the torch profiler (own CPU time per op group):", "",
              "| batch | tokens | ms/forward | ms/row | matmul | attention | element-wise | other |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in result["torch"]:
        g = t["groups_share"]
        lines.append(f"| {t['batch']} | {t['tokens']} | {t['ms_per_forward']:.2f} | {t['ms_per_row']:.3f} | "
                     f"{g['matmul'] * 100:.0f}% | {g['attention'] * 100:.0f}% | {g['elementwise'] * 100:.0f}% | {g['other'] * 100:.0f}% |")  # fmt: skip
    py = result["python"]
    lines += ["", f"cProfile, batch {py['batch']} through the text layer (own time, top 12 of {py['total_own_s']} s):", "",
              "| function | calls | own s | share |", "|---|---|---|---|"]  # fmt: skip
    for f in py["top"][:12]:
        lines.append(f"| `{f['function']}` | {f['calls']} | {f['own_s']:.3f} | {f['own_share'] * 100:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--label", default="", help="suffix of the output files (e.g. before)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    model, tok, prompts = load()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    torch_rows = torch_profile(model, tok, prompts, batches)
    python = python_profile(model, tok, prompts, max(batches))
    phases = phase_profile(model, tok, prompts, batches, args.repeats)  # last: it wraps the functions
    pinned = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    result = {
        "label": args.label or "current",
        "setting": f"dparallel student, {POLICY}, {GEN} tokens in blocks of {BLOCK}, no early stop, prompts of the "
                   "embedded arith task (all 10 tokens)",
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "pinned": pinned},
        "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "repeats": args.repeats, "seconds": round(time.perf_counter() - t0, 1),
        "phases": phases, "torch": torch_rows, "python": {k: v for k, v in python.items() if k != "text"},
    }  # fmt: skip
    suffix = f"_{args.label}" if args.label else ""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_round{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"profile_round{suffix}.md").write_text(markdown(result) + "\n```\n" + python["text"] + "```\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
