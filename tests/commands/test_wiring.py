"""The commands are wiring (issue 25): no command function is longer than about 60 lines, and every command
module exposes ``add_arguments`` and ``run``."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import fewstep.commands
from fewstep.cli import COMMANDS

ROOT = Path(fewstep.commands.__file__).parent
LIMIT = 60
#: the demo helper's own file (its ``run`` is theirs to split)
EXEMPT = {"demo.py"}


def test_no_command_function_is_longer_than_60_lines():
    long = []
    for path in sorted([*ROOT.glob("*.py"), ROOT.parent / "cli.py"]):
        if path.name in EXEMPT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > LIMIT:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert long == []


def test_every_command_module_is_add_arguments_and_run():
    for _, module, _ in COMMANDS:
        mod = importlib.import_module(f"fewstep.commands.{module}")
        assert callable(mod.add_arguments) and callable(mod.run), module
