"""The two parallelism figures, named so that no reader confuses them.

* **tokens per forward** (TPF, d3LLM's figure and the one the field compares): answer tokens before the
  first EOS / NFE. EOS padding never counts, so an early stop saves forwards, not counted tokens.
* **positions per forward**: committed canvas positions / NFE, EOS padding included (``gen_length / NFE``
  when every position is committed).

Every caller that reports either figure (the text layer's ``Completion``, ``fewstep.generate``'s output,
the server's ``usage``, evaluation records) computes it here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence


def answer_tokens(answer_ids: Iterable[int], eos_ids: Collection[int], mask_id: int | None = None) -> int:
    """Tokens of ``answer_ids`` before the first id of ``eos_ids`` (positions still holding ``mask_id``,
    never committed, are not tokens)."""
    n = 0
    for t in answer_ids:
        if t in eos_ids:
            break
        n += t != mask_id
    return n


def tokens_per_forward(
    answer_ids: Iterable[int], eos_ids: Collection[int], nfe: int, *, mask_id: int | None = None
) -> float:
    """Answer tokens before the first EOS per forward (0.0 without a forward)."""
    return answer_tokens(answer_ids, eos_ids, mask_id) / nfe if nfe else 0.0


def positions_per_forward(tokens_per_step: Sequence[int], nfe: int) -> float:
    """Committed positions per forward, from the per-forward commit counts (0.0 without a forward)."""
    return sum(tokens_per_step) / nfe if nfe else 0.0
