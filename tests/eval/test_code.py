"""Code extraction, sanitize and test-program construction (no execution here)."""

from __future__ import annotations

from fewstep.eval import code
from fewstep.eval.benchmarks import get_task


def test_extract_code_prefers_python_fences():
    text = "Plan:\n```text\nnot code\n```\nThen:\n```python\ndef f():\n    return 1\n```\nand ```python\nx = 2\n```"
    assert code.extract_code(text) == "def f():\n    return 1"
    assert code.extract_code("```\ndef g(): return 2\n```") == "def g(): return 2"
    assert code.extract_code("```py\nprint(1)\n```") == "print(1)"
    assert code.extract_code("```python\ndef h():\n    return 3") == "def h():\n    return 3"  # never closed
    assert code.extract_code("    return x + 1\n") == "    return x + 1\n"  # plain completion


def test_longest_valid_window_skips_prose():
    text = "Here is my answer:\ndef f(x):\n    return x * 2\n\nprint(f(2))\nThis works because\n"
    assert code.longest_valid_window(text) == "def f(x):\n    return x * 2\n\nprint(f(2))"
    assert code.longest_valid_window("no code at all, sorry (") == ""


def test_sanitize_keeps_imports_and_needed_definitions():
    text = (
        "import math\nfrom typing import List\nimport math\n"
        "def helper(x):\n    return math.sqrt(x)\n"
        "def unused():\n    return 0\n"
        "def noreturn():\n    print('side effect')\n"
        "LIMIT = 10\n"
        "class Box:\n    pass\n"
        "def solve(xs: List[int]):\n    return [helper(x) for x in xs if x < LIMIT]\n"
        "print(solve([1, 4]))\n"
    )
    out = code.sanitize(text, "solve")
    assert out.splitlines()[:2] == ["import math", "from typing import List"]  # repeated import once
    assert "def helper" in out and "LIMIT = 10" in out and "def solve" in out
    assert "def unused" not in out and "class Box" not in out and "noreturn" not in out
    assert "print(solve" not in out  # top-level statements go
    everything = code.sanitize(text)  # no entry point: every kept definition stays
    assert "def unused" in everything and "class Box" in everything and "noreturn" not in everything
    assert "noreturn" in code.sanitize(text, require_return=False)


def test_sanitize_later_definition_wins_and_attribute_edges():
    text = "def f():\n    return 1\ndef f():\n    return 2\n"
    assert code.sanitize(text) == "def f():\n    return 2\n"
    text = "class Node:\n    pass\ndef walk(t):\n    return t.Node\n"
    assert "class Node" in code.sanitize(text, "walk")
    assert "class Node" not in code.sanitize(text, "walk", attribute_edges=False)


def test_sanitize_normalises_tabs_and_crlf():
    out = code.sanitize("def f(x):\r\n\treturn x\r\n")
    assert out == "def f(x):\n    return x\n"


def test_humaneval_completion_convention():
    rec = get_task("humaneval").get("HumanEval/2")  # truncate_number
    body_only = code.humaneval_solution(rec, rec["canonical_solution"])
    whole = code.humaneval_solution(rec, "```python\n" + rec["prompt"] + rec["canonical_solution"] + "\n```")
    assert body_only == whole
    assert "def truncate_number" in whole and "return number % 1.0" in whole
    program = code.humaneval_test_program(rec, whole)
    assert program.endswith("check(truncate_number)\n") and rec["test"] in program


def test_humaneval_helpers_called_by_the_tests_are_kept():
    rec = get_task("humaneval").get("HumanEval/50")
    assert "encode_shift" in code.humaneval_roots(rec)
    sol = code.humaneval_solution(rec, rec["canonical_solution"])
    assert "def encode_shift" in sol and "def decode_shift" in sol


def test_mbpp_program_order():
    rec = get_task("mbpp").get(367)
    program = code.mbpp_test_program(rec, code.mbpp_solution(rec, rec["code"]))
    assert program.index("class Node") < program.index(rec["test_setup_code"].strip().splitlines()[0])
    assert program.rstrip().endswith(code.guard_asserts(rec["test_list"][-1].strip()))  # asserts last, guarded
    assert program.index("def _fewstep_answer") > program.index("class Node")  # the guard after the solution
    rec = get_task("mbpp-sanitized").records[0]
    program = code.mbpp_test_program(rec, "def f(): return 1\n")
    for imp in rec["test_imports"]:
        assert program.index(imp) < program.index("def f")


def test_guard_wraps_every_call_of_an_assert():
    assert code.guard_asserts("assert f(1) == 2") == "assert _fewstep_answer(f(1)) == 2"
    assert code.guard_asserts("assert math.isclose(f(x), 1.5)") == (
        "assert _fewstep_answer(math.isclose(_fewstep_answer(f(x)), 1.5))"
    )
    assert code.guard_asserts("assert f(1) == (") == "assert f(1) == ("  # does not parse: left as it is


def test_no_code_means_no_extraction():
    task = get_task("humaneval")
    rec = task.records[0]
    assert task.extract(rec, "I refuse to answer (") is None  # the prompt alone has no body
    assert task.extract(rec, rec["canonical_solution"]) is not None
    mbpp = get_task("mbpp-sanitized")
    assert mbpp.extract(mbpp.records[0], "Sorry, no idea (") is None
