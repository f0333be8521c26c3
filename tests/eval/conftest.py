"""A tiny random-weight LLaDA checkpoint with the embedded task's tokenizer, for `fewstep eval` tests."""

from __future__ import annotations

import pytest

from tests.tiny import tiny_arith_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny_arith_checkpoint(tmp_path_factory.mktemp("tiny-arith-model"))
