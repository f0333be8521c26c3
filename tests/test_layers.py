"""The package's layering, read from its imports (ast): no import runs back up.

    assets <- models, distributed <- decoding <- {train, tasks} <- {distill, eval} <- commands / cli / facade

A module may import its own layer's package and any lower layer, never a higher one nor a peer
(train and tasks do not import each other). One sideways edge is allowed: ``distill`` may import
``eval`` (rollouts read the benchmark registry); ``eval`` never imports ``distill``. The embedded task
(``fewstep.tasks``) is a leaf: data and a verifier, importing nothing of fewstep, imported only by
evaluation (``eval``: the benchmark registry, the demo) and the commands. docs/architecture.md draws the
same table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fewstep

ROOT = Path(fewstep.__file__).parent

# assets (the shipped checkpoints and the resolver) sits below models, which resolve names through it
RANK = {
    "assets": -1,
    "models": 0,
    "plotting": 0,
    "distributed": 0,
    "decoding": 1,
    "train": 2,
    "tasks": 2,
    "distill": 3,
    "eval": 3,
    "serve": 3,
}
TOP = 4  # commands, cli, __main__ and the root facade (fewstep/__init__.py)
SIDEWAYS = {("distill", "eval")}
TASK_IMPORTERS = ("eval", "commands")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every ``fewstep...`` module a file imports (top level or inside functions), relative ones resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from fewstep import x` imports the facade unless x is a subpackage
            subs = [f"{mod}.{a.name}" for a in node.names if mod == "fewstep" and a.name in RANK]
            found.update(subs or [mod])
    return {m for m in found if m == "fewstep" or m.startswith("fewstep.")}


def layer(module: str) -> str:
    """``models`` for ``fewstep.models.loading``; ``""`` for the facade and the CLI's modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else ""


def rank(module: str) -> int:
    return RANK.get(layer(module), TOP)


def edges() -> list[tuple[str, str]]:
    return [(module_name(p), imp) for p in sorted(ROOT.rglob("*.py")) for imp in sorted(imports_of(p))]


def back_edges(all_edges: list[tuple[str, str]]) -> list[str]:
    bad = []
    for src, dst in all_edges:
        a, b = layer(src), layer(dst)
        if a == b and a:
            continue  # inside one package
        if rank(src) == TOP:
            continue  # the wiring may import anything
        if (a, b) in SIDEWAYS:
            continue
        if rank(dst) >= rank(src):
            bad.append(f"{src} -> {dst}")
    return bad


def test_no_import_runs_back_up():
    assert back_edges(edges()) == []


def test_the_embedded_task_is_a_leaf():
    importers = {src for src, dst in edges() if layer(dst) == "tasks" and layer(src) != "tasks"}
    stray = sorted(m for m in importers if not any(m.startswith(f"fewstep.{p}") for p in TASK_IMPORTERS))
    assert stray == [], f"only evaluation and the commands may import fewstep.tasks: {stray}"
    imported = sorted({f"{src} -> {dst}" for src, dst in edges() if layer(src) == "tasks" and layer(dst) != "tasks"})
    assert imported == [], f"fewstep.tasks imports nothing of fewstep (a task is data and a verifier): {imported}"


def test_the_distributed_utility_imports_nothing_of_fewstep():
    assert imports_of(ROOT / "distributed.py") == set()


def test_the_checker_sees_a_back_edge():
    """The rule itself: a model importing the trainer, the trainer importing the task and a library module
    importing the facade are all reported (so the tests above cannot pass vacuously)."""
    fake = [
        ("fewstep.models.loading", "fewstep.train.trainer"),
        ("fewstep.train.trainer", "fewstep.tasks.arith"),
        ("fewstep.eval.runner", "fewstep"),
        ("fewstep.eval.runner", "fewstep.distill.rollout"),
        ("fewstep.distill.rollout", "fewstep.eval.benchmarks"),  # allowed
        ("fewstep.commands.distill", "fewstep.train.trainer"),  # allowed
    ]
    assert back_edges(fake) == [
        "fewstep.models.loading -> fewstep.train.trainer",
        "fewstep.train.trainer -> fewstep.tasks.arith",
        "fewstep.eval.runner -> fewstep",
        "fewstep.eval.runner -> fewstep.distill.rollout",
    ]
    # relative and function-level imports are resolved
    assert "fewstep.train.objective" in imports_of(ROOT / "distill" / "cd4lm.py")
    assert "fewstep.assets" in imports_of(ROOT / "models" / "loading.py")
