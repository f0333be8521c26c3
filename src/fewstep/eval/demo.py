"""The embedded demo: every shipped model x every decoding policy on held-out problems, table and Pareto plot.

``fewstep demo`` is a thin CLI over :func:`run_demo`, :func:`format_table` and :func:`plot_pareto`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewstep.assets import shipped_models  # noqa: F401  (re-exported: the demo's model list)
from fewstep.tasks import BLOCK_LENGTH, GEN_LENGTH, NAME

BASELINE = "baseline"


@dataclass(frozen=True)
class PolicyFamily:
    """A decoding rule and the settings swept for the Pareto plot (``default`` goes in the table)."""

    key: str
    label: str
    specs: tuple[str, ...]
    default: str


def policy_families(gen_length: int = GEN_LENGTH) -> list[PolicyFamily]:
    """The policies the demo runs: each rule with its authors' default (shown in the table) and a sweep
    around it, finest where accuracy starts to drop (the knee that decides the fewest-NFE comparison)."""
    steps = [s for s in (16, 8, 4, 2) if s < gen_length]
    return [
        PolicyFamily(BASELINE, "LLaDA, 1 token per step", (BASELINE,), BASELINE),
        PolicyFamily(
            "llada", "LLaDA, fixed fewer steps", tuple(f"llada:steps={s}" for s in steps), f"llada:steps={steps[0]}"
        ),
        PolicyFamily(
            "threshold",
            "Fast-dLLM confidence threshold",
            tuple(f"threshold:{t}" for t in (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.5)),
            "threshold:0.9",
        ),
        PolicyFamily(
            "entropy",
            "dParallel entropy threshold",
            tuple(f"entropy:{t}" for t in (0.2, 0.35, 0.4, 0.45, 0.5, 0.6, 0.8)),
            "entropy:0.5",
        ),
        PolicyFamily(
            "cad", "CD4LM confidence-adaptive", tuple(f"cad:{t}" for t in (0.95, 0.9, 0.8, 0.7, 0.5)), "cad:0.95"
        ),
    ]


def engine_spec(spec: str, gen_length: int) -> str:
    """The decoding-engine policy string of a demo policy name (the baseline is LLaDA with one token per step)."""
    return f"llada:steps={gen_length}" if spec == BASELINE else spec


def run_demo(
    models: Sequence[tuple[str, Path]],
    problems: Sequence[Any],
    *,
    batch_size: int = 64,
    device: str = "cpu",
    gen_length: int = GEN_LENGTH,
    block_length: int | None = None,
    families: Sequence[PolicyFamily] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (model, policy setting): accuracy, mean NFE, tokens per forward (TPF: answer tokens before
    the first EOS / NFE), positions per forward (committed positions / NFE), AUP, seconds, speedups.

    Speedups are over the teacher's baseline row (the first model's), in NFE and in wall time. ``aup`` is
    d3LLM's AUP of the row's model and policy family (every setting of the family, over TPF), with
    ``y_max`` the best accuracy of all rows; the baseline family (one point) gets TPF x accuracy.
    """
    from fewstep.eval.embedded import evaluate_policy
    from fewstep.models import load_model, load_tokenizer

    block_length = block_length or BLOCK_LENGTH
    families = list(families or policy_families(gen_length))
    rows: list[dict[str, Any]] = []
    for name, folder in models:
        model = load_model(folder, device=device)
        tok = load_tokenizer(folder)
        for fam in families:
            for spec in fam.specs:

                def tick(k: int, _n=name, _s=spec) -> None:
                    if progress is not None:
                        progress(f"{_n} {_s}", k)

                res, _ = evaluate_policy(
                    model,
                    tok,
                    problems,
                    engine_spec(spec, gen_length),
                    gen_length=gen_length,
                    block_length=block_length,
                    batch_size=batch_size,
                    progress=tick,
                )
                rows.append(
                    {
                        "model": name,
                        "policy": spec,
                        "family": fam.key,
                        "accuracy": res.accuracy,
                        "mean_nfe": res.mean_nfe,
                        "tokens_per_forward": res.tokens_per_forward,
                        "positions_per_forward": res.positions_per_forward,
                        "seconds": res.seconds,
                    }
                )
    base = next((r for r in rows if r["policy"] == BASELINE), rows[0])
    for r in rows:
        r["speedup_nfe"] = base["mean_nfe"] / r["mean_nfe"] if r["mean_nfe"] else math.inf
        r["speedup_wall"] = base["seconds"] / r["seconds"] if r["seconds"] else math.inf
    add_aup(rows)
    return rows


def add_aup(rows: Sequence[dict[str, Any]], y_max: float | None = None) -> dict[tuple[str, str], float | None]:
    """Set each row's ``aup``: d3LLM's AUP (:func:`fewstep.eval.sweep.aup`) over tokens per forward of every
    row of its model and policy family, ``y_max`` (in %) the best accuracy of all rows by default. Returns
    the AUP per ``(model, family)`` (None where no row ran a forward)."""
    from fewstep.eval.sweep import aup

    top = max(100 * r["accuracy"] for r in rows) if y_max is None and rows else y_max
    scores: dict[tuple[str, str], float | None] = {}
    for key in dict.fromkeys((r["model"], r.get("family", r["policy"])) for r in rows):
        pts = [
            (r["tokens_per_forward"], 100 * r["accuracy"])
            for r in rows
            if (r["model"], r.get("family", r["policy"])) == key and r["tokens_per_forward"] > 0
        ]
        scores[key] = aup(pts, y_max=top) if pts else None
    for r in rows:
        r["aup"] = scores[(r["model"], r.get("family", r["policy"]))]
    return scores


def table_rows(rows: Sequence[dict[str, Any]], families: Sequence[PolicyFamily] | None = None) -> list[dict]:
    """The rows shown in the printed table: per model, each family's default setting and 1 step per block."""
    families = list(families or policy_families())
    shown = {f.default for f in families}
    shown |= {f"llada:steps={GEN_LENGTH // BLOCK_LENGTH}"}
    return [r for r in rows if r["policy"] in shown]


def fewest_nfe_at_baseline_accuracy(rows: Sequence[dict[str, Any]], tolerance: float = 0.01) -> list[dict[str, Any]]:
    """Per model, the setting with the fewest mean NFE whose accuracy is within ``tolerance`` of the
    teacher's one-token-per-step baseline (None when no setting gets there).

    Each entry: ``model``, ``row`` (or None), ``baseline_accuracy`` and ``vs_teacher``: how many times
    fewer NFE than the teacher's best training-free setting at that accuracy (the teacher row itself: 1).
    """
    if not rows:
        return []
    teacher = rows[0]["model"]
    base = next((r for r in rows if r["model"] == teacher and r["policy"] == BASELINE), rows[0])
    floor = base["accuracy"] - tolerance
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == model and r["accuracy"] >= floor - 1e-12]
        out.append({"model": model, "row": min(ok, key=lambda r: r["mean_nfe"]) if ok else None})
    best_teacher = out[0]["row"]
    for entry in out:
        row = entry["row"]
        entry["baseline_accuracy"] = base["accuracy"]
        entry["vs_teacher"] = best_teacher["mean_nfe"] / row["mean_nfe"] if row and best_teacher else None
    return out


def format_summary(rows: Sequence[dict[str, Any]], tolerance: float = 0.01) -> str:
    """One line per model: its fewest-NFE setting within ``tolerance`` of the teacher baseline's accuracy."""
    lines = []
    summary = fewest_nfe_at_baseline_accuracy(rows, tolerance)
    for entry in summary:
        row = entry["row"]
        if row is None:
            lines.append(f"{entry['model']}: no setting within {100 * tolerance:.0f} point of the baseline")
            continue
        extra = "" if entry is summary[0] else f", {entry['vs_teacher']:.2f}x fewer than the teacher's best"
        best = max(
            (r for r in rows if r["model"] == entry["model"] and r.get("aup") is not None),
            default=None,
            key=lambda r: r["aup"],
        )
        score = "" if best is None else f"; best AUP {best['aup']:.1f} ({best.get('family', best['policy'])})"
        tpf = "" if row.get("tokens_per_forward") is None else f", {row['tokens_per_forward']:.2f} tokens/forward"
        lines.append(
            f"{entry['model']}: {row['policy']} {100 * row['accuracy']:.1f}% at {row['mean_nfe']:.2f} NFE{tpf} "
            f"({row['speedup_nfe']:.1f}x fewer NFE than the baseline{extra}){score}"
        )
    return "\n".join(lines)


#: what the two parallelism columns of the table mean (printed under it)
FIGURES_LEGEND = (
    "TPF: tokens per forward = answer tokens before the first EOS / NFE (d3LLM's figure, what AUP uses); "
    "pos/fwd: committed positions / NFE (EOS padding included)"
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table (also used in docs/results.md), with :data:`FIGURES_LEGEND` under it."""
    head = ["model", "policy", "accuracy", "mean NFE", "TPF", "pos/fwd", "seconds", "speedup NFE", "speedup wall"]
    lines = [head]
    for r in rows:
        lines.append(
            [
                r["model"],
                r["policy"],
                f"{100 * r['accuracy']:.1f}%",
                f"{r['mean_nfe']:.2f}",
                f"{r['tokens_per_forward']:.2f}",
                f"{r['positions_per_forward']:.2f}",
                f"{r['seconds']:.1f}",
                f"{r['speedup_nfe']:.1f}x",
                f"{r['speedup_wall']:.1f}x",
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for j, line in enumerate(lines):
        out.append(
            "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
        )
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append(FIGURES_LEGEND)
    return "\n".join(out)


_FAMILY_COLORS = {"llada": "tab:gray", "threshold": "tab:blue", "entropy": "tab:green", "cad": "tab:red"}
_MODEL_COLORS = ["black", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:cyan"]


def _mark(ax, row: dict[str, Any] | None, label: str, color: str = "black", size: int = 220, line: bool = True) -> None:
    """A star at a one-token-per-step row (and, for the teacher's, a dashed line at its accuracy)."""
    if row is None:
        return
    ax.scatter([row["mean_nfe"]], [100 * row["accuracy"]], marker="*", s=size, color=color, zorder=5, label=label)
    if line:
        ax.axhline(100 * row["accuracy"], color="black", lw=0.8, ls="--", alpha=0.5)


def _finish_panel(ax, title: str, lo: float, hi: float) -> None:
    from fewstep.plotting import log_nfe_axis

    log_nfe_axis(ax, lo, hi)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")


def _frontier_panel(ax, rows: Sequence[dict[str, Any]], models: list[str], base: dict[str, Any] | None) -> None:
    """Every model's Pareto frontier over all its policy settings, zoomed on the accurate region."""
    from fewstep.eval.sweep import pareto_frontier

    starts = []  # accuracy where each frontier begins (its fewest-NFE point)
    for i, model in enumerate(models):
        pts = [(r["mean_nfe"], 100 * r["accuracy"]) for r in rows if r["model"] == model and r["policy"] != BASELINE]
        front = [pts[j] for j in pareto_frontier(pts)]
        if front:
            ax.plot(*zip(*front), marker="o", ms=4, lw=1.8, color=_MODEL_COLORS[i % len(_MODEL_COLORS)], label=model)
            starts.append(front[0][1])
    _mark(ax, base, f"{models[0]} baseline (1 token/step)")
    # zoom on the accurate region: no lower than 30 points under the baseline
    floor = max(min(starts, default=100.0), 100 * base["accuracy"] - 30 if base else 0.0)
    ax.set_ylim(max(0.0, floor - 3), 101.5)


def _model_panel(ax, rows: Sequence[dict[str, Any]], model: str, base: dict[str, Any] | None, first: str) -> None:
    """One model: a curve per policy family sweeping its threshold, and its own 1-token-per-step point."""
    mine = [r for r in rows if r["model"] == model]
    for fam in (f for f in policy_families() if f.key != BASELINE):
        pts = sorted((r["mean_nfe"], 100 * r["accuracy"]) for r in mine if r["family"] == fam.key)
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=4, lw=1.6, color=_FAMILY_COLORS.get(fam.key), label=fam.label)
    _mark(ax, base, f"{first} baseline (1 token/step)")
    own = next((r for r in mine if r["policy"] == BASELINE), None)
    if own is not base:
        _mark(ax, own, f"{model} at 1 token/step", color="tab:purple", size=120, line=False)
    ax.set_ylim(-3, 103)


def plot_pareto(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Accuracy against mean NFE (log scale). First panel: every model's Pareto frontier over all its policy
    settings, zoomed on the accurate region; then one panel per model with a curve per policy family
    sweeping its threshold. The teacher's one-token-per-step baseline is marked everywhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    base = next((r for r in rows if r["policy"] == BASELINE and r["model"] == models[0]), None)
    n = len(models) + 1
    cols = min(n, 3)
    fig, axes = plt.subplots(
        math.ceil(n / cols), cols, figsize=(5.6 * cols, 4.4 * math.ceil(n / cols)), dpi=110, squeeze=False
    )
    nfes = [r["mean_nfe"] for r in rows if r["mean_nfe"] > 0]
    lo, hi = min(nfes) / 1.2, max(nfes) * 1.25
    panels = list(axes.flat)
    _frontier_panel(panels[0], rows, models, base)
    _finish_panel(panels[0], "every model: best setting of any policy", lo, hi)
    for ax, model in zip(panels[1:], models):
        _model_panel(ax, rows, model, base, models[0])
        _finish_panel(ax, model, lo, hi)
    for ax in panels[n:]:
        ax.axis("off")
    fig.suptitle(title or f"{NAME}: accuracy vs NFE (top-left is better)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
