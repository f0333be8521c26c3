"""Datasets of fewstep's lm-eval tasks: the benchmark files shipped in the package (no download)."""

from __future__ import annotations

from typing import Any


def gsm8k(**_: Any):
    """GSM8K ``train`` (7,473) and ``test`` (1,319) from ``fewstep/eval/data/gsm8k`` as a ``DatasetDict``
    with the upstream fields (``question``, ``answer``) plus ``id`` (the 0-based line number)."""
    from datasets import Dataset, DatasetDict

    from fewstep.eval.datasets import load_gsm8k

    return DatasetDict(
        {
            split: Dataset.from_list(
                [{"id": r["id"], "question": r["question"], "answer": r["answer"]} for r in load_gsm8k(split)]
            )
            for split in ("train", "test")
        }
    )
