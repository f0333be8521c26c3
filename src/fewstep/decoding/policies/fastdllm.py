"""Fast-dLLM's parallel decoding rules: the confidence threshold and the factor rule.

Wu et al., "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV Cache and Parallel
Decoding" (arXiv 2505.22618), reference code ``NVlabs/Fast-dLLM`` ``llada/generate.py``
(``get_transfer_index``); the factor rule as copied in ``inclusionAI/dInfer``
(``get_transfer_index_dynamic``). Both rank the block's masked positions by the float64 confidence
``softmax(z)[x̂]`` and always commit at least the most confident one. The prefix and dual KV caches of
the same paper are loop options (``cache=`` of :func:`fewstep.generate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.decoding.policies.base import (
    PROBS_DTYPES,
    Policy,
    Selection,
    StepState,
    check_confidence_options,
    check_range,
    first_best,
    random_scores,
    ranks,
    sample_candidates,
    scatter,
    token_probs,
)


def confidences(logits: torch.Tensor, state: StepState, temperature: float, remasking: str, probs_dtype: str):
    """Predicted tokens and confidence scores ``[R, L]`` (-inf off the candidates)."""
    z = logits[state.mask]
    x0 = sample_candidates(z, state, temperature)
    conf = random_scores(state) if remasking == "random" else token_probs(z, x0, PROBS_DTYPES[probs_dtype])
    return scatter(x0, state.mask, state.mask_id), scatter(conf, state.mask, float("-inf"))


@dataclass
class ConfidenceThresholdPolicy(Policy):
    """Fast-dLLM threshold rule: commit every candidate with ``c >= threshold``, and always the top-1.

    The accepted set is {most confident} ∪ {c ≥ τ}, so every step commits at least one token. Defaults
    are the paper's (``threshold`` 0.9, greedy, float64 confidence).
    """

    summary = "Fast-dLLM confidence threshold: every mask with c >= threshold, always the top-1"
    paper = "Fast-dLLM, arXiv 2505.22618"
    name = "threshold"
    uses_block_scalars = False
    positional = "threshold"

    threshold: float = 0.9
    temperature: float = 0.0
    remasking: str = "low_confidence"
    probs_dtype: str = "float64"

    def __post_init__(self):
        check_range(f"{self.name}.threshold", self.threshold, 0.0, 1.0)
        check_confidence_options(self)

    def select(self, logits: torch.Tensor, state: StepState) -> Selection:
        tokens, conf = confidences(logits, state, self.temperature, self.remasking, self.probs_dtype)
        commit = ((conf >= self.threshold) & state.mask) | first_best(conf, state.mask)
        return Selection(tokens, commit)


@dataclass
class FactorPolicy(Policy):
    """Fast-dLLM factor rule: commit the ``n`` most confident candidates for the largest ``n`` with
    ``(n + 1) * (1 - c_(n)) <= factor`` (``c_(n)`` the n-th highest confidence), at least one.

    ``quirk_last_rank``: dInfer's copy (``get_transfer_index_dynamic``) stops its scan at the first
    failing rank but adds one when that rank is the last, so when only the least confident candidate
    fails it commits all of them. Off by default (the paper's rule).
    """

    summary = "Fast-dLLM factor rule: the largest n with (n + 1)(1 - c_(n)) <= factor"
    paper = "Fast-dLLM, arXiv 2505.22618"
    name = "factor"
    uses_block_scalars = False
    positional = "factor"

    factor: float = 1.0
    temperature: float = 0.0
    remasking: str = "low_confidence"
    probs_dtype: str = "float64"
    quirk_last_rank: bool = False

    def __post_init__(self):
        check_range(f"{self.name}.factor", self.factor, 0.0, float("inf"), lo_open=True)
        check_confidence_options(self)

    def select(self, logits: torch.Tensor, state: StepState) -> Selection:
        tokens, conf = confidences(logits, state, self.temperature, self.remasking, self.probs_dtype)
        rank = ranks(conf)  # 0-based; candidates first
        n = (rank + 1).to(conf.dtype)
        ok = ((n + 1) * (1 - conf) <= self.factor) & state.mask
        # c decreases and the bound 1 - f/(n+1) increases with n, so the passing ranks form a prefix
        # (up to rounding): count the leading run of passes in rank order.
        ok_sorted = torch.zeros_like(ok).scatter(-1, rank, ok)
        take = torch.cumprod(ok_sorted.long(), dim=-1).sum(-1).clamp_min(1)
        if self.quirk_last_rank:
            take = torch.where(take == state.counts - 1, state.counts, take)
        commit = (rank < take[:, None]) & state.mask
        return Selection(tokens, commit)
