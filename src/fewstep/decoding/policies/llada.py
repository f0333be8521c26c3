"""LLaDA's fixed-step sampler: low-confidence (or random) remasking with an even per-step quota.

Nie et al., "Large Language Diffusion Models" (arXiv 2502.09992), reference code ``ML-GSAI/LLaDA``
``generate.py``. Each block gets ``steps / num_blocks`` steps; the block's masks are split evenly over
them (remainder on the first steps, e.g. 32 masks in 5 steps -> 7,7,6,6,6) and each step commits that
many positions, the most confident first. Classifier-free guidance (``cfg_scale``) is a property of
the model call and lives in :func:`fewstep.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.decoding.policies.base import (
    PROBS_DTYPES,
    FixedSteps,
    Policy,
    Selection,
    StepState,
    check_confidence_options,
    even_quota,
    quota_at,
    random_scores,
    sample_candidates,
    scatter,
    token_probs,
    top_k_mask,
)


def suppress(z: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """``z`` with the logits of ``ids`` (those inside the vocabulary) set to -inf."""
    ids = tuple(i for i in ids if 0 <= i < z.shape[-1])
    if not ids:
        return z
    z = z.clone()
    z[:, list(ids)] = float("-inf")
    return z


@dataclass
class LowConfidencePolicy(FixedSteps, Policy):
    """LLaDA fixed steps: commit ``quota[step]`` positions per step, ranked by confidence.

    Options (defaults = ``ML-GSAI/LLaDA`` ``generate``):

    * ``steps``: total steps over all blocks (None: ``gen_length``, one token per step); must be a
      multiple of the number of blocks;
    * ``remasking``: ``low_confidence`` (rank by ``softmax(z)[x̂]``) or ``random`` (uniform scores);
    * ``temperature``: Gumbel-max sampling of ``x̂`` (0 = greedy); confidence is always taken from the
      noise-free logits at temperature 1, as in the reference;
    * ``probs_dtype``: dtype of the confidence softmax: ``logits`` (the reference LLaDA sampler) or
      ``float64`` (Fast-dLLM's and dParallel's fixed-quota path);
    * ``suppress_eos``: LLaDA's ``logits_eos_inf``: EOS can never be predicted;
    * ``eos_low_confidence``: LLaDA's ``confidence_eos_eot_inf``: positions whose prediction is EOS or
      end-of-turn are ranked last (their confidence is computed with those logits at -inf, so it is 0);
      the reference applies this only to end-of-turn at temperature > 0, a quirk not reproduced.

    Beyond the scheduled steps (possible only if a committed prediction was the mask token itself),
    every remaining mask is committed at once (the reference indexes past its quota array).

    ``quirk_fixed_forwards``: the reference LLaDA sampler runs exactly ``steps / num_blocks`` forwards
    per block even after the block is complete (``steps`` > ``block_length``); Fast-dLLM stops when the
    block is done, which is the default here.
    """

    summary = "LLaDA fixed steps: an even per-step quota of the most confident (or random) masks"
    paper = "LLaDA, arXiv 2502.09992"
    name = "llada"
    positional = "steps"

    steps: int | None = None
    remasking: str = "low_confidence"
    temperature: float = 0.0
    probs_dtype: str = "logits"
    suppress_eos: bool = False
    eos_low_confidence: bool = False
    quirk_fixed_forwards: bool = False

    def __post_init__(self):
        check_confidence_options(self)

    def start_block(self, state: StepState) -> dict[str, torch.Tensor]:
        s = self._steps(state.gen_length, state.block_length)
        return {"quota": even_quota(state.counts, s)}

    def select(self, logits: torch.Tensor, state: StepState) -> Selection:
        z = logits[state.mask]
        if self.suppress_eos:
            z = suppress(z, state.eos_ids[:1])
        x0 = sample_candidates(z, state, self.temperature)
        if self.remasking == "random":
            conf = random_scores(state)
        else:
            zc = suppress(z, state.eos_ids) if self.eos_low_confidence else z
            conf = token_probs(zc, x0, PROBS_DTYPES[self.probs_dtype])
        scores = scatter(conf, state.mask, float("-inf"))
        k = quota_at(state.memory["quota"], state.step, state.counts)
        return Selection(scatter(x0, state.mask, state.mask_id), top_k_mask(scores, k, state.mask))

    def block_done(self, state: StepState) -> torch.Tensor:
        done = ~state.mask.any(-1)
        if self.quirk_fixed_forwards:
            return done & (state.step >= state.memory["quota"].shape[1])
        return done
