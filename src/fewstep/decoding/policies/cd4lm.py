"""CD4LM's Confidence-Adaptive Decoding (CAD).

Liang et al., "CD4LM: Consistency Distillation and aDaptive Decoding for Diffusion Language Models"
(arXiv 2601.02236), reference code ``yihao-liang/CDLM`` ``scripts/LLaDA_generate_dynamic.py``
(``generate_block`` and the global ``generate``). Each step commits between ``min_tokens`` and
``max_tokens`` of the block's masked positions: all those whose confidence reaches the threshold, the
most confident first, at least ``min_tokens``. End-of-sequence predictions are held back until enough
of the answer exists, and a block that does not converge is force-completed after
``max_steps_per_block`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.decoding.policies.base import (
    Policy,
    Selection,
    StepState,
    check_choice,
    check_range,
    check_temperature,
    chunks,
    entropy,
    gumbel_argmax,
    random_scores,
    ranks,
    scatter,
    token_probs,
)


def stabilise(z: torch.Tensor) -> torch.Tensor:
    """CAD's logit preprocessing: float32, non-finite -> 0, minus the row max, clamped to [-50, 50]."""
    z = z.to(torch.float32)
    z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    z = z - z.amax(dim=-1, keepdim=True)
    return torch.clamp(z, min=-50.0, max=50.0)


@dataclass
class CADPolicy(Policy):
    """Confidence-Adaptive Decoding. Per step, with ``Q_v`` the block's masked positions not EOS-gated:

    ``k = min(max(#{c >= threshold}, min_tokens), max_tokens, |Q_v|)`` most confident of ``Q_v``.

    Options (defaults: the settings the authors evaluate with; the function's own signature defaults
    are ``threshold=0.8, max_tokens=4, eos_ratio=0.5``):

    * ``threshold`` (confidence selection) / ``entropy_threshold`` (entropy selection, on the negative
      entropy ``Σ p log(p + 1e-10)`` ≤ 0);
    * ``min_tokens``, ``max_tokens``: bounds on the tokens committed per step;
    * ``max_steps_per_block``: after this many steps a forced step commits every non-gated mask and the
      block is left (None: ``block_length``; in ``global`` mode None means no limit). The name is the
      reference's; it is a *forced completion* that is part of the algorithm, not the safety limit of
      the same name in :func:`fewstep.generate` (which raises when a block takes too many forwards);
      CAD's forced step ends every block well before that limit;
    * ``eos_ratio``: while ``(generated tokens) / gen_length < eos_ratio``, positions predicting a token
      of ``eos_ids`` are not committed; ``eos_ids`` None means the model's EOS plus the tokenizer's
      end-of-turn token (whatever :func:`fewstep.generate` was given);
    * ``selection``: ``confidence``, ``entropy`` or ``random``; ``remasking='random'`` overrides it;
    * ``mode``: ``block`` (semi-autoregressive, ``generate_block``) or ``global`` (one block over the
      whole answer, the reference ``generate``);
    * ``temperature``: Gumbel-max sampling of the prediction (CAD adds Gumbel noise to ``z / T``).

    Logits are stabilised as in the reference (float32, max-subtracted, clamped to [-50, 50]).

    If every candidate is EOS-gated, ``min_tokens`` positions are committed anyway (EOS included);
    by default the most confident ones. ``quirk_gated_fallback_topk`` reproduces the reference, which
    takes whatever ``torch.topk`` returns over a vector of -inf values (CPU tie order).
    """

    summary = "CD4LM Confidence-Adaptive Decoding: min..max tokens above the threshold, EOS gating"
    paper = "CD4LM, arXiv 2601.02236"
    name = "cad"
    positional = "threshold"

    threshold: float = 0.95
    entropy_threshold: float = -0.3
    min_tokens: int = 1
    max_tokens: int = 32
    max_steps_per_block: int | None = None
    eos_ratio: float = 0.3
    eos_ids: tuple[int, ...] | None = None
    selection: str = "confidence"
    remasking: str = "low_confidence"
    mode: str = "block"
    temperature: float = 0.0
    quirk_gated_fallback_topk: bool = False

    def __post_init__(self):
        check_range(f"{self.name}.threshold", self.threshold, 0.0, 1.0)
        check_range(f"{self.name}.entropy_threshold", self.entropy_threshold, float("-inf"), 0.0)
        check_range(f"{self.name}.min_tokens", self.min_tokens, 1, float("inf"))
        check_range(f"{self.name}.max_tokens", self.max_tokens, self.min_tokens, float("inf"))
        if self.max_steps_per_block is not None:
            check_range(f"{self.name}.max_steps_per_block", self.max_steps_per_block, 0, float("inf"))
        check_range(f"{self.name}.eos_ratio", self.eos_ratio, 0.0, 1.0)
        check_temperature(self)
        check_choice(f"{self.name}.selection", self.selection, ("confidence", "entropy", "random"))
        check_choice(f"{self.name}.remasking", self.remasking, ("low_confidence", "random"))
        check_choice(f"{self.name}.mode", self.mode, ("block", "global"))
        if self.eos_ids is not None:
            self.eos_ids = tuple(int(i) for i in self.eos_ids)

    def blocks(self, gen_length: int, block_length: int) -> int:
        return gen_length if self.mode == "global" else block_length

    def _max_steps(self, block_length: int) -> float:
        if self.max_steps_per_block is not None:
            return self.max_steps_per_block
        return float("inf") if self.mode == "global" else block_length

    def select(self, logits: torch.Tensor, state: StepState) -> Selection:
        mask = state.mask
        z = logits[mask]
        noise = None
        if self.temperature > 0:
            noise = state.rng.uniform(state.rows, state.counts, z.shape[-1], torch.float32)
        x0, score, i = [], [], 0
        for c in chunks(z, itemsize=4):  # stabilise and score chunk by chunk (bounded temporaries)
            c = stabilise(c)
            n = c.shape[0]
            x0.append(c.argmax(-1) if noise is None else gumbel_argmax(c, self.temperature, noise[i : i + n]))
            if self.selection == "entropy":
                score.append(-entropy(c, None, 1e-10))  # negative entropy, <= 0
            elif self.selection == "confidence":
                score.append(token_probs(c, x0[-1], None))
            i += n
        x0 = torch.cat(x0) if x0 else z.new_empty(0, dtype=torch.long)
        if self.remasking == "random" or self.selection == "random":
            score = random_scores(state)
        else:
            score = torch.cat(score) if score else z.new_empty(0, dtype=torch.float32)
        tokens = scatter(x0, mask, state.mask_id)
        conf = scatter(score, mask, float("-inf"))
        raw = conf
        # EOS gating, by progress over the whole answer measured before this step's writes
        eos = self.eos_ids if self.eos_ids is not None else state.eos_ids
        progress = (state.gen_length - state.gen_masked).to(torch.float64) / state.gen_length
        early = progress < self.eos_ratio
        if eos and bool(early.any()):
            is_eos = torch.isin(tokens, torch.tensor(eos, device=tokens.device)) & mask
            conf = conf.masked_fill(is_eos & early[:, None], float("-inf"))
        valid = mask & torch.isfinite(conf)
        n_valid = valid.sum(-1)
        forced = state.step >= self._max_steps(state.block_length)
        # normal step: k = clamp(#above, min, max, |valid|)
        thr = self.entropy_threshold if self.selection == "entropy" else self.threshold
        above = ((conf >= thr) & valid).sum(-1)
        k = torch.minimum(above.clamp(min=self.min_tokens, max=self.max_tokens), n_valid)
        commit = (ranks(conf) < k[:, None]) & valid
        commit = torch.where(forced[:, None], valid, commit)
        gated = ~forced & (n_valid == 0) & mask.any(-1)
        if bool(gated.any()):
            commit = commit | self._gated_fallback(raw, mask, gated)
        return Selection(tokens, commit)

    def _gated_fallback(self, raw: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``min_tokens`` positions for rows whose every candidate is EOS-gated."""
        out = torch.zeros_like(mask)
        if not self.quirk_gated_fallback_topk:
            k = torch.full((mask.shape[0],), self.min_tokens, device=mask.device)
            return (ranks(raw) < k[:, None]) & mask & rows[:, None]
        for r in rows.nonzero().flatten().tolist():
            pos = mask[r].nonzero().flatten()
            k = min(self.min_tokens, pos.numel())
            ninf = torch.full((pos.numel(),), float("-inf"), dtype=torch.float32, device=mask.device)
            out[r, pos[torch.topk(ninf, k=k).indices]] = True
        return out

    def block_done(self, state: StepState) -> torch.Tensor:
        # a forced step (taken at step index max_steps) ends the block even if gated masks remain
        return ~state.mask.any(-1) | (state.step > self._max_steps(state.block_length))
