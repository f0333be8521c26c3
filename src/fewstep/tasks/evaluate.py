"""Accuracy and speed of one decoding policy on the embedded task (used by tests, the model card and the demo)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fewstep.tasks import BLOCK_LENGTH, GEN_LENGTH
from fewstep.tasks.arith import Problem, verify


@dataclass
class PolicyResult:
    """What one policy achieved on a problem set."""

    policy: str
    accuracy: float
    mean_nfe: float
    tokens_per_step: float  # gen_length / mean NFE (committed tokens per forward)
    seconds: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decode_texts(tokenizer, answers: torch.Tensor) -> list[str]:
    """Answer ids -> text, special tokens dropped (EOS padding, a leftover mask)."""
    return [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in answers]


@torch.no_grad()
def evaluate_policy(
    model,
    tokenizer,
    problems: Sequence[Problem],
    policy: str,
    *,
    gen_length: int = GEN_LENGTH,
    block_length: int = BLOCK_LENGTH,
    batch_size: int = 64,
    cache: str = "none",
    progress=None,
) -> tuple[PolicyResult, list[str]]:
    """Decode every problem with ``policy`` through :func:`fewstep.generate` and verify each answer.

    Returns the summary and the decoded answers. NFE follows the reference samplers (no early stop:
    every block of the generation length is decoded, EOS blocks included).
    """
    from fewstep.decoding import generate

    texts: list[str] = []
    nfe: list[int] = []
    start = time.perf_counter()
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        ids = [tokenizer(p.prompt, add_special_tokens=False).input_ids for p in chunk]
        out = generate(
            model,
            ids,
            policy,
            gen_length=gen_length,
            block_length=block_length,
            cache=cache,
            tokenizer=tokenizer,
        )
        texts += decode_texts(tokenizer, out.answers)
        nfe += out.nfe.tolist()
        if progress is not None:
            progress(len(chunk))
    seconds = time.perf_counter() - start
    correct = sum(verify(p.prompt, t).correct for p, t in zip(problems, texts))
    mean_nfe = sum(nfe) / max(len(nfe), 1)
    result = PolicyResult(
        policy=policy,
        accuracy=correct / max(len(problems), 1),
        mean_nfe=mean_nfe,
        tokens_per_step=gen_length / mean_nfe if mean_nfe else 0.0,
        seconds=seconds,
        n=len(problems),
    )
    return result, texts
