"""`fewstep score`: not yet available (see the project's issues)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This command takes no arguments yet."""


def run(args: argparse.Namespace) -> int:
    """Say clearly that the command is not built yet."""
    print("fewstep score: not yet available in this version of fewstep.")
    return 1
