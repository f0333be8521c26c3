"""A fresh, trainable copy of the tiny LLaDA fixture for each test that trains."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "llada-tiny-a"


@pytest.fixture
def tiny_llada():
    import fewstep

    return fewstep.load_model(FIXTURE, dtype="float32")
