"""Dream's own samplers (``diffusion_generate``): ``entropy``, ``maskgit_plus``, ``topk_margin`` and
``confidence_threshold``.

Ye et al., "Dream 7B: Diffusion Large Language Models" (arXiv 2508.15487), reference code
``DreamGenerationMixin._sample`` in the checkpoint's ``generation_utils.py`` (as shipped with
``czg1225/dParallel`` ``Dream/model/``). Each step scores the masked positions (max probability,
top-1 minus top-2 margin, or negative entropy) and commits the best ``n`` of them, where ``n``
follows Dream's schedule ``int(masks * (1 - s / t))`` on ``linspace(1, eps, steps + 1)`` and the
last step commits everything left. ``confidence_threshold`` commits an even quota per step but keeps
(for later steps) the quota's positions whose confidence is below the threshold; after the last
scheduled step it continues until nothing is masked.

The reference decodes the whole answer as one block; here the same rule runs per block with
``steps / num_blocks`` steps each (``block_length = gen_length`` reproduces the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fewstep.decoding.policies.base import (
    FixedSteps,
    Policy,
    Selection,
    StepState,
    check_choice,
    check_range,
    check_temperature,
    chunks,
    even_quota,
    gumbel_argmax,
    ranks,
    scatter,
)

ALGS = ("entropy", "maskgit_plus", "topk_margin", "confidence_threshold")


def nucleus(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most probable tokens whose mass reaches ``top_p`` (the first always)."""
    sorted_z, order = torch.sort(z, dim=-1, descending=True)
    cum = torch.cumsum(F.softmax(sorted_z, dim=-1), dim=-1)
    drop = torch.zeros_like(cum, dtype=torch.bool)
    drop[..., 1:] = cum[..., :-1] > top_p
    return z.masked_fill(drop.scatter(-1, order, drop), torch.finfo(z.dtype).min)


def top_k_filter(z: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (and ties with the k-th)."""
    kth = torch.topk(z, min(top_k, z.shape[-1]), dim=-1).values[..., -1:]
    return z.masked_fill(z < kth, torch.finfo(z.dtype).min)


@dataclass
class DreamPolicy(FixedSteps, Policy):
    """Dream ``diffusion_generate`` with ``alg`` = ``entropy`` (default), ``maskgit_plus``,
    ``topk_margin`` or ``confidence_threshold``.

    * ``steps``: total steps (None: ``gen_length``), a multiple of the number of blocks;
    * ``eps``: the schedule's final time (``linspace(1, eps, steps + 1)``), 1e-3 as in Dream;
    * ``temperature``, ``top_p``, ``top_k``: sampling of the prediction (0 = greedy); the scores are
      computed from the tempered, filtered distribution, as in Dream;
    * ``alg_temp``: if > 0, the positions to commit are sampled (without replacement) from
      ``softmax(score / alg_temp)`` instead of taken best-first;
    * ``threshold``: for ``confidence_threshold`` only (Dream's default 0.9).
    """

    summary = "Dream diffusion_generate: entropy, maskgit_plus, topk_margin or confidence_threshold"
    paper = "Dream 7B, arXiv 2508.15487"
    name = "dream"
    positional = "alg"

    alg: str = "entropy"
    steps: int | None = None
    threshold: float = 0.9
    eps: float = 1e-3
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    alg_temp: float = 0.0

    def __post_init__(self):
        check_choice(f"{self.name}.alg", self.alg, ALGS)
        check_range(f"{self.name}.threshold", self.threshold, 0.0, 1.0)
        check_range(f"{self.name}.eps", self.eps, 0.0, 1.0, lo_open=True, hi_open=True)
        check_temperature(self)
        check_temperature(self, "alg_temp")
        if self.top_p is not None:
            check_range(f"{self.name}.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.top_k is not None:
            check_range(f"{self.name}.top_k", self.top_k, 1, float("inf"))

    def start_block(self, state: StepState) -> dict[str, torch.Tensor]:
        s = self._steps(state.gen_length, state.block_length)
        if self.alg == "confidence_threshold":
            return {"quota": even_quota(state.counts, s)}
        return {
            "timesteps": torch.linspace(1, self.eps, s + 1, device=state.mask.device).expand(state.mask.shape[0], -1)
        }

    # -- scoring ------------------------------------------------------------------------------------
    def _scores(self, z: torch.Tensor, state: StepState) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and scores ``[K]`` for the candidate logits ``z`` [K, V] (Dream's ``sample_tokens``)."""
        noise = None
        if self.temperature > 0:
            noise = state.rng.uniform(state.rows, state.counts, z.shape[-1], torch.float32)
        tokens, scores, i = [], [], 0
        for c in chunks(z, itemsize=4):
            n = c.shape[0]
            if self.temperature > 0:
                c = c / self.temperature
            if self.top_p is not None and self.top_p < 1:
                c = nucleus(c, self.top_p)
            if self.top_k is not None:
                c = top_k_filter(c, self.top_k)
            p = F.softmax(c, dim=-1)
            if noise is None:
                conf, x0 = p.max(dim=-1)
            else:
                x0 = gumbel_argmax(torch.log(p), 1.0, noise[i : i + n])  # c is already divided by T
                conf = p.gather(-1, x0[:, None]).squeeze(-1)
            if self.alg == "topk_margin":
                top2 = torch.topk(p, 2, dim=-1).values
                conf = top2[:, 0] - top2[:, 1]
            elif self.alg == "entropy":
                conf = torch.sum(p * torch.log(p + 1e-10), dim=-1)
            tokens.append(x0)
            scores.append(conf)
            i += n
        return torch.cat(tokens), torch.cat(scores)

    def select(self, logits: torch.Tensor, state: StepState) -> Selection:
        mask, counts, step = state.mask, state.counts, state.step
        x0, conf = self._scores(logits[mask], state)
        tokens = scatter(x0, mask, state.mask_id)
        conf = scatter(conf, mask, float("-inf"))
        rank = ranks(conf)
        if self.alg == "confidence_threshold":
            quota = state.memory["quota"]
            s = quota.shape[1]
            # the quota still reserved for the later scheduled steps; the rest may be committed now
            later = torch.where(
                step[:, None] < torch.arange(s, device=quota.device)[None, :], quota, torch.zeros_like(quota)
            ).sum(-1)
            requested = counts - later
            commit = (rank < requested[:, None]) & ((conf >= self.threshold) | (rank == 0)) & mask
            return Selection(tokens, commit)
        ts = state.memory["timesteps"]
        s = ts.shape[1] - 1
        i = step.clamp(max=s - 1)
        t, u = ts.gather(1, i[:, None]).squeeze(1), ts.gather(1, (i + 1)[:, None]).squeeze(1)
        n = (counts.to(torch.float32) * (1 - u / t)).long()
        n = torch.where(step < s - 1, n, counts)
        if self.alg_temp > 0:
            w = conf / self.alg_temp
            noise = state.rng.uniform(state.rows, torch.ones_like(counts), w.shape[-1], torch.float32)
            g = -torch.log(-torch.log(noise.clamp_min(torch.finfo(torch.float32).tiny)))
            rank = ranks(torch.where(mask, torch.log_softmax(w, -1) + g, float("-inf")))
        return Selection(tokens, (rank < n[:, None]) & mask)
