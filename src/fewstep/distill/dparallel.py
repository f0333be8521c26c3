"""dParallel: certainty-forcing distillation (Chen et al., arXiv 2509.26488, ICLR 2026).

The student (LoRA on the teacher itself) is trained on the teacher's own semi-autoregressive outputs
with two complementary masked views of every sequence:

* **Masking** (:func:`complementary_masks`): pick a random response block; earlier blocks (and the
  prompt) stay clean, later blocks are fully masked (inputs only, never in the loss), and inside the
  block a Bernoulli(0.5005) mask ``s`` gives view 1 (positions ``s``) and its complement view 2
  (positions ``~s``). Dream uses no blocks: the whole response is the active span.
* **Loss** (:func:`certainty_forcing_loss`): per view, cross-entropy on the masked positions plus the
  entropy of ``softmax(z / τ_H)`` averaged over the masked positions the student already predicts
  correctly (argmax of the untempered logits equals the label); ``L = CE_1 + CE_2 + w·(H_1 + H_2)``.

Every loss is a pure function of logits, labels and masks. Randomness comes from an explicit Python
``random.Random`` (the block index, drawn with ``randint`` as the reference does) and an explicit
``torch.Generator`` (the Bernoulli draws).

``reference=True`` reproduces ``forward_process_semi_ar`` of the official code exactly, including the
batch bugs that are harmless at its batch size of 1 (see :func:`complementary_masks`); the parity
suite checks it against the recorded oracles. The default is the intended per-row semantics; at batch
size 1 both give identical masks from the same random streams.

Block-diffusion models (LLaDA2-MoE, SDAR; ``RECIPES["llada2"]``, ``RECIPES["sdar"]``) are trained the way
dFactory's LLaDA2 dParallel trainer does (:class:`BlockDiffusionDParallelObjective`, end of this file): one
noised view per sequence, fed as ``[noisy | clean]`` under the block-diffusion mask
(:func:`block_diffusion_logits`, also CD4LM's builder on these models), so that every noisy block sees
exactly what it sees when it is decoded: itself and the clean blocks before it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.train.objective import (  # noqa: F401  (logit_shift_of, python_rng, unwrap: old import paths)
    Objective,
    SpecialIds,
    logit_shift_of,
    mean_over_rows,
    python_rng,
    unwrap,
)
from fewstep.train.recipe import TrainingRecipe, recipe_field


@dataclass(frozen=True)
class DParallelRecipe(TrainingRecipe):
    """dParallel's recipe for one model family (``config_lora_{llada,dream}.yaml`` and ``DLMTrainer``).

    The references train on 8 GPUs with an effective batch of 64 sequences, in bfloat16, with AdamW
    (weight decay 0.01, clip 1) and LoRA r = alpha = 128 on LLaDA (whose config lists seven targets, but
    LLaDA names its attention output / MLP gate / MLP down ``attn_out`` / ``ff_proj`` / ``ff_out``, so only
    q, k, v, up are adapted: ``--lora-targets dparallel``) and r = alpha = 32 on all seven projections of
    Dream; sequences are padded to 384 tokens (:data:`PAPER_MAX_LENGTH`).
    """

    block_size: int = recipe_field(32, "dparallel: masking block, 0 = the whole response (Dream's)")
    temperature: float = recipe_field(0.5, "dparallel: entropy temperature")
    entropy_weight: float = recipe_field(2.0, "dparallel: entropy weight w")
    mask_ratio: float = recipe_field(0.5, "dparallel: Bernoulli ratio inside the block")
    reference_masking: bool = recipe_field(False, "dparallel: the official masker bit for bit (batch quirks)")

    def objective(
        self, ids: SpecialIds, max_length: int, *, per_sequence: bool = True, gen_length: int | None = None
    ) -> DParallelObjective:
        """The objective with this recipe's hyper-parameters (``gen_length`` is unused: dParallel pads to
        ``max_length``)."""
        return DParallelObjective(
            ids,
            max_length,
            block_size=self.block_size or None,
            temperature=self.temperature,
            entropy_weight=self.entropy_weight,
            mask_ratio=self.mask_ratio,
            reference_masking=self.reference_masking,
            per_sequence=per_sequence,
        )


@dataclass(frozen=True)
class BlockDParallelRecipe(TrainingRecipe):
    """dParallel on a block-diffusion model (LLaDA2-MoE, SDAR), as dFactory's LLaDA2 dParallel trainer.

    ``train_llada2_bd_with_dparallel.py`` with ``configs/sft/llada2_mini_bd_sft.yaml``: full fine-tuning
    (FSDP2, bf16), AdamW (0.9, 0.999, weight decay 0.1, clip 1), LR 1e-5, one epoch, cosine after a 3 %
    warm-up, global batch 8, noise range (0.3, 0.8), block 32 (LLaDA2's block length), same-position
    labels. ``confidence_beta`` is the certainty-forcing weight; the trainer's own default 0 switches the
    term off and no released config sets it, so fewstep uses 1 (the fixtures' oracles hold 0.5 and 1).
    SDAR has no dParallel recipe of its own: the same settings, with SDAR's block length (4).
    """

    block_size: int = recipe_field(0, "dparallel (block models): block of the [noisy | clean] mask, 0 = the model's")
    confidence_beta: float = recipe_field(1.0, "dparallel (block models): weight of the entropy on correct tokens")
    noise_range_low: float = recipe_field(0.3, "dparallel (block models): lowest masking ratio of a sequence")
    noise_range_high: float = recipe_field(0.8, "dparallel (block models): highest masking ratio of a sequence")
    shifted_labels: bool = recipe_field(
        False, "dparallel (block models): next-token labels (dFactory's same_token_labels false)"
    )

    def objective(
        self, ids: SpecialIds, max_length: int, *, per_sequence: bool = True, gen_length: int | None = None
    ) -> BlockDiffusionDParallelObjective:
        """The block-diffusion objective with this recipe's hyper-parameters (``gen_length`` is unused)."""
        return BlockDiffusionDParallelObjective(
            ids,
            max_length,
            block_size=self.block_size or None,
            confidence_beta=self.confidence_beta,
            noise_range=(self.noise_range_low, self.noise_range_high),
            same_token_labels=not self.shifted_labels,
            per_sequence=per_sequence,
        )


_BLOCK_DPARALLEL = BlockDParallelRecipe(
    finetune="full", lr=1e-5, epochs=1.0, schedule="cosine", warmup_steps=None, warmup_ratio=0.03
)
#: dParallel per model family: the single source of ``fewstep distill --method dparallel``'s defaults,
#: of :func:`fewstep.distill.build_objective` and of the README's recipe table. The block-diffusion
#: families get dFactory's objective (:class:`BlockDiffusionDParallelObjective`).
RECIPES: dict[str, DParallelRecipe | BlockDParallelRecipe] = {
    "llada": DParallelRecipe(finetune="lora", lr=2e-5, epochs=6.0, schedule="constant", warmup_steps=0),
    "dream": DParallelRecipe(
        finetune="lora",
        lr=2e-5,
        epochs=3.0,
        schedule="cosine",
        warmup_steps=None,
        warmup_ratio=0.05,
        block_size=0,
        entropy_weight=1.0,
    ),
    "llada2": _BLOCK_DPARALLEL,
    "sdar": _BLOCK_DPARALLEL,
}
#: The references' sequence length (prompt + response + EOS padding).
PAPER_MAX_LENGTH = 384


def _objective_defaults(family: str) -> dict[str, Any]:
    r = RECIPES[family]
    return {
        "block_size": r.block_size or None,
        "entropy_weight": r.entropy_weight,
        "temperature": r.temperature,
        "max_length": PAPER_MAX_LENGTH,
    }


#: The objective's part of the recipes, as dicts (older names, derived from :data:`RECIPES`).
LLADA_DEFAULTS: dict[str, Any] = _objective_defaults("llada")
DREAM_DEFAULTS: dict[str, Any] = _objective_defaults("dream")


@dataclass
class ComplementaryMasks:
    """Both views of a batch. ``mask``/``mask_rev`` are the loss positions (bool ``[B, L]``)."""

    noisy: torch.Tensor
    noisy_rev: torch.Tensor
    mask: torch.Tensor
    mask_rev: torch.Tensor


def bernoulli_threshold(mask_ratio: float = 0.5, eps: float = 1e-3) -> torch.Tensor:
    """``(1 - eps)·ratio + eps`` in float32, computed as the reference does (0.5005 by default)."""
    return (1 - eps) * torch.tensor(mask_ratio, dtype=torch.float32) + eps


def active_span(prompt_len: int, length: int, block_size: int | None, rng: random.Random) -> tuple[int, int] | None:
    """The active span ``[a, e)`` of one row, or None when the row has no response (``length <= P``).

    With blocks: ``k ~ U{0..⌊R/b⌋}`` (``rng.randint``), ``a = P + k·b``, ``e = a + b`` except for the
    last index, whose span runs to the end (the ragged tail, possibly empty). Without blocks (Dream) the
    whole response is active and ``rng`` is not used.
    """
    response = length - prompt_len
    if response <= 0:
        return None
    if block_size is None:
        return prompt_len, length
    max_blocks = response // block_size
    k = rng.randint(0, max_blocks)
    start = prompt_len + k * block_size
    return start, (length if k == max_blocks else start + block_size)


def complementary_masks(
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor | list[int],
    *,
    mask_id: int,
    rng: random.Random,
    generator: torch.Generator | None = None,
    block_size: int | None = 32,
    mask_ratio: float = 0.5,
    eps: float = 1e-3,
    reference: bool = False,
    view_mask_id: int | None = None,
) -> ComplementaryMasks:
    """Semi-autoregressive complementary masking of a clean batch ``input_ids`` ``[B, L]``.

    Random draws, in order, for each row ``i``: ``rng.randint`` for the block (not with
    ``block_size=None``), then ``torch.rand`` for the Bernoulli draws of the span, so both modes consume
    the streams in the reference's order.

    Default (intended semantics): every row gets its own span; inside it view 1 masks ``s`` and view 2
    masks ``~s`` (the views partition the span); every position after the span is set to ``mask_id`` in
    both views (input only); positions before the span are clean. Rows without a response stay clean.

    ``reference=True`` reproduces the official ``forward_process_semi_ar`` bit for bit: the Bernoulli
    draws are ``torch.rand((B, span))`` per row and row ``i``'s span columns are written into **every**
    row (spans of different rows overlap and accumulate, prompts of other rows can be masked); the views
    are rebuilt from the accumulated masks after each row, so only the **last** row (with a response)
    keeps its future masking. ``view_mask_id`` is the id written at the span masks (the reference writes a
    literal, LLaDA-8B's mask id, whatever ``mask_id`` is; default ``mask_id``); ``mask_id`` is written at
    the future positions.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    b, length = input_ids.shape
    prompt_lengths = [int(p) for p in (prompt_lengths.tolist() if torch.is_tensor(prompt_lengths) else prompt_lengths)]
    if len(prompt_lengths) != b:
        raise ValueError(f"{len(prompt_lengths)} prompt lengths for a batch of {b}")
    view_id = mask_id if view_mask_id is None else view_mask_id
    threshold = bernoulli_threshold(mask_ratio, eps).to(input_ids.device)
    if reference:
        return _reference_masks(input_ids, prompt_lengths, mask_id, view_id, rng, generator, block_size, threshold)
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask_rev = torch.zeros_like(input_ids, dtype=torch.bool)
    future = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, p in enumerate(prompt_lengths):
        span = active_span(p, length, block_size, rng)
        if span is None:
            continue
        a, e = span
        s = torch.rand(e - a, generator=generator, device=input_ids.device) < threshold
        mask[i, a:e] = s
        mask_rev[i, a:e] = ~s
        future[i, e:] = True
    noisy = torch.where(mask, view_id, input_ids).masked_fill(future, mask_id)
    noisy_rev = torch.where(mask_rev, view_id, input_ids).masked_fill(future, mask_id)
    return ComplementaryMasks(noisy, noisy_rev, mask, mask_rev)


def _reference_masks(
    input_ids: torch.Tensor,
    prompt_lengths: list[int],
    mask_id: int,
    view_id: int,
    rng: random.Random,
    generator: torch.Generator | None,
    block_size: int | None,
    threshold: torch.Tensor,
) -> ComplementaryMasks:
    """The official batch loop, quirks included (see :func:`complementary_masks`)."""
    b, length = input_ids.shape
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask_rev = torch.zeros_like(input_ids, dtype=torch.bool)
    noisy, noisy_rev = input_ids.clone(), input_ids.clone()
    for i, p in enumerate(prompt_lengths):
        span = active_span(p, length, block_size, rng)
        if span is None:
            continue
        a, e = span
        s = torch.rand((b, e - a), generator=generator, device=input_ids.device) < threshold
        mask[:, a:e] = s  # every row gets row i's span
        mask_rev[:, a:e] = ~s
        noisy = torch.where(mask, view_id, input_ids)  # rebuilt: earlier rows lose their future masking
        noisy[i, e:] = mask_id
        noisy_rev = torch.where(mask_rev, view_id, input_ids)
        noisy_rev[i, e:] = mask_id
    return ComplementaryMasks(noisy, noisy_rev, mask, mask_rev)


# -- losses: pure functions of logits, labels and masks -------------------------------------------------


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the masked positions (``1/|A|``, no ELBO weight); a zero with a graph if
    nothing is masked. Computed in float32 on the selected rows."""
    if not bool(mask.any()):
        return 0.0 * logits.sum()
    return F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum") / mask.sum()


def correct_positions(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked positions whose untempered argmax equals the label (a non-differentiable selection)."""
    return (logits.argmax(dim=-1) == labels) & mask


def entropy(logits: torch.Tensor, temperature: float = 0.5, eps: float = 1e-12) -> torch.Tensor:
    """``-Σ p log(p + eps)`` of ``p = softmax(logits / temperature)`` over the last dim, in float32."""
    p = F.softmax(logits.float() / temperature, dim=-1)
    return -(p * torch.log(p + eps)).sum(dim=-1)


def certainty_forcing_entropy(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, temperature: float = 0.5, eps: float = 1e-12
) -> tuple[torch.Tensor, int]:
    """Mean tempered entropy over the correctly predicted masked positions, and their count.

    Gradients flow through the entropy only; a zero with a graph when no masked position is correct.
    """
    correct = correct_positions(logits, labels, mask)
    n = int(correct.sum())
    if n == 0:
        return 0.0 * logits.sum(), 0
    return entropy(logits[correct], temperature, eps).sum() / n, n


@dataclass
class CertaintyForcingLoss:
    """The total and its components (tensors with graphs; counts as ints)."""

    total: torch.Tensor
    ce: torch.Tensor
    ce_rev: torch.Tensor
    entropy: torch.Tensor
    entropy_rev: torch.Tensor
    num_correct: int
    num_correct_rev: int

    def log_dict(self) -> dict[str, float]:
        """Floats for the trainer's log."""
        return {
            "loss": float(self.total.detach()),
            "ce": float(self.ce.detach()),
            "ce_rev": float(self.ce_rev.detach()),
            "entropy": float(self.entropy.detach()),
            "entropy_rev": float(self.entropy_rev.detach()),
            "num_correct": float(self.num_correct),
            "num_correct_rev": float(self.num_correct_rev),
        }


def certainty_forcing_loss(
    logits: torch.Tensor,
    logits_rev: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    mask_rev: torch.Tensor,
    *,
    temperature: float = 0.5,
    entropy_weight: float = 2.0,
    eps: float = 1e-12,
) -> CertaintyForcingLoss:
    """``CE_1 + CE_2 + w·(H_1 + H_2)`` from the aligned logits of both views (row i predicts token i:
    :func:`fewstep.train.objective.align_logits`), the clean labels and the masks.

    Each view is normalised by its own counts.
    """
    ce, ce_rev = masked_cross_entropy(logits, labels, mask), masked_cross_entropy(logits_rev, labels, mask_rev)
    ent, n = certainty_forcing_entropy(logits, labels, mask, temperature, eps)
    ent_rev, n_rev = certainty_forcing_entropy(logits_rev, labels, mask_rev, temperature, eps)
    total = ce + ce_rev + entropy_weight * (ent + ent_rev)
    return CertaintyForcingLoss(total, ce, ce_rev, ent, ent_rev, n, n_rev)


# -- the objective ---------------------------------------------------------------------------------------


def pad_fixed(ids: list[int], length: int, pad_id: int) -> list[int]:
    """Right-pad with ``pad_id`` to exactly ``length`` tokens, or truncate."""
    return (list(ids) + [pad_id] * max(length - len(ids), 0))[:length]


class DParallelObjective(Objective):
    """dParallel certainty forcing for the trainer: collate masks both views, loss runs two forwards.

    ``collate``: ``prompt + response + [EOS]``, right-padded with EOS to exactly ``max_length`` (or
    truncated), as the reference does (the EOS padding is part of the response and is trained on);
    then both views are masked with the trainer's generator. ``block_size=None`` is Dream's whole-
    response masking (``DREAM_DEFAULTS``). ``reference_masking`` switches to the official batch loop
    (``view_mask_id`` as in :func:`complementary_masks`). ``per_sequence``: normalise each sequence by
    its own counts and average over sequences (the reference's loss at its batch size of 1 per device,
    and independent of how a batch is split over processes / micro-batches); False computes each view's
    means over all masked positions of the micro-batch.
    """

    name = "dparallel"
    needs_teacher = False

    def __init__(
        self,
        ids: SpecialIds,
        max_length: int = 384,
        *,
        block_size: int | None = 32,
        temperature: float = 0.5,
        entropy_weight: float = 2.0,
        mask_ratio: float = 0.5,
        eps: float = 1e-3,
        reference_masking: bool = False,
        view_mask_id: int | None = None,
        per_sequence: bool = False,
    ):
        super().__init__(ids, max_length)
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be a positive integer or None, got {block_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.block_size = block_size
        self.temperature = temperature
        self.entropy_weight = entropy_weight
        self.mask_ratio = mask_ratio
        self.eps = eps
        self.reference_masking = reference_masking
        self.view_mask_id = view_mask_id
        self.per_sequence = per_sequence

    def collate(self, examples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Fixed-length EOS-padded clean ids, prompt lengths and both masked views."""
        eos = self.ids.eos
        rows = [pad_fixed([*ex["prompt_ids"], *ex["response_ids"], eos], self.max_length, eos) for ex in examples]
        input_ids = torch.tensor(rows, dtype=torch.long)
        prompt_lengths = torch.tensor([len(ex["prompt_ids"]) for ex in examples], dtype=torch.long)
        views = complementary_masks(
            input_ids,
            prompt_lengths,
            mask_id=self.ids.mask,
            rng=python_rng(generator),
            generator=generator,
            block_size=self.block_size,
            mask_ratio=self.mask_ratio,
            eps=self.eps,
            reference=self.reference_masking,
            view_mask_id=self.view_mask_id,
        )
        return {
            "input_ids": input_ids,
            "prompt_lengths": prompt_lengths,
            "noisy": views.noisy,
            "noisy_rev": views.noisy_rev,
            "mask": views.mask,
            "mask_rev": views.mask_rev,
        }

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        *,
        step: int = 0,
        max_steps: int = 1,
        teacher: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Two forwards (one per view) and :func:`certainty_forcing_loss`."""
        logits = self.logits(model, batch["noisy"])
        logits_rev = self.logits(model, batch["noisy_rev"])
        kw = {"temperature": self.temperature, "entropy_weight": self.entropy_weight}
        ids, mask, mask_rev = batch["input_ids"], batch["mask"], batch["mask_rev"]
        if not self.per_sequence:
            out = certainty_forcing_loss(logits, logits_rev, ids, mask, mask_rev, **kw)
            return out.total, out.log_dict()

        def row(i: int) -> tuple[torch.Tensor, dict[str, float]]:
            r = slice(i, i + 1)
            out = certainty_forcing_loss(logits[r], logits_rev[r], ids[r], mask[r], mask_rev[r], **kw)
            return out.total, out.log_dict()

        return mean_over_rows(ids.shape[0], row)


# -- block-diffusion models (LLaDA2-MoE, SDAR): dFactory's LLaDA2 dParallel trainer ----------------------
#
# dFactory (``train_llada2_bd_with_dparallel.py``) trains a block-diffusion model on one noised view:
# ``process_mdm_tokenized_example`` masks response positions with a per-example noise level, the model
# sees the ``[noisy | clean]`` concatenation under the block-diffusion training mask (positions
# ``cat(arange(n), arange(n))``), and the loss on the noisy half's logits is the masked CE ("consistency")
# plus ``confidence_beta`` times the mean *untempered* entropy over the correctly predicted labels.


def mdm_noise(
    input_ids: torch.Tensor,
    prompt_lengths: list[int] | torch.Tensor,
    mask_id: int,
    generator: torch.Generator,
    noise_range: tuple[float, float] = (0.3, 0.8),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noisy_input_ids, labels)`` as ``process_mdm_tokenized_example`` draws them, row by row.

    Per row: ``t = U·(hi − lo) + lo`` from one ``torch.rand(1)``, then ``torch.rand(L) < t`` masks the
    positions ``≥ prompt_length``; labels are the clean ids at masked positions and -100 elsewhere.
    """
    lo, hi = noise_range
    noisy, labels = input_ids.clone(), torch.full_like(input_ids, -100)
    for i in range(input_ids.shape[0]):
        t = torch.rand(1, generator=generator) * (hi - lo) + lo
        draw = torch.rand(input_ids.shape[1], generator=generator) < t
        draw[: int(prompt_lengths[i])] = False
        noisy[i, draw] = mask_id
        labels[i, draw] = input_ids[i, draw]
    return noisy, labels


def block_diffusion_mask(length: int, block_size: int, device: torch.device | None = None) -> torch.Tensor:
    """The ``[2n, 2n]`` boolean training mask over ``[noisy | clean]`` (True = attend), dFactory's layout.

    Noisy block b sees its own noisy block and the clean blocks before b; clean block b sees the clean
    blocks up to b (block-causal); clean never sees noisy.
    """
    blk = torch.arange(length, device=device) // block_size
    same = blk[:, None] == blk[None, :]
    earlier = blk[None, :] < blk[:, None]
    causal = blk[None, :] <= blk[:, None]
    top = torch.cat((same, earlier), dim=1)
    bottom = torch.cat((torch.zeros_like(same), causal), dim=1)
    return torch.cat((top, bottom), dim=0)


def block_size_of(model: nn.Module, block_size: int | None = None) -> int:
    """``block_size``, else the block length of the block-diffusion ``model`` (through peft/DDP wrappers);
    ValueError for a model without block-causal attention (LLaDA, Dream)."""
    inner = unwrap(model)
    if not getattr(inner, "block_diffusion", False):
        name = getattr(inner, "architecture", type(inner).__name__)
        raise ValueError(f"the block-diffusion objectives need a block-causal model (llada2, sdar), not {name}")
    return int(block_size or inner.block_length)


def block_diffusion_logits(
    model: nn.Module,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    block_size: int,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The noisy half's logits of one ``[noisy | clean]`` forward under :func:`block_diffusion_mask`.

    Both halves take positions ``0..n-1``, so noisy block b is computed exactly as when block b is decoded
    against the exact cache of the clean blocks before it. ``key_valid`` ``[B, n]`` (True = a real token)
    also hides the right padding of each row, in both halves, as keys.
    """
    b, n = noisy.shape
    mask = block_diffusion_mask(n, block_size, noisy.device)[None, None].expand(b, 1, 2 * n, 2 * n)
    if key_valid is not None:
        mask = mask & torch.cat((key_valid, key_valid), dim=1).bool()[:, None, None, :]
    pos = torch.arange(n, device=noisy.device).repeat(2)[None].expand(b, -1)
    out = model(input_ids=torch.cat((noisy, clean), dim=1), attention_mask=mask, position_ids=pos)
    return out.logits[:, :n]


def block_certainty_forcing_loss(
    logits: torch.Tensor, labels: torch.Tensor, confidence_beta: float = 0.0, same_token: bool = True
) -> dict[str, torch.Tensor]:
    """``consistency`` (masked CE, same position or shifted), ``confidence`` and their ``total``."""
    if not same_token:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    safe = labels.clamp_min(0)
    ce = masked_cross_entropy(logits, safe, mask)
    conf, n = certainty_forcing_entropy(logits, safe, mask, temperature=1.0)
    return {"consistency": ce, "confidence": conf, "total": ce + confidence_beta * conf, "num_correct": n}


class BlockDiffusionDParallelObjective(Objective):
    """dFactory's dParallel certainty forcing for block-diffusion models (LLaDA2-MoE, SDAR).

    ``collate``: ``prompt + response + [EOS]`` right-padded with EOS to ``max_length`` (as
    :class:`DParallelObjective`), then :func:`mdm_noise` with the trainer's generator: one noised view
    ``x_t`` per sequence. ``loss``: one ``[x_t | x_0]`` forward under :func:`block_diffusion_mask` (noisy
    block b sees itself and the clean blocks before it: the state of block b when it is decoded) and
    :func:`block_certainty_forcing_loss` on the noisy half (dFactory's defaults: same-token labels,
    ``confidence_beta`` 0 = CE only; dParallel's certainty forcing is ``confidence_beta > 0``).
    ``block_size`` None takes the model's block length. ``per_sequence``: each sequence normalised by its
    own counts, mean over sequences (dFactory's loss at its micro-batch of 1); False: means over the
    micro-batch (what the parity oracles record for their batch of 2).
    """

    name = "dparallel"
    needs_teacher = False

    def __init__(
        self,
        ids: SpecialIds,
        max_length: int = 384,
        *,
        block_size: int | None = None,
        confidence_beta: float = 1.0,
        noise_range: tuple[float, float] = (0.3, 0.8),
        same_token_labels: bool = True,
        per_sequence: bool = False,
    ):
        super().__init__(ids, max_length)
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be a positive integer or None, got {block_size}")
        lo, hi = noise_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"noise_range must satisfy 0 <= low <= high <= 1, got {noise_range}")
        self.block_size, self.confidence_beta = block_size, confidence_beta
        self.noise_range, self.same_token_labels = (lo, hi), same_token_labels
        self.per_sequence = per_sequence

    def collate(self, examples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Fixed-length EOS-padded clean ids, the noised ids and the labels (-100 off the masked positions)."""
        eos = self.ids.eos
        rows = [pad_fixed([*ex["prompt_ids"], *ex["response_ids"], eos], self.max_length, eos) for ex in examples]
        input_ids = torch.tensor(rows, dtype=torch.long)
        prompts = [len(ex["prompt_ids"]) for ex in examples]
        noisy, labels = mdm_noise(input_ids, prompts, self.ids.mask, generator, self.noise_range)
        return {"input_ids": input_ids, "noisy_input_ids": noisy, "labels": labels}

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        *,
        step: int = 0,
        max_steps: int = 1,
        teacher: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One block-diffusion forward and the consistency + ``confidence_beta`` x confidence loss."""
        block = block_size_of(model, self.block_size)
        logits = block_diffusion_logits(model, batch["noisy_input_ids"], batch["input_ids"], block)
        labels = batch["labels"]

        def of(lg: torch.Tensor, lb: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            out = block_certainty_forcing_loss(lg, lb, self.confidence_beta, self.same_token_labels)
            logs = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}
            logs["loss"] = logs.pop("total")
            return out["total"], logs

        if not self.per_sequence:
            return of(logits, labels)
        return mean_over_rows(labels.shape[0], lambda i: of(logits[i : i + 1], labels[i : i + 1]))
