"""LLaDA's masked-diffusion pretraining / SFT objective (algorithms.md section 1.4).

For each sequence draw ``t ~ U(eps, 1)``, replace each response token by the mask token with
probability ``t`` (the prompt is never masked), and minimise the cross-entropy of the masked tokens
weighted by ``1/t``. Responses are padded with EOS to the generation length and the EOS padding is
trained like any token, so the model learns where an answer ends. Normalisation follows LLaDA's
guidelines: per sequence by its answer length (response plus EOS padding), then the mean over the
batch. With every answer padded to the same ``gen_length`` this equals the sum over the batch divided
by ``batch * gen_length``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.train.objective import Objective, SpecialIds


def mdm_loss(
    logits: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, answer_len: torch.Tensor
) -> torch.Tensor:
    """``mean_b( sum_{i masked} CE(logits[b,i], labels[b,i]) / t_b / answer_len_b )``.

    ``logits`` [B, L, V] (aligned: position i predicts token i), ``labels`` [B, L], ``masked`` [B, L]
    bool, ``t`` [B] the masking probabilities, ``answer_len`` [B] the number of response positions.
    Cross-entropy is computed in float32 on the masked positions only.
    """
    ce = F.cross_entropy(logits[masked].float(), labels[masked], reduction="none")
    weights = (1.0 / (t * answer_len.to(t.dtype)))[:, None].expand_as(masked)[masked]
    return (ce * weights).sum() / masked.shape[0]


class MaskedDiffusionObjective(Objective):
    """LLaDA's objective as a fewstep :class:`Objective` (the loss of ``fewstep pretrain``).

    ``gen_length``: pad every response with EOS to this length (responses longer than it are an
    error); None pads to the longest response of each batch, as LLaDA's SFT does.
    """

    name = "mdm"

    def __init__(self, ids: SpecialIds, max_length: int, gen_length: int | None = None, eps: float = 1e-3):
        super().__init__(ids, max_length)
        if not 0 < eps < 1:
            raise ValueError("eps must lie in (0, 1)")
        self.gen_length = gen_length
        self.eps = eps

    def collate(self, examples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Left-pad prompts, EOS-pad responses, draw ``t`` and the masks from ``generator``."""
        input_ids, attention_mask, response = pad_prompt_response(examples, self.ids, self.gen_length)
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"a batch is {input_ids.shape[1]} tokens long, over max_length {self.max_length}")
        b = input_ids.shape[0]
        t = (1 - self.eps) * torch.rand(b, generator=generator) + self.eps
        draw = torch.rand(input_ids.shape, generator=generator)
        masked = response & (draw < t[:, None])
        return {
            "input_ids": torch.where(masked, torch.full_like(input_ids, self.ids.mask), input_ids),
            "labels": input_ids,
            "attention_mask": attention_mask,
            "masked": masked,
            "t": t,
            "answer_len": response.sum(1),
        }

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        *,
        step: int,
        max_steps: int,
        teacher: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.logits(model, batch["input_ids"], batch["attention_mask"])
        loss = mdm_loss(logits, batch["labels"], batch["masked"], batch["t"], batch["answer_len"])
        return loss, {"loss": float(loss.detach()), "masked": float(batch["masked"].sum() / batch["answer_len"].sum())}


def pad_prompt_response(
    examples: list[dict[str, Any]], ids: SpecialIds, gen_length: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[pad.. prompt | response EOS..]`` rows: prompts left-padded to the batch's longest, responses
    EOS-padded to ``gen_length`` (or the batch's longest). Returns ``input_ids``, ``attention_mask``
    (0 on the left padding) and ``response`` (True on the response and its EOS padding)."""
    p_len = max(len(e["prompt_ids"]) for e in examples)
    longest = max(len(e["response_ids"]) for e in examples)
    g = longest if gen_length is None else gen_length
    if longest > g:
        raise ValueError(f"a response has {longest} tokens, more than the generation length {g}")
    rows, att = [], []
    for e in examples:
        p, r = list(e["prompt_ids"]), list(e["response_ids"])
        pad = p_len - len(p)
        rows.append([ids.pad] * pad + p + r + [ids.eos] * (g - len(r)))
        att.append([0] * pad + [1] * (len(p) + g))
    input_ids = torch.tensor(rows, dtype=torch.long)
    attention_mask = torch.tensor(att, dtype=torch.long)
    response = torch.zeros_like(input_ids, dtype=torch.bool)
    response[:, p_len:] = True
    return input_ids, attention_mask, response
