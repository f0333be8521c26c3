"""`fewstep sweep` as a library: a policy over a grid of values (and models), the accuracy/NFE Pareto
frontier as a PNG, and d3LLM's AUP score.

Two parallelism figures are reported per point, named apart: **tokens per forward** (``tokens_per_forward``,
TPF: answer tokens before the first EOS / NFE, d3LLM's figure and the one AUP uses) and **positions per
forward** (``positions_per_forward``: committed canvas positions / NFE, EOS padding included).

AUP (Accuracy Under Parallelism; d3LLM's leaderboard metric, ``AUP_leaderboard/aup_utils.py`` of
``hao-ai-lab/d3LLM``): for points ``(rho_i, y_i)`` sorted by parallelism ``rho`` (tokens per forward) with
accuracy ``y`` in percent, keep the points with ``y_i >= y_1 - 5`` (``y_1``: the accuracy of the least
parallel point) and compute

    AUP = rho_1 y_1 + 1/2 sum_{i>=2} (rho_i - rho_{i-1}) (y_i W(y_i) + y_{i-1} W(y_{i-1})),
    W(y) = min(exp(-alpha (1 - y / y_max)), 1),  alpha = 3,

where ``y_max`` is the highest accuracy achieved on the task (default: the best point of the sweep).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fewstep.eval.runner import EvalSettings, run_eval

AUP_ALPHA = 3.0
AUP_WINDOW = 5.0  # points more than 5 accuracy points below the least parallel one are dropped
X_AXES = {"nfe": "mean_nfe", "tpf": "tokens_per_forward"}  # --x-axis of the sweep plot


def aup(points: Sequence[tuple[float, float]], y_max: float | None = None, alpha: float = AUP_ALPHA) -> float:
    """d3LLM's AUP of ``(tokens per forward, accuracy in %)`` points (formula in the module docstring).

    As ``aup_utils.get_aup``: points sorted by tokens per forward (stably: equal ones keep their order), the
    first term unweighted, ``y_max`` the best accuracy of every method compared (default: of these points).
    Where the reference asserts that no point lies more than 5 points below the first, this drops such
    points, as its documented rule says. Tokens per forward must be positive."""
    pts = sorted(((float(r), float(y)) for r, y in points), key=lambda p: p[0])
    if not pts:
        raise ValueError("AUP needs at least one (tokens per forward, accuracy) point")
    if pts[0][0] <= 0:
        raise ValueError(f"AUP needs positive tokens per forward; got {pts[0][0]}")
    y_min = pts[0][1] - AUP_WINDOW
    pts = [p for p in pts if p[1] >= y_min]
    top = max(y for _, y in pts) if y_max is None else float(y_max)
    if top <= 0:
        return 0.0

    def weight(y: float) -> float:
        return min(math.exp(-alpha * (1.0 - y / top)), 1.0)

    r1, y1 = pts[0]
    total = r1 * y1
    for (r0, y0), (r, y) in itertools.pairwise(pts):
        total += 0.5 * (r - r0) * (y * weight(y) + y0 * weight(y0))
    return total


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower NFE, higher accuracy), by NFE."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    frontier, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            frontier.append(i)
            best = points[i][1]
    return frontier


@dataclass
class SweepPoint:
    model: str
    policy: str
    value: str | None  # the swept value (None for the baseline)
    out: str
    accuracy: float
    mean_nfe: float
    tokens_per_forward: float  # TPF: answer tokens before the first EOS / NFE
    positions_per_forward: float  # committed positions / NFE (EOS padding included)
    latency_per_sample_s: float
    speedup: float | None
    n: int


def policy_spec(policy: str, value: str) -> str:
    """``threshold`` + ``0.7`` -> ``threshold:threshold=0.7``; extra ``key=value`` options are kept."""
    from fewstep.decoding.policies import POLICIES

    name, _, rest = policy.partition(":")
    cls = POLICIES.get(name.strip().lower().replace("_", "-"))
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; valid names: {', '.join(POLICIES)}")
    if cls.positional is None:
        raise ValueError(f"policy {cls.name!r} has no main option to sweep")
    extra = [p for p in rest.split(",") if p.strip()]
    return f"{cls.name}:" + ",".join([f"{cls.positional}={value}", *extra])


def _tag(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).resolve().name) or "model"


def run_sweep(
    base: EvalSettings,
    models: Sequence[str],
    policy: str,
    values: Sequence[str],
    out: str | Path,
    baseline_policy: str | None = None,
    y_max: float | None = None,
    x_axis: str = "nfe",
) -> dict[str, Any]:
    """Evaluate every (model, value) (each resumable on its own), then write sweep.json and frontier.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points: list[SweepPoint] = []
    tags = {m: _tag(m) for m in models}
    if len(set(tags.values())) < len(tags):
        tags = {m: f"{i}-{t}" for i, (m, t) in enumerate(tags.items())}
    for model in models:
        baseline_dir = None
        if baseline_policy:
            baseline_dir = out / tags[model] / "baseline"
            s = run_eval(replace(base, model=model, policy=baseline_policy, out=str(baseline_dir), baseline=None))
            points.append(_point(model, baseline_policy, None, baseline_dir, s))
        for value in values:
            spec = policy_spec(policy, value)
            run_dir = out / tags[model] / re.sub(r"[^A-Za-z0-9._=-]+", "_", spec)
            settings = replace(
                base,
                model=model,
                policy=spec,
                out=str(run_dir),
                baseline=str(baseline_dir) if baseline_dir else None,
            )
            points.append(_point(model, spec, value, run_dir, run_eval(settings)))
    result = summarize_sweep(points, base.task, policy, y_max)
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_frontier(points, result, out / "frontier.png", base.task, policy, x_axis)
    result["png"] = str(out / "frontier.png")
    return result


def _point(model: str, spec: str, value: str | None, run_dir: Path, s: dict[str, Any]) -> SweepPoint:
    return SweepPoint(
        model=model,
        policy=spec,
        value=value,
        out=str(run_dir),
        accuracy=s["accuracy"],
        mean_nfe=s["mean_nfe"],
        tokens_per_forward=s["tokens_per_forward"],
        positions_per_forward=s["positions_per_forward"],
        latency_per_sample_s=s["latency_per_sample_s"],
        speedup=s.get("speedup"),
        n=s["n"],
    )


def summarize_sweep(points: Sequence[SweepPoint], task: str, policy: str, y_max: float | None) -> dict[str, Any]:
    """Per model: its points, the Pareto frontier (accuracy vs NFE) and AUP over all its points."""
    models: dict[str, Any] = {}
    top = y_max if y_max is not None else max(100 * p.accuracy for p in points)
    for model in dict.fromkeys(p.model for p in points):
        mine = [p for p in points if p.model == model]
        front = pareto_frontier([(p.mean_nfe, p.accuracy) for p in mine])
        models[model] = {
            "points": [vars(p) for p in mine],
            "frontier": [mine[i].policy for i in front],
            # AUP of the swept curve over tokens per forward (the baseline run is a point of its own)
            "aup": _aup_of([p for p in mine if p.value is not None], top),
        }
    return {
        "task": task,
        "policy": policy,
        "aup_y_max": top,
        "aup_alpha": AUP_ALPHA,
        "aup_x": "tokens_per_forward",
        "models": models,
    }


def _aup_of(points: Sequence[SweepPoint], y_max: float) -> float | None:
    """AUP over the points' tokens per forward (None when no point ran a forward)."""
    pts = [(p.tokens_per_forward, 100 * p.accuracy) for p in points if p.tokens_per_forward]
    return aup(pts, y_max=y_max) if pts else None


def _front(points: Sequence[SweepPoint], x_axis: str) -> list[SweepPoint]:
    """The Pareto frontier on the plot's axes (fewer NFE, or more tokens per forward, and higher accuracy),
    by increasing x."""
    key = X_AXES[x_axis]
    sign = 1.0 if x_axis == "nfe" else -1.0
    front = [points[i] for i in pareto_frontier([(sign * getattr(p, key), p.accuracy) for p in points])]
    return sorted(front, key=lambda p: getattr(p, key))


def plot_frontier(
    points: Sequence[SweepPoint], result: dict[str, Any], path: Path, task: str, policy: str, x_axis: str = "nfe"
) -> None:
    """Accuracy against mean NFE (``x_axis="nfe"``) or tokens per forward (``"tpf"``), one colour per model,
    the Pareto frontier as a step line, values annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x_axis not in X_AXES:
        raise ValueError(f"x_axis must be one of {', '.join(X_AXES)}; got {x_axis!r}")
    key = X_AXES[x_axis]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    top = 0.0
    for k, (model, info) in enumerate(result["models"].items()):
        colour = f"C{k}"
        mine = [p for p in points if p.model == model]
        front = _front(mine, x_axis)
        xs, ys = [getattr(p, key) for p in front], [100 * p.accuracy for p in front]
        ax.step(xs, ys, where="post" if x_axis == "nfe" else "pre", color=colour, alpha=0.5, lw=1.5)
        for p in mine:
            y = 100 * p.accuracy
            top = max(top, y)
            on_front = p in front
            marker = "s" if p.value is None else "o"
            ax.scatter([getattr(p, key)], [y], color=colour, marker=marker, zorder=3, s=40 if on_front else 22)
            if on_front and p.value is not None:  # dominated points are in the table; labels would collide
                ax.annotate(p.value, (getattr(p, key), y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        score = "-" if info["aup"] is None else f"{info['aup']:.1f}"
        ax.plot([], [], color=colour, marker="o", label=f"{Path(model).name} (AUP {score})")
    ax.scatter([], [], color="gray", marker="s", label="baseline policy")
    ax.set_ylim(0, min(103.0, top + 8.0) if top > 0 else 10.0)
    xs = [getattr(p, key) for p in points if getattr(p, key)]
    if x_axis == "tpf":
        ax.set_xlabel("tokens per forward (answer tokens before the first EOS / NFE; higher is faster)")
    elif xs and max(xs) / min(xs) > 8:
        from fewstep.plotting import log_nfe_axis

        log_nfe_axis(ax, min(xs) / 1.2, max(xs) * 1.25, "mean NFE per sample (log scale, lower is faster)")
    else:
        ax.set_xlabel("mean NFE per sample (lower is faster)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{task}: {policy} sweep (line: Pareto frontier, labels: {policy} values)", fontsize=10, pad=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if x_axis == "nfe" else "lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
