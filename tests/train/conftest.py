"""Shared fixtures for the trainer tests: a task folder and a very small LLaDA config."""

from __future__ import annotations

import json

import pytest

from tests.tiny import AUTO_MAP
from tests.tiny import TINY_LLADA as TINY


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """train.jsonl (256 examples), test.jsonl and tokenizer/ written by the task's own functions; chains of
    4-5 numbers (answers of at most 25 tokens) keep the trainer tests at a 32-token canvas."""
    from fewstep.models.tokenizer import build_word_tokenizer
    from fewstep.tasks.arith import ArithConfig, generate_problems

    d = tmp_path_factory.mktemp("arith")
    for split, n in (("train", 256), ("test", 16)):
        with open(d / f"{split}.jsonl", "w") as fh:
            for p in generate_problems(split, n, seed=0, cfg=ArithConfig(min_leaves=4, max_leaves=5)):
                fh.write(json.dumps(p.to_json()) + "\n")
    build_word_tokenizer(ArithConfig().vocabulary(), d / "tokenizer")
    (d / "tiny.json").write_text(json.dumps({**TINY, "auto_map": AUTO_MAP}))  # kept in the saved config
    return d
