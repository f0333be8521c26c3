"""LLaDA2's official unmasking rule (``LLaDA2MoeModelLM.generate``, dFactory / dInfer / dllm).

Per block, ``steps`` (capped at ``gen_length // minimal_topk``) denoising steps with the schedule
``block_length`` split evenly over them (remainder on the first steps): the schedule is a **minimum**
per step. If at least ``schedule[step]`` masked positions of the block have ``p(x̂) > threshold``
(strict), all of them are committed; otherwise the ``min(schedule[step], #masks)`` most confident are.
The threshold can therefore only add tokens. ``x̂`` is the argmax at ``temperature`` 0 and the confidence
is ``softmax(z)[x̂]`` in the logits' dtype (float32: LLaDA2's logits are float32).

The block loop (block-aligned prompt prefill, EOS stop, the exact block cache) belongs to the
generation loop; see ``docs/models.md``.

``quirk_temperature_zero_samples``: the official ``_sample_with_temperature_topk_topp`` has no greedy
branch, so ``temperature=0`` *samples* at temperature 1 (its docstring says greedy). With the quirk on,
``temperature=0`` samples from ``softmax(z)`` (from fewstep's row RNG, so not the official
``torch.multinomial`` stream); off (default) it is greedy, as dllm's copy of the sampler does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.decoding.policies.base import (
    OptionError,
    Policy,
    Selection,
    StepState,
    check_range,
    check_temperature,
    even_quota,
    quota_at,
    sample_candidates,
    scatter,
    token_probs,
    top_k_mask,
)


@dataclass
class LLaDA2Policy(Policy):
    """LLaDA2 ``generate``: threshold 0.95 with the even-schedule top-k fallback, per block."""

    summary = "LLaDA2 generate: commit all masks with p > threshold if at least the schedule's count, else top-k"
    paper = "LLaDA2.0, the checkpoints' `generate`"
    name = "llada2"
    positional = "threshold"

    threshold: float = 0.95
    steps: int = 32
    minimal_topk: int = 1
    temperature: float = 0.0
    quirk_temperature_zero_samples: bool = False

    def __post_init__(self):
        check_range(f"{self.name}.threshold", self.threshold, 0.0, 1.0)
        check_temperature(self)
        if self.steps < 1 or self.minimal_topk < 1:
            raise OptionError(f"{self.name}.steps and minimal_topk must be >= 1; got {self.steps}, {self.minimal_topk}")

    def steps_per_block(self, gen_length: int) -> int:
        """``min(steps, gen_length // minimal_topk)``, as the official code caps it (at least 1)."""
        return max(1, min(self.steps, gen_length // self.minimal_topk))

    def start_block(self, state: StepState) -> dict[str, torch.Tensor]:
        s = self.steps_per_block(state.gen_length)
        full = torch.full_like(state.counts, state.block_length)
        return {"quota": even_quota(full, s)}  # the schedule splits block_length, not the mask count

    def select(self, logits: torch.Tensor, state: StepState) -> Selection:
        z = logits[state.mask]
        temp = 1.0 if (self.temperature == 0 and self.quirk_temperature_zero_samples) else self.temperature
        x0 = sample_candidates(z, state, temp)
        conf = scatter(token_probs(z, x0, None), state.mask, float("-inf"))
        k = torch.minimum(quota_at(state.memory["quota"], state.step, state.counts), state.counts)
        above = (conf > self.threshold) & state.mask
        use_threshold = above.sum(-1) >= k
        commit = torch.where(use_threshold[:, None], above, top_k_mask(conf, k, state.mask))
        return Selection(scatter(x0, state.mask, state.mask_id), commit)
