"""SDAR's official unmasking rules (``block_diffusion_generate`` of JetAstra/SDAR ``generate.py``).

One policy, four ``remasking_strategy`` values, each over one block of ``block_length`` positions with
the schedule ``block_length`` split evenly over ``denoising_steps`` (remainder on the first steps):

* ``sequential``: the ``schedule[step]`` positions starting at the first mask (left to right);
* ``low_confidence_static``: the ``schedule[step]`` most confident masks (``p(x̂)``, softmax in the
  logits' dtype);
* ``low_confidence_dynamic``: every mask with ``p(x̂) > confidence_threshold`` (strict) if there are at
  least ``schedule[step]`` of them, else the ``schedule[step]`` most confident;
* ``entropy_bounded``: masks sorted by entropy (ascending), the first ``k`` with
  ``k = #(cumsum(entropy) < eb_threshold)`` clamped to ``[1, #masks]`` (the EB-sampler rule).

Defaults do the intended thing; the recorded official behaviour is reproduced with these quirks:

* ``quirk_uncapped_topk``: the official top-k is not capped at the number of masks. When a block has
  fewer masks than the schedule asks for (the first block holds the prompt tail), ``torch.topk`` also
  picks ``-inf`` positions and the loop **overwrites** those decoded (or prompt) tokens with the
  argmax there. With the quirk, ``commit`` may include non-mask positions, chosen by ``torch.topk`` over
  the block's confidence vector (torch's tie order, so only reproducible with the same torch).
* ``quirk_row_entropy``: the official ``entropy_bounded`` sums ``-p·log p`` of the chosen tokens'
  probabilities over **every** block position into one number per row, so all masks tie; they are
  ordered by ``torch.sort`` (ascending position on this CPU build for <= 16 entries) and ``k`` comes
  from the cumulative sum of that repeated number.
* ``quirk_iteration_cap``: the official loop makes at most ``denoising_steps + 1`` iterations per block,
  so ``entropy_bounded`` can leave masks in a block (which is then never stored in the cache); off,
  the block is decoded until no mask is left (each step commits at least one).

``temperature`` 0 is greedy (the official sampler divides by the temperature and crashes at 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.decoding.policies.base import (
    OptionError,
    Policy,
    Selection,
    StepState,
    check_choice,
    check_range,
    check_temperature,
    entropy,
    even_quota,
    quota_at,
    ranks,
    sample_candidates,
    token_probs,
    top_k_mask,
)

STRATEGIES = ("sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded")


@dataclass
class SDARPolicy(Policy):
    """SDAR ``block_diffusion_generate``: sequential, low_confidence_static/dynamic or entropy_bounded."""

    summary = "SDAR block_diffusion_generate: sequential, low_confidence_static/dynamic, entropy_bounded"
    paper = "SDAR, `JetAstra/SDAR`"
    name = "sdar"
    positional = "remasking_strategy"

    remasking_strategy: str = "low_confidence_dynamic"
    denoising_steps: int = 4
    confidence_threshold: float = 0.85
    eb_threshold: float = 0.35
    temperature: float = 0.0
    quirk_uncapped_topk: bool = False
    quirk_row_entropy: bool = False
    quirk_iteration_cap: bool = False

    def __post_init__(self):
        check_choice(f"{self.name}.remasking_strategy", self.remasking_strategy, STRATEGIES)
        check_range(f"{self.name}.confidence_threshold", self.confidence_threshold, 0.0, 1.0)
        check_range(f"{self.name}.eb_threshold", self.eb_threshold, 0.0, float("inf"))
        check_temperature(self)
        if self.denoising_steps < 1:
            raise OptionError(
                f"{self.name}.denoising_steps must be >= 1; got {self.denoising_steps}", "denoising_steps"
            )

    def start_block(self, state: StepState) -> dict[str, torch.Tensor]:
        full = torch.full_like(state.counts, state.block_length)
        return {"quota": even_quota(full, self.denoising_steps)}

    def iteration_cap(self) -> int | None:
        return self.denoising_steps + 1 if self.quirk_iteration_cap else None

    def block_done(self, state: StepState) -> torch.Tensor:
        done = ~state.mask.any(-1)
        if self.quirk_iteration_cap:
            return done | (state.step >= self.denoising_steps + 1)
        return done

    def select(self, logits: torch.Tensor, state: StepState) -> Selection:
        R, L, _ = logits.shape
        flat = logits.reshape(R * L, -1)
        x0 = sample_candidates(flat, _all_positions(state), self.temperature).view(R, L)
        p = token_probs(flat, x0.reshape(-1), None).view(R, L)
        k = quota_at(state.memory["quota"], state.step, torch.full_like(state.counts, L))
        s = self.remasking_strategy
        if s == "entropy_bounded":
            commit = self._entropy_bounded(flat.view(R, L, -1), p, state)
        elif s == "sequential":
            first = state.mask.float().argmax(-1)
            pos = torch.arange(L, device=logits.device)[None]
            commit = (pos >= first[:, None]) & (pos < (first + k)[:, None]) & state.mask.any(-1, keepdim=True)
        else:
            conf = p.masked_fill(~state.mask, float("-inf"))
            commit = self._top(conf, k, state)
            if s == "low_confidence_dynamic":
                above = (conf > self.confidence_threshold) & state.mask
                commit = torch.where((above.sum(-1) >= k)[:, None], above, commit)
        if not self.quirk_uncapped_topk:
            commit = commit & state.mask
        return Selection(torch.where(commit, x0, state.tokens), commit)

    def _top(self, conf: torch.Tensor, k: torch.Tensor, state: StepState) -> torch.Tensor:
        if not self.quirk_uncapped_topk:
            return top_k_mask(conf, torch.minimum(k, state.counts), state.mask)
        out = torch.zeros_like(state.mask)
        for r in range(conf.shape[0]):  # torch.topk per row, as the official loop (its tie order)
            out[r, torch.topk(conf[r], int(k[r])).indices] = True
        return out

    def _entropy_bounded(self, z: torch.Tensor, p: torch.Tensor, state: StepState) -> torch.Tensor:
        R, L, _ = z.shape
        if self.quirk_row_entropy:
            row = -(p * torch.log(p)).sum(-1, keepdim=True)
            ent = torch.where(state.mask, row.expand(R, L), torch.full_like(p, float("inf")))
            order = torch.sort(ent, dim=-1).indices
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=z.device).expand_as(order))
        else:
            ent = torch.full((R, L), float("inf"), dtype=torch.float32, device=z.device)
            ent[state.mask] = entropy(z[state.mask], torch.float32, 1e-12).float()
            rank = ranks(ent, descending=False)
        sorted_ent = torch.sort(ent, dim=-1).values
        k = (sorted_ent.cumsum(-1) < self.eb_threshold).sum(-1)
        k = torch.minimum(k.clamp_min(1), state.counts)
        return (rank < k[:, None]) & state.mask


def _all_positions(state: StepState) -> StepState:
    """A view of ``state`` whose candidates are every block position (x̂ is needed everywhere)."""
    mask = torch.ones_like(state.mask)
    return StepState(**{**state.__dict__, "mask": mask})
