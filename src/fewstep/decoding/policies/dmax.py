"""DMax's soft parallel decoding (SPD): self-correcting decoding with soft embeddings (czg1225/DMax, dInfer's
``ThresholdParallelDecoder.decode_uniform`` and ``BlockDiffusionRunner.decode_uniform``).

Per block, the **active** set ``A`` is the block's masks at its start. Each forward:

1. ``ŷ`` = argmax (Gumbel sample at ``temperature`` > 0), ``c`` = its probability, ``m`` = the max
   probability (float32, ``exp(z - logsumexp z)``);
2. the **confident prefix** of the masks: the masks left of the first mask with ``c < threshold``
   (at least the leftmost mask) are committed;
3. **revision**: every position of ``A`` decoded before this forward is re-predicted: its token is
   replaced by ``ŷ`` (committed tokens stay mutable until the block closes; there is no re-masking);
4. **convergence**: the block is done when every ``m`` over ``A`` is >= ``convergence``, or nothing
   changed, or after ``block_length`` forwards;
5. otherwise the next forward takes **soft embeddings**: a decoded active position gets the
   norm-preserving mix ``ν·(m·E[ŷ] + (1−m)·E[mask]) / (‖m·E[ŷ] + (1−m)·E[mask]‖ + 1e-6)`` with
   ``ν = m‖E[ŷ]‖ + (1−m)‖E[mask]‖`` (``ŷ`` the argmax), every other position its token's embedding.
   ``soft=False`` keeps the token ids (revision with hard embeddings, an ablation).

With the exact block cache the finished block is stored by the next block's first forward, which also
runs it with its final ids (``folds_store``: one forward, one NFE), as dInfer does. The generation loop
(:mod:`fewstep.decoding.engine`) does the rest: the prompt prefill, the early stop, and the input
embeddings it hands this policy (:attr:`StepState.embed`, :attr:`StepState.mask_embedding`).

Recipe (DMax's evaluation scripts, ``eval_llada_dmax_{math,code}.sh``): ``threshold`` 0.5 for math
(:data:`THRESHOLD_MATH`), 0.65 for code (:data:`THRESHOLD_CODE`), block 32, prefix cache, early stop,
greedy; the convergence confidence 0.9 and the ``block_length``-forward cap are the decoder's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.decoding.policies.base import (
    Policy,
    Selection,
    StepState,
    check_range,
    check_temperature,
    sample_candidates,
)

THRESHOLD_MATH = 0.5  # eval_llada_dmax_math.sh
THRESHOLD_CODE = 0.65  # eval_llada_dmax_code.sh
CONVERGENCE = 0.9  # decode_uniform's stop: every active max-probability >= 0.9
NORM_EPS = 1e-6  # the renormalisation's guard (``current_norm + 1e-6``)


@dataclass
class SoftParallelPolicy(Policy):
    """DMax soft parallel decoding: confident-prefix commits, revision of the open block, soft embeddings."""

    summary = "DMax soft parallel decoding: confident left-to-right prefix, revision until the block converges"
    paper = "DMax, arXiv 2604.08302"
    name = "spd"
    positional = "threshold"
    uses_block_scalars = False  # reads block_length only, which every row of a group shares
    revises = True
    uses_embeddings = True
    folds_store = True

    threshold: float = THRESHOLD_MATH
    convergence: float = CONVERGENCE
    soft: bool = True
    temperature: float = 0.0

    def __post_init__(self):
        check_range(f"{self.name}.threshold", self.threshold, 0.0, 1.0)
        check_range(f"{self.name}.convergence", self.convergence, 0.0, 1.0)
        check_temperature(self)

    def start_block(self, state: StepState) -> dict[str, torch.Tensor]:
        return {"active": state.mask.clone(), "done": torch.zeros_like(state.mask[:, 0])}

    def block_done(self, state: StepState) -> torch.Tensor:
        return state.memory["done"] | (state.step >= state.block_length)

    def select(self, logits: torch.Tensor, state: StepState) -> Selection:
        R, L, V = logits.shape
        z = logits.float()
        flat = z.reshape(R * L, V)
        x0 = sample_candidates(flat, _every_position(state), self.temperature).view(R, L)
        lse = torch.logsumexp(z, dim=-1)
        top, argmax = z.max(dim=-1)
        top_p = torch.exp(top - lse)  # the max probability (convergence, soft weights)
        p = top_p if self.temperature == 0 else torch.exp(z.gather(-1, x0[..., None]).squeeze(-1) - lse)
        mask, active = state.mask, state.memory["active"]
        update = _updates(mask, active, p, self.threshold)
        changed = update & (x0 != state.tokens)
        tokens = torch.where(update, x0, state.tokens)
        converged = torch.where(active, top_p >= self.convergence, True).all(-1)
        done = converged | ~changed.any(-1) | (state.step + 1 >= state.block_length)
        embeds = None
        if self.soft and not bool(done.all()):
            soft = active & (tokens != state.mask_id)
            embeds = soft_embeddings(state, tokens, soft, argmax if self.temperature else x0, top_p)
        return Selection(tokens, update, {"done": done, "active": active}, embeds)


def _updates(mask: torch.Tensor, active: torch.Tensor, p: torch.Tensor, threshold: float) -> torch.Tensor:
    """The positions this forward writes: the masks' confident left-to-right prefix (at least the leftmost
    mask) and every active position decoded before it; with no mask left, the whole active set."""
    low = mask & (torch.where(mask, p, float("-inf")) < threshold)
    prefix = mask & ~(low.cumsum(-1) > 0)
    first = mask & (mask.long().cumsum(-1) == 1)
    chosen = torch.where(prefix.any(-1, keepdim=True), prefix, first)
    return torch.where(mask.any(-1, keepdim=True), chosen | (active & ~mask), active)


def soft_embeddings(
    state: StepState, tokens: torch.Tensor, soft: torch.Tensor, top: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """``[R, L, D]``: the token embeddings of ``tokens``, and at ``soft`` positions the norm-preserving mix of
    the argmax ``top``'s embedding and the mask embedding weighted by ``top_p`` (dInfer's order of operations)."""
    if state.embed is None or state.mask_embedding is None:
        raise RuntimeError("soft parallel decoding needs the model's input embedding (an engine that gives it)")
    hard = state.embed(tokens)
    e_top = state.embed(top)
    e_mask = state.mask_embedding
    w = top_p[..., None]
    rest = (1.0 - w).clamp_min(0.0)
    mix = e_top * w + e_mask * rest
    target = torch.linalg.vector_norm(e_top, dim=-1, keepdim=True) * w + torch.linalg.vector_norm(e_mask) * rest
    mix = mix * (target / (torch.linalg.vector_norm(mix, dim=-1, keepdim=True) + NORM_EPS))
    return torch.where(soft[..., None], mix.to(hard.dtype), hard)


def _every_position(state: StepState) -> StepState:
    """A view of ``state`` whose candidates are every block position (ŷ is needed everywhere)."""
    return StepState(**{**state.__dict__, "mask": torch.ones_like(state.mask)})
