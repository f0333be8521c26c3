"""The embedded synthetic task (``arith``): problems, splits, the verifier and the tokenizer.

Public API (used by evaluation, the rollout filter of distillation and ``fewstep demo``)::

    from fewstep.tasks import generate, verify
    problems = generate("test", 512, seed=0)              # list[Problem]: id, prompt, response, gold
    verdict = verify(problems[0].prompt, model_text)       # Verdict: correct, reason, answer
    if verdict: ...

``GEN_LENGTH`` and ``BLOCK_LENGTH`` are the decoding geometry the shipped teacher was trained and
measured with (answers EOS-padded to 64 tokens, two semi-autoregressive blocks of 32).
"""

from fewstep.tasks.arith import (
    NAME,
    ArithConfig,
    Problem,
    Verdict,
    extract_answer,
    generate,
    split_of,
    verify,
)

TASK_NAME = NAME
GEN_LENGTH = 64
BLOCK_LENGTH = 32

__all__ = [
    "BLOCK_LENGTH",
    "GEN_LENGTH",
    "NAME",
    "TASK_NAME",
    "ArithConfig",
    "Problem",
    "Verdict",
    "extract_answer",
    "generate",
    "split_of",
    "verify",
]
