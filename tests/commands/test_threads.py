"""`--threads` (issue 24, item 6): on every computing command, one default that does not oversubscribe a busy
machine (docs/cli.md, "Threads")."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from fewstep.commands.common import apply_threads, default_threads
from tests.commands.conftest import run_cli


@pytest.fixture
def machine(monkeypatch):
    """A machine of ``cores`` cores under a 1-minute load of ``load``."""

    def set_(cores: int, load: float, processes: str | None = None) -> None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        if processes is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)

    return set_


@pytest.fixture(autouse=True)
def keep_one_thread():
    yield
    torch.set_num_threads(1)  # the suite's setting (tests/conftest.py)


def test_an_idle_machine_gets_every_core(machine):
    machine(cores=2, load=0.1)
    assert default_threads() == 2


def test_a_busy_machine_gets_the_idle_cores(machine):
    machine(cores=2, load=2.2)  # two other CPU-bound jobs
    assert default_threads() == 1
    machine(cores=2, load=6.0)
    assert default_threads() == 1  # never below one
    machine(cores=16, load=5.0)
    assert default_threads() == 11


def test_processes_share_the_cores(machine):
    machine(cores=8, load=0.0, processes="4")
    assert default_threads() == 2
    assert default_threads(processes=8) == 1
    machine(cores=2, load=0.0, processes="2")
    assert default_threads() == 1


def test_omp_num_threads_is_respected(machine, monkeypatch):
    machine(cores=8, load=0.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() is None


def test_the_flag_wins(machine):
    machine(cores=2, load=9.0)
    assert apply_threads(argparse.Namespace(threads=2)) == 2 == torch.get_num_threads()
    assert apply_threads(argparse.Namespace(threads=None)) == 1


def test_a_command_applies_it(arith_model, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", arith_model, "--prompt-ids", "3 4 5", "--threads", 2)
    assert code == 0, err
    assert torch.get_num_threads() == 2
