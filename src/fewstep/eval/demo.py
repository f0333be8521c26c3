"""The embedded demo: every shipped model x every decoding policy on held-out problems, table and Pareto plot.

``fewstep demo`` is a thin CLI over :func:`run_demo`, :func:`format_table` and :func:`plot_pareto`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewstep.assets import shipped_models  # noqa: F401  (re-exported: the demo's model list)
from fewstep.tasks import BLOCK_LENGTH, GEN_LENGTH, NAME

BASELINE = "baseline"


#: the two stopping rules every setting runs with: ``none`` decodes every block of the canvas (the reference
#: samplers' NFE), ``eos`` is d3LLM's end-of-text stop (``eos_fill``: after the first committed EOS the rest
#: of the row is EOS and no forward is spent on it). Comparisons are always made within one rule.
STOPS = ("none", "eos")


@dataclass(frozen=True)
class PolicyFamily:
    """A decoding rule and the settings swept for the Pareto plot (``default`` goes in the table)."""

    key: str
    label: str
    specs: tuple[str, ...]
    default: str
    multi_block: bool = False  # several blocks open at once (d3LLM) rather than one semi-AR block
    trained_for: str | None = None  # the distillation method the rule needs (``run_demo(native_only=True)``)


def policy_families(
    gen_length: int = GEN_LENGTH, block_length: int = BLOCK_LENGTH, sweep: str = "full"
) -> list[PolicyFamily]:
    """The policies the demo runs: each rule with its authors' default (shown in the table) and, for
    ``sweep="full"``, a sweep around it, finest where accuracy starts to drop (the knee that decides the
    fewest-NFE comparison); ``sweep="quick"`` runs the defaults only. Fixed step counts are multiples of
    the number of blocks (LLaDA splits them evenly); the fixed-steps default is one step per block."""
    if sweep not in ("quick", "full"):
        raise ValueError(f"sweep must be 'quick' or 'full', not {sweep!r}")
    blocks = max(gen_length // block_length, 1)
    steps = [s for s in (32, 16, 8, 4, 2) if blocks <= s < gen_length and s % blocks == 0] or [blocks]
    families = [
        PolicyFamily(BASELINE, "LLaDA, 1 token per step", (BASELINE,), BASELINE),
        PolicyFamily(
            "llada", "LLaDA, fixed fewer steps", tuple(f"llada:steps={s}" for s in steps), f"llada:steps={blocks}"
        ),
        PolicyFamily(
            "threshold",
            "Fast-dLLM confidence threshold",
            _specs("threshold:{}", (0.95, 0.9, 0.8, 0.7, 0.5)),
            "threshold:0.9",
        ),
        PolicyFamily(
            "entropy", "dParallel entropy threshold", _specs("entropy:{}", (0.2, 0.35, 0.5, 0.8)), "entropy:0.5"
        ),
        PolicyFamily("cad", "CD4LM confidence-adaptive", _specs("cad:{}", (0.95, 0.9, 0.8, 0.7)), "cad:0.95"),
        PolicyFamily(
            "multiblock", "d3LLM multi-block", _specs("multiblock:{}", (0.2, 0.35, 0.5, 0.8)), "multiblock:0.5", True
        ),
        PolicyFamily(
            "spd-hard",
            "DMax revision, hard embeddings",
            _specs("spd:threshold={},soft=false", (0.3, 0.5, 0.7, 0.9)),
            "spd:threshold=0.5,soft=false",
            trained_for="dmax",
        ),
        PolicyFamily(
            "spd",
            "DMax soft parallel decoding",
            _specs("spd:threshold={}", (0.3, 0.5, 0.7, 0.9)),
            "spd:threshold=0.5",
            trained_for="dmax",
        ),
    ]
    if sweep == "quick":
        families = [dataclasses.replace(f, specs=(f.default,)) for f in families]
    return families


def _specs(pattern: str, values: Sequence[float]) -> tuple[str, ...]:
    return tuple(pattern.format(v) for v in values)


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
    stops: Sequence[str] = STOPS,
    student_baselines: bool = True,
    native_only: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (model, policy setting, stop rule): accuracy, mean NFE, tokens per forward (TPF: answer
    tokens before the first EOS / NFE), positions per forward (committed positions / NFE), the fraction of
    committed tokens a revising policy changed, AUP, wall and CPU seconds, speedups.

    Speedups are over the teacher's baseline row without early stop (the first model's): in NFE, and in
    this process's CPU time (``speedup_cpu``), which a busy machine barely moves, unlike wall time. ``aup``
    is d3LLM's AUP of the row's model, policy family and stop rule over TPF, with ``y_max`` the best
    accuracy of all rows. ``student_baselines=False`` runs the one-token-per-step baseline on the first
    model only; ``native_only=True`` runs a family that needs a training method (``trained_for``: DMax's
    soft parallel decoding) only on the models distilled with it.
    """
    from fewstep.eval.embedded import evaluate_policy
    from fewstep.models import load_model, load_tokenizer

    block_length = block_length or BLOCK_LENGTH
    families = list(families or policy_families(gen_length, block_length))
    rows: list[dict[str, Any]] = []
    for name, folder in models:
        model = load_model(folder, device=device)
        tok = load_tokenizer(folder)
        for fam in planned_families(models, name, families, student_baselines, native_only):
            for spec in fam.specs:
                for stop in stops:

                    def tick(k: int, _label=f"{name} {spec}") -> None:
                        if progress is not None:
                            progress(_label, k)

                    res, _ = evaluate_policy(
                        model,
                        tok,
                        problems,
                        engine_spec(spec, gen_length),
                        gen_length=gen_length,
                        block_length=block_length,
                        batch_size=batch_size,
                        eos_fill=stop == "eos",
                        progress=tick,
                    )
                    rows.append(_row(name, spec, fam, stop, res))
    _add_speedups(rows)
    add_aup(rows)
    return rows


def planned_families(
    models: Sequence[tuple[str, Path]],
    name: str,
    families: Sequence[PolicyFamily],
    student_baselines: bool = True,
    native_only: bool = False,
) -> list[PolicyFamily]:
    """The families :func:`run_demo` decodes model ``name`` with (the progress bar counts the same)."""
    first = models[0][0] == name
    method = training_method(dict(models)[name]) if native_only else None  # read once per model
    return [
        f
        for f in families
        if (f.key != BASELINE or first or student_baselines)
        and not (native_only and f.trained_for is not None and method != f.trained_for)
    ]


def training_method(folder: str | os.PathLike) -> str | None:
    """The distillation method a checkpoint was made with (its ``training.json``), None for a pretrained one."""
    path = Path(folder) / "training.json"
    try:
        return json.loads(path.read_text()).get("method") if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _row(name: str, spec: str, fam: PolicyFamily, stop: str, res: Any) -> dict[str, Any]:
    return {
        "model": name,
        "policy": spec,
        "family": fam.key,
        "stop": stop,
        "multi_block": fam.multi_block,
        "accuracy": res.accuracy,
        "mean_nfe": res.mean_nfe,
        "tokens_per_forward": res.tokens_per_forward,
        "positions_per_forward": res.positions_per_forward,
        "revised_fraction": res.revised_fraction,
        "seconds": res.seconds,
        "cpu_seconds": res.cpu_seconds,
    }


def _add_speedups(rows: Sequence[dict[str, Any]]) -> None:
    base = baseline_row(rows)
    for r in rows:
        r["speedup_nfe"] = base["mean_nfe"] / r["mean_nfe"] if r["mean_nfe"] else math.inf
        r["speedup_cpu"] = base["cpu_seconds"] / r["cpu_seconds"] if r["cpu_seconds"] else math.inf


def baseline_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The teacher's (first model's) one-token-per-step row without early stop: the accuracy every
    comparison is held to and the unit of the speedups."""
    teacher = rows[0]["model"]
    mine = [r for r in rows if r["model"] == teacher and r["policy"] == BASELINE]
    return next((r for r in mine if r.get("stop", "none") == "none"), mine[0] if mine else rows[0])


def _group(r: dict[str, Any]) -> tuple[str, str, str]:
    return r["model"], r.get("family", r["policy"]), r.get("stop", "none")


def add_aup(rows: Sequence[dict[str, Any]], y_max: float | None = None) -> dict[tuple[str, str, str], float | None]:
    """Set each row's ``aup``: d3LLM's AUP (:func:`fewstep.eval.sweep.aup`) over tokens per forward of every
    row of its model, policy family and stop rule, ``y_max`` (in %) the best accuracy of all rows by
    default. Returns the AUP per ``(model, family, stop)`` (None where no row ran a forward)."""
    from fewstep.eval.sweep import aup

    top = max(100 * r["accuracy"] for r in rows) if y_max is None and rows else y_max
    scores: dict[tuple[str, str, str], float | None] = {}
    for key in dict.fromkeys(_group(r) for r in rows):
        pts = [
            (r["tokens_per_forward"], 100 * r["accuracy"])
            for r in rows
            if _group(r) == key and r["tokens_per_forward"] > 0
        ]
        scores[key] = aup(pts, y_max=top) if pts else None
    for r in rows:
        r["aup"] = scores[_group(r)]
    return scores


def table_rows(rows: Sequence[dict[str, Any]], families: Sequence[PolicyFamily] | None = None) -> list[dict]:
    """The settings shown in the printed table: per model, each family's default setting."""
    families = list(families or policy_families())
    shown = {f.default for f in families}
    return [r for r in rows if r["policy"] in shown]


def fewest_nfe_at_baseline_accuracy(
    rows: Sequence[dict[str, Any]], tolerance: float = 0.01, stop: str | None = None
) -> list[dict[str, Any]]:
    """Per model, the setting with the fewest mean NFE whose accuracy is within ``tolerance`` of the
    teacher's one-token-per-step baseline (None when no setting gets there), among the rows of one stop
    rule (``stop``; None: every row), so both sides of a comparison stop the same way.

    Each entry: ``model``, ``row`` (or None), ``baseline_accuracy`` and ``vs_teacher``: how many times
    fewer NFE than the teacher's best training-free setting at that accuracy (the teacher row itself: 1).
    """
    if not rows:
        return []
    base = baseline_row(rows)
    floor = base["accuracy"] - tolerance
    pool = [r for r in rows if stop is None or r.get("stop", "none") == stop]
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in pool if r["model"] == model and r["accuracy"] >= floor - 1e-12]
        out.append({"model": model, "row": min(ok, key=lambda r: r["mean_nfe"]) if ok else None})
    best_teacher = out[0]["row"]
    for entry in out:
        row = entry["row"]
        entry["baseline_accuracy"] = base["accuracy"]
        entry["vs_teacher"] = best_teacher["mean_nfe"] / row["mean_nfe"] if row and best_teacher else None
    return out


def format_summary(rows: Sequence[dict[str, Any]], tolerance: float = 0.01, stop: str | None = None) -> str:
    """One line per model: its fewest-NFE setting within ``tolerance`` of the teacher baseline's accuracy
    (among the rows of stop rule ``stop``), and its best AUP."""
    lines = []
    summary = fewest_nfe_at_baseline_accuracy(rows, tolerance, stop)
    for entry in summary:
        row = entry["row"]
        if row is None:
            lines.append(f"{entry['model']}: no setting within {100 * tolerance:.0f} point of the baseline")
            continue
        extra = "" if entry is summary[0] else f", {entry['vs_teacher']:.2f}x fewer than the teacher's best"
        best = max(
            (
                r
                for r in rows
                if r["model"] == entry["model"]
                and r.get("aup") is not None
                and (stop is None or r.get("stop", "none") == stop)
            ),
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


#: what the columns of the table mean (printed under it)
FIGURES_LEGEND = (
    "TPF: tokens per forward = answer tokens before the first EOS / NFE (d3LLM's figure, what AUP uses); "
    "no stop: every block of the canvas decoded; EOS stop: d3LLM's end-of-text stop (eos_fill); "
    "revised: committed tokens a revising policy changed; CPU x: the teacher baseline's CPU time over the "
    "row's (this process only, so a busy machine barely moves it)"
)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table (also used in docs/results.md): one line per model and setting, accuracy / NFE /
    TPF without and with the end-of-text stop side by side, AUP and CPU speedup with the stop, and the
    revised fraction; :data:`FIGURES_LEGEND` under it."""
    by: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["model"], r["policy"]), {})[r.get("stop", "none")] = r
    head = ["model", "policy", "acc", "NFE", "TPF", "acc EOS", "NFE EOS", "TPF EOS", "AUP EOS", "CPU x", "revised"]
    lines = [head]
    for (model, policy), d in by.items():
        a, e = d.get("none"), d.get("eos")
        last = e or a
        lines.append(
            [
                model,
                policy,
                _pct(a and a["accuracy"]),
                f"{a['mean_nfe']:.2f}" if a else "-",
                f"{a['tokens_per_forward']:.2f}" if a else "-",
                _pct(e and e["accuracy"]),
                f"{e['mean_nfe']:.2f}" if e else "-",
                f"{e['tokens_per_forward']:.2f}" if e else "-",
                f"{e['aup']:.1f}" if e and e.get("aup") is not None else "-",
                f"{last['speedup_cpu']:.1f}x" if "speedup_cpu" in last else "-",
                _pct(last.get("revised_fraction")) if last.get("family", "").startswith("spd") else "-",
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


_FAMILY_COLORS = {
    "llada": "tab:gray",
    "threshold": "tab:blue",
    "entropy": "tab:green",
    "cad": "tab:red",
    "multiblock": "tab:orange",
    "spd-hard": "tab:brown",
    "spd": "tab:purple",
}
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
    for fam in (f for f in policy_families(sweep="full") if f.key != BASELINE):
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
    base = baseline_row(rows) if rows else None
    stop = "eos" if any(r.get("stop") == "eos" for r in rows) else "none"
    rows = [r for r in rows if r.get("stop", "none") == stop]
    n = len(models) + 1
    cols = min(n, 3)
    fig, axes = plt.subplots(
        math.ceil(n / cols), cols, figsize=(5.6 * cols, 4.4 * math.ceil(n / cols)), dpi=110, squeeze=False
    )
    nfes = [r["mean_nfe"] for r in rows if r["mean_nfe"] > 0] + ([base["mean_nfe"]] if base else [])
    lo, hi = min(nfes) / 1.2, max(nfes) * 1.25
    panels = list(axes.flat)
    _frontier_panel(panels[0], rows, models, base)
    _finish_panel(panels[0], "every model: best setting of any policy", lo, hi)
    for ax, model in zip(panels[1:], models):
        _model_panel(ax, rows, model, base, models[0])
        _finish_panel(ax, model, lo, hi)
    for ax in panels[n:]:
        ax.axis("off")
    rule = "end-of-text stop" if stop == "eos" else "no early stop"
    fig.suptitle(title or f"{NAME}: accuracy vs NFE, {rule} (top-left is better)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
