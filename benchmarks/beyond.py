"""Past the seeds on the embedded task: do d3LLM and DMax students beat dParallel, CD4LM and the teacher?

Every student is distilled from the same teacher, rollout and budget, once per training seed
(``STUDENTS/<method>-s<seed>``, e.g. made by the commands in docs/embedded.md). Each model is decoded with
every setting of every policy of ``fewstep demo --sweep full`` on the same held-out problems, all with the
same stopping rule (d3LLM's end-of-text stop, ``eos_fill``), and the teacher's one-token-per-step
baseline (no early stop) sets the accuracy bar: a setting counts when it is within ``--tolerance`` of it.

Targets (issues 20 and 21), per seed, then mean and spread:
  (a) the best student needs >= 2.5x fewer forwards than the teacher's best training-free setting;
  (b) the d3LLM student reaches >= 1.3x the TPF of the dParallel student at equal accuracy (each at its
      fewest-forwards counting setting);
  (c) multi-block decoding beats single-block decoding for every student (fewer forwards among counting
      settings than the same entropy gate on one block);
  (d) the DMax student needs fewer forwards than every other student and >= 2.5x fewer than the teacher.

  python benchmarks/beyond.py --students runs/students --n 256 --seeds 0,1,2 --workers 2
writes benchmarks/results/beyond.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

METHODS = ("dparallel", "cd4lm", "d3llm", "dmax")
SINGLE_BLOCK_GATE = "entropy"  # the gate multi-block decoding opens several blocks with


def _evaluate(job: tuple[str, str, int, int, str, bool]) -> list[dict]:
    """Every demo setting of one model (run in a worker process with one thread)."""
    name, folder, n, batch, sweep, with_baseline = job
    import torch

    torch.set_num_threads(1)
    from fewstep.eval.demo import BASELINE, policy_families, run_demo
    from fewstep.tasks import generate_problems

    problems = generate_problems("test", n, seed=0)
    families = [f for f in policy_families(sweep=sweep) if f.key != BASELINE]
    rows = run_demo([(name, Path(folder))], problems, batch_size=batch, families=families, stops=("eos",))
    if with_baseline:
        base = [f for f in policy_families(sweep=sweep) if f.key == BASELINE]
        rows = run_demo([(name, Path(folder))], problems, batch_size=batch, families=base, stops=("none", "eos")) + rows
    return rows


def _best(rows: list[dict], model: str, floor: float, families: set[str] | None = None) -> dict | None:
    ok = [
        r
        for r in rows
        if r["model"] == model
        and r["stop"] == "eos"
        and r["accuracy"] >= floor - 1e-12
        and (families is None or r["family"] in families)
    ]
    return min(ok, key=lambda r: (r["mean_nfe"], -r["accuracy"])) if ok else None


def _brief(row: dict | None) -> dict | None:
    if row is None:
        return None
    keys = ("policy", "accuracy", "mean_nfe", "tokens_per_forward", "revised_fraction")
    return {k: row[k] for k in keys}


def judge(rows: list[dict], seed: int, methods: tuple[str, ...], tolerance: float) -> dict:
    """The four targets for the students of one seed (``<method>-s<seed>``) against the teacher."""
    from fewstep.eval.demo import BASELINE

    base = next(r for r in rows if r["model"] == "teacher" and r["policy"] == BASELINE and r["stop"] == "none")
    floor = base["accuracy"] - tolerance
    single = {f for f in {r["family"] for r in rows} if f not in (BASELINE, "multiblock")}
    teacher = _best(rows, "teacher", floor, single | {"multiblock"})
    out: dict = {"seed": seed, "baseline_accuracy": base["accuracy"], "teacher_best": _brief(teacher), "students": {}}
    for m in methods:
        name = f"{m}-s{seed}"
        best = _best(rows, name, floor)
        multi = _best(rows, name, floor, {"multiblock"})
        gate = _best(rows, name, floor, {SINGLE_BLOCK_GATE})
        any_single = _best(rows, name, floor, single)
        out["students"][m] = {
            "best": _brief(best),
            "vs_teacher": teacher["mean_nfe"] / best["mean_nfe"] if best and teacher else None,
            "multiblock": _brief(multi),
            "single_block_same_gate": _brief(gate),
            "single_block_any": _brief(any_single),
            "multi_vs_single": gate["mean_nfe"] / multi["mean_nfe"] if multi and gate else None,
            "multi_vs_any_single": any_single["mean_nfe"] / multi["mean_nfe"] if multi and any_single else None,
        }
    s = out["students"]
    ratios = [v["vs_teacher"] for v in s.values() if v["vs_teacher"] is not None]
    out["a_best_vs_teacher"] = max(ratios) if ratios else None
    if "d3llm" in s and "dparallel" in s and s["d3llm"]["best"] and s["dparallel"]["best"]:
        out["b_d3llm_tpf_vs_dparallel"] = (
            s["d3llm"]["best"]["tokens_per_forward"] / s["dparallel"]["best"]["tokens_per_forward"]
        )
    multi = {m: v["multi_vs_single"] for m, v in s.items()}
    out["c_multi_vs_single"] = multi
    if "dmax" in s and s["dmax"]["best"]:
        others = [v["best"]["mean_nfe"] for m, v in s.items() if m != "dmax" and v["best"]]
        out["d_dmax_nfe"] = s["dmax"]["best"]["mean_nfe"]
        out["d_dmax_vs_best_other"] = min(others) / s["dmax"]["best"]["mean_nfe"] if others else None
        out["d_dmax_vs_teacher"] = s["dmax"]["vs_teacher"]
    return out


def _stats(values: list[float | None]) -> dict:
    got = [v for v in values if v is not None]
    if not got:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    sd = statistics.stdev(got) if len(got) > 1 else 0.0
    return {"mean": statistics.fmean(got), "std": sd, "min": min(got), "max": max(got), "n": len(got)}


def summarize(per_seed: list[dict], methods: tuple[str, ...]) -> dict:
    """Mean and spread over seeds, and whether each target is met (on the mean, and on every seed)."""
    a = _stats([p["a_best_vs_teacher"] for p in per_seed])
    b = _stats([p.get("b_d3llm_tpf_vs_dparallel") for p in per_seed])
    c = {m: _stats([p["c_multi_vs_single"].get(m) for p in per_seed]) for m in methods}
    d_other = _stats([p.get("d_dmax_vs_best_other") for p in per_seed])
    d_teacher = _stats([p.get("d_dmax_vs_teacher") for p in per_seed])

    def met(s: dict, bar: float, strict: bool = False) -> bool | None:
        if s["mean"] is None:
            return None
        return s["mean"] > bar if strict else s["mean"] >= bar

    return {
        "a_best_student_vs_teacher": {**a, "target": 2.5, "met": met(a, 2.5)},
        "b_d3llm_tpf_vs_dparallel": {**b, "target": 1.3, "met": met(b, 1.3)},
        "c_multi_vs_single_block": {m: {**s, "target": "> 1", "met": met(s, 1.0, strict=True)} for m, s in c.items()},
        "d_dmax_vs_best_other_student": {**d_other, "target": "> 1", "met": met(d_other, 1.0, strict=True)},
        "d_dmax_vs_teacher": {**d_teacher, "target": 2.5, "met": met(d_teacher, 2.5)},
    }


def _fmt(s: dict) -> str:
    if s.get("mean") is None:
        return "n/a"
    flag = {True: "met", False: "MISSED", None: ""}[s.get("met")]
    return f"{s['mean']:.2f} +- {s['std']:.2f} (min {s['min']:.2f}, n {s['n']}) target {s['target']}: {flag}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", required=True, help="folder of <method>-s<seed> student checkpoints")
    ap.add_argument("--teacher", default="teacher", help="teacher folder or shipped name (default: teacher)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n", type=int, default=256, help="held-out problems (seed 0)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tolerance", type=float, default=0.01, help="accuracy below the teacher baseline that counts")
    ap.add_argument("--sweep", choices=("quick", "full"), default="full")
    ap.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "beyond.json"))
    args = ap.parse_args(argv)

    from fewstep.assets import resolve_model
    from fewstep.eval.demo import add_aup

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    seeds = [int(s) for s in args.seeds.split(",")]
    students = Path(args.students)
    missing = [f"{m}-s{s}" for s in seeds for m in methods if not (students / f"{m}-s{s}" / "config.json").is_file()]
    if missing:
        sys.exit(f"beyond.py: missing student checkpoints in {students}: {', '.join(missing)}")
    jobs = [("teacher", str(resolve_model(args.teacher)), args.n, args.batch_size, args.sweep, True)]
    jobs += [
        (f"{m}-s{s}", str(students / f"{m}-s{s}"), args.n, args.batch_size, args.sweep, False)
        for s in seeds
        for m in methods
    ]
    t0 = time.time()
    rows: list[dict] = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for job, got in zip(jobs, pool.map(_evaluate, jobs)):
            rows += got
            print(f"  {job[0]}: {len(got)} settings ({time.time() - t0:.0f} s)", flush=True)
    add_aup(rows)
    per_seed = [judge(rows, s, methods, args.tolerance) for s in seeds]
    summary = summarize(per_seed, methods)
    result = {
        "setting": {
            "task": "arith (fewstep.tasks)",
            "n_problems": args.n,
            "stop": "eos_fill (d3LLM's end-of-text stop) on every compared row",
            "accuracy_bar": f"teacher one-token-per-step baseline (no early stop) - {args.tolerance}",
            "sweep": args.sweep,
            "methods": methods,
            "seeds": seeds,
            "students": str(students),
        },
        "summary": summary,
        "per_seed": per_seed,
        "seconds": round(time.time() - t0, 1),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for key, s in summary.items():
        if key == "c_multi_vs_single_block":
            for m, sm in s.items():
                print(f"{key} [{m}]: {_fmt(sm)}")
        else:
            print(f"{key}: {_fmt(s)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
