"""The README is a quick start kept true by the code: its tables are generated from the registries, its
commands are the ones CI runs, its Python example runs on the shipped model, and every link of the README
and the guides resolves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from fewstep.decoding.policies import POLICIES, policy_table
from fewstep.distill import method_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _block(text: str, name: str) -> str:
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    assert start in text and end in text, f"README has no {name} block"
    return text[text.index(start) + len(start) : text.index(end)]


def test_readme_policy_table_is_generated_from_the_registry():
    assert _block(README.read_text(), "policies") == policy_table()


def test_policy_table_has_a_row_with_paper_and_rule_per_registered_policy():
    rows = policy_table().splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [f"| `{name}`" for name in POLICIES]
    for name, cls in POLICIES.items():
        assert cls.paper and cls.summary, f"policy {name!r} needs a paper and a one-line summary"


def test_readme_method_table_is_generated_from_the_methods():
    assert _block(README.read_text(), "methods") == method_table()


def test_readme_is_a_quick_start_with_the_commands_ci_runs():
    text = README.read_text()
    assert len(text.splitlines()) <= 250, "README.md is a quick start: numbers and how-tos belong in docs/"
    demo = text.split("<!-- demo-command -->\n", 1)[1].split("```", 2)[1]
    assert demo.strip().splitlines()[-1].endswith("fewstep demo")
    # .ci/run takes the test command with its own awk program: it must find the pytest run
    awk = re.search(r"awk '([^']+)' README.md", (ROOT / ".ci" / "run").read_text()).group(1)
    cmd = subprocess.run(["awk", awk, str(README)], capture_output=True, text=True, check=True).stdout.strip()
    assert cmd.startswith(".ci/install-system-packages") and "python -m pytest" in cmd
    assert "<!-- headline:start -->" in text and "docs/results.md" in _block(text, "headline")


def test_readme_python_example_runs_on_the_shipped_student(capsys):
    """The five-line example decodes a held-out-style problem correctly in a few forwards."""
    from fewstep.tasks import verify

    code = re.search(r"```python\n(import fewstep\n.*?)```", README.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    answer = scope["tok"].decode(scope["out"].answers[0], skip_special_tokens=True)
    assert verify("3 + 4 - 2 + 8 - 1 ?", answer).correct, answer
    assert int(scope["out"].nfe[0]) < 16  # one token per step would take 64 forwards
    assert capsys.readouterr().out.startswith(answer)


def _slugs(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (a repeated heading gets -1, -2, ...)."""
    out, seen = set(), {}
    for line in FENCE.sub("", text).splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen[slug] = seen.get(slug, -1) + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize(
    "doc", [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name
)
def test_readme_and_docs_links_resolve(doc: Path):
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _slugs(dest.read_text())):
            broken.append(target)
    assert not broken, f"{doc.name}: links to nothing: {broken}"
