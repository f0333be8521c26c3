"""dParallel's entropy-threshold decoding, for LLaDA and for Dream.

Chen et al., "dParallel: Learnable Parallel Decoding for dLLMs" (arXiv 2509.26488, ICLR 2026),
reference code ``czg1225/dParallel``: ``LLaDA/generate.py`` (``get_transfer_index_entropy``) and
``Dream/model/generation_utils_semiar.py`` (``alg='entropy_threshold'``). Each step ranks the block's
masked positions by predictive entropy ``H = -Σ p log(p + ε)`` and commits the lowest-entropy one plus
every other candidate under the threshold. The distilled (certainty-forced) models make most entropies
small, which is where the speedup comes from.
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
    entropy,
    first_best,
    random_scores,
    sample_candidates,
    scatter,
)


@dataclass
class EntropyThresholdPolicy(Policy):
    """dParallel (LLaDA): commit the lowest-entropy candidate and every candidate with ``H <= threshold``.

    Defaults follow ``LLaDA/generate.py``: ``threshold`` 0.5 (the paper also reports 0.45), entropy in
    float64 with ``ε = 1e-12``, the comparison inclusive (``strict=False``). ``remasking='random'``
    replaces the entropies with uniform scores, as the reference does.
    """

    summary = "dParallel entropy threshold (LLaDA numerics): lowest entropy + every H <= threshold"
    paper = "dParallel, arXiv 2509.26488"
    name = "entropy"
    uses_block_scalars = False
    positional = "threshold"

    threshold: float = 0.5
    temperature: float = 0.0
    remasking: str = "low_confidence"
    probs_dtype: str = "float64"
    eps: float = 1e-12
    strict: bool = False

    def __post_init__(self):
        check_range(f"{self.name}.threshold", self.threshold, 0.0, float("inf"))
        check_confidence_options(self)
        check_range(f"{self.name}.eps", self.eps, 0.0, 1.0)

    def select(self, logits: torch.Tensor, state: StepState) -> Selection:
        z = logits[state.mask]
        x0 = sample_candidates(z, state, self.temperature)
        if self.remasking == "random":
            h = random_scores(state)
        else:
            h = entropy(z, PROBS_DTYPES[self.probs_dtype], self.eps)
        h = scatter(h, state.mask, float("inf"))
        below = (h < self.threshold) if self.strict else (h <= self.threshold)
        commit = (below & state.mask) | first_best(h, state.mask, descending=False)
        return Selection(scatter(x0, state.mask, state.mask_id), commit)


@dataclass
class DreamEntropyThresholdPolicy(EntropyThresholdPolicy):
    """dParallel (Dream semi-AR sampler): as :class:`EntropyThresholdPolicy` with the Dream code's numerics.

    ``Dream/model/generation_utils_semiar.py`` takes the softmax in the logits' dtype, uses
    ``log(p + 1e-8)`` and accepts strictly below the threshold (``H < τ``); the lowest-entropy
    candidate is always committed. Threshold 0.5 and block length 32 are its defaults.
    """

    summary = "dParallel entropy threshold (Dream numerics): lowest entropy + every H < threshold"
    name = "entropy-dream"

    probs_dtype: str = "logits"
    eps: float = 1e-8
    strict: bool = True
