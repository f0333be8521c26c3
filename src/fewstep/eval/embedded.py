"""Accuracy and speed of one decoding policy on the embedded task (``fewstep demo``, the model cards, tests).

Evaluation, not the task: the task (:mod:`fewstep.tasks`) is data and a verifier and imports nothing of fewstep.
"""

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
    tokens_per_forward: float  # TPF: answer tokens before the first EOS / NFE, summed over the problems
    positions_per_forward: float  # committed positions / NFE (EOS padding included), summed the same way
    seconds: float
    n: int
    cpu_seconds: float = 0.0  # this process's CPU time (all threads): unlike wall time, other processes barely move it
    revised_fraction: float = 0.0  # committed answer tokens whose final token differs from their first commit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    eos_fill: bool = False,
    progress=None,
) -> tuple[PolicyResult, list[str]]:
    """Decode every problem with ``policy`` through the text layer (``batch_size`` rows at a time) and
    verify each answer.

    Returns the summary and the decoded answers. NFE follows the reference samplers (no early stop:
    every block of the generation length is decoded, EOS blocks included; ``eos_fill`` turns d3LLM's
    end-of-text stop on); the answer text is the whole canvas with special tokens dropped (no stop ids: EOS
    padding is skipped, not cut at).
    """
    from fewstep.decoding.text import Completion, GenerationSettings, TextGenerator

    settings = GenerationSettings(
        policy=policy,
        max_tokens=gen_length,
        block_length=block_length,
        cache=cache,
        stop_ids=(),
        early_stop=False,
        eos_fill=eos_fill,
        chat=False,
    )

    def on_event(ev) -> None:
        if progress is not None and isinstance(ev, Completion):
            progress(1)

    gen = TextGenerator(model, tokenizer, max_batch=batch_size)
    cpu = time.process_time()
    outs = gen.generate([p.prompt for p in problems], settings, on_event=on_event)
    cpu = time.process_time() - cpu
    texts = [o.text for o in outs]
    seconds = outs[0].batch_seconds if outs else 0.0
    correct = sum(verify(p.prompt, t).correct for p, t in zip(problems, texts))
    nfe = sum(o.nfe for o in outs)
    tokens = sum(round(o.tokens_per_forward * o.nfe) for o in outs)
    positions = sum(o.committed for o in outs)
    revised = sum(o.revised for o in outs)
    result = PolicyResult(
        policy=policy,
        accuracy=correct / max(len(problems), 1),
        mean_nfe=nfe / max(len(outs), 1),
        tokens_per_forward=tokens / nfe if nfe else 0.0,
        positions_per_forward=positions / nfe if nfe else 0.0,
        seconds=seconds,
        n=len(problems),
        cpu_seconds=cpu,
        revised_fraction=revised / positions if positions else 0.0,
    )
    return result, texts
