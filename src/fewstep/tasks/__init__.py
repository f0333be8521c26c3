"""The embedded synthetic task (``arith``): problems, splits, the verifier and the tokenizer.

Public API (used by evaluation, the rollout filter of distillation and ``fewstep demo``)::

    from fewstep.tasks import generate_problems, verify
    problems = generate_problems("test", 512, seed=0)              # list[Problem]: id, prompt, response, gold
    verdict = verify(problems[0].prompt, model_text)       # Verdict: correct, reason, answer
    if verdict: ...

``generate`` is the old name of ``generate_problems`` (kept; ``fewstep.generate`` is the decoder).
``GEN_LENGTH`` and ``BLOCK_LENGTH`` are the decoding geometry the shipped teacher was trained and
measured with: answers of 19 to 55 tokens EOS-padded to 64, eight semi-autoregressive blocks of 8, so
an answer ends in its 3rd to 7th block, as a GSM8K answer ends in a 256-token canvas of 32-token blocks
(docs/embedded.md).
"""

from fewstep.tasks.arith import (
    NAME,
    ArithConfig,
    Problem,
    Verdict,
    extract_answer,
    generate,
    generate_problems,
    split_of,
    verify,
)

GEN_LENGTH = 64
BLOCK_LENGTH = 8

__all__ = [
    "BLOCK_LENGTH",
    "GEN_LENGTH",
    "NAME",
    "ArithConfig",
    "Problem",
    "Verdict",
    "extract_answer",
    "generate",
    "generate_problems",
    "split_of",
    "verify",
]
