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

Block-diffusion models (LLaDA2-MoE, SDAR; ``RECIPES["llada2"]``) are trained the way dFactory's LLaDA2
dParallel trainer does (:class:`BlockDiffusionDParallelObjective`): one noised view per sequence, fed as
``[noisy | clean]`` under the block-diffusion mask (:mod:`fewstep.distill.blockdiff`, the builder every
paper uses on these models), so that every noisy block sees exactly what it sees when it is decoded:
itself and the clean blocks before it.

The recipes (end of this file) are the one place the hyper-parameters are written; the objectives read
them from ``self.recipe``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.distill.blockdiff import block_diffusion_logits, block_size_of, mdm_noise
from fewstep.train.config import option, require
from fewstep.train.objective import RecipeObjective, loss_logs, python_rng
from fewstep.train.recipe import TrainingRecipe

#: The reference masker's ``eps`` of the Bernoulli threshold ``(1 - eps)·ratio + eps``.
MASK_EPS = 1e-3
#: The references' sequence length (prompt + response + EOS padding).
PAPER_MAX_LENGTH = 384


@dataclass
class ComplementaryMasks:
    """Both views of a batch. ``mask``/``mask_rev`` are the loss positions (bool ``[B, L]``)."""

    noisy: torch.Tensor
    noisy_rev: torch.Tensor
    mask: torch.Tensor
    mask_rev: torch.Tensor


def bernoulli_threshold(mask_ratio: float = 0.5, eps: float = MASK_EPS) -> torch.Tensor:
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
    eps: float = MASK_EPS,
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
        return loss_logs(self)


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
    forced_views: int = 2,
    scale: float = 1.0,
) -> CertaintyForcingLoss:
    """``CE_1 + CE_2 + w·(H_1 + H_2)`` from the aligned logits of both views (row i predicts token i:
    :func:`fewstep.train.objective.align_logits`), the clean labels and the masks.

    Each view is normalised by its own counts. ``forced_views=1`` leaves ``H_2`` out (zero, no gradient:
    d3LLM on LLaDA); ``scale`` multiplies the total (d3LLM: 1/4).
    """
    ce, ce_rev = masked_cross_entropy(logits, labels, mask), masked_cross_entropy(logits_rev, labels, mask_rev)
    ent, n = certainty_forcing_entropy(logits, labels, mask, temperature, eps)
    if forced_views == 2:
        ent_rev, n_rev = certainty_forcing_entropy(logits_rev, labels, mask_rev, temperature, eps)
    else:
        ent_rev, n_rev = 0.0 * ent, 0
    total = ce + ce_rev + entropy_weight * (ent + ent_rev)
    if scale != 1.0:
        total = total * scale
    return CertaintyForcingLoss(total, ce, ce_rev, ent, ent_rev, n, n_rev)


def two_view_loss(
    objective: RecipeObjective, model: nn.Module, labels: torch.Tensor, views: ComplementaryMasks, **loss: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    """One forward per view (``objective.logits``) and :func:`certainty_forcing_loss` with ``loss``'s
    settings, per sequence or over the micro-batch (``objective.reduce``)."""
    logits = objective.logits(model, views.noisy)
    logits_rev = objective.logits(model, views.noisy_rev)

    def of(r: slice) -> tuple[torch.Tensor, dict[str, float]]:
        out = certainty_forcing_loss(logits[r], logits_rev[r], labels[r], views.mask[r], views.mask_rev[r], **loss)
        return out.total, out.log_dict()

    return objective.reduce(labels.shape[0], of)


# -- the objective ---------------------------------------------------------------------------------------


def pad_fixed(ids: list[int], length: int, pad_id: int) -> list[int]:
    """Right-pad with ``pad_id`` to exactly ``length`` tokens, or truncate."""
    return (list(ids) + [pad_id] * max(length - len(ids), 0))[:length]


def eos_padded(examples: list[dict[str, Any]], max_length: int, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompt + response + [EOS]`` of each example right-padded with EOS to exactly ``max_length`` (or
    truncated), as ``[B, max_length]`` ids, and the prompt lengths ``[B]``."""
    rows = [pad_fixed([*ex["prompt_ids"], *ex["response_ids"], eos], max_length, eos) for ex in examples]
    prompts = [len(ex["prompt_ids"]) for ex in examples]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(prompts, dtype=torch.long)


class DParallelObjective(RecipeObjective):
    """dParallel certainty forcing for the trainer: collate masks both views, loss runs two forwards.

    ``collate``: ``prompt + response + [EOS]``, right-padded with EOS to exactly ``max_length`` (or
    truncated), as the reference does (the EOS padding is part of the response and is trained on);
    then both views are masked with the trainer's generator, with the recipe's block (0 or none: the
    whole response, Dream's masking), ratio and masker (``reference_masking``: the official batch loop;
    :attr:`view_mask_id` as in :func:`complementary_masks`). ``per_sequence`` normalises each sequence on its
    own (the reference's loss at its batch size of 1 per device).
    """

    name = "dparallel"
    pads_to_max_length = True
    #: The id written at the span masks (None: the mask id). The official code writes a literal (LLaDA-8B's
    #: mask id) whatever the model's is; set it to that literal to reproduce its raw inputs.
    view_mask_id: int | None = None

    def collate(self, examples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Fixed-length EOS-padded clean ids, prompt lengths and both masked views."""
        input_ids, prompt_lengths = eos_padded(examples, self.max_length, self.ids.eos)
        r = self.recipe
        views = complementary_masks(
            input_ids,
            prompt_lengths,
            mask_id=self.ids.mask,
            rng=python_rng(generator),
            generator=generator,
            block_size=r.block_size or None,
            mask_ratio=r.mask_ratio,
            reference=r.reference_masking,
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
        """Two forwards (one per view) and :func:`certainty_forcing_loss` (:func:`two_view_loss`)."""
        views = ComplementaryMasks(batch["noisy"], batch["noisy_rev"], batch["mask"], batch["mask_rev"])
        r = self.recipe
        return two_view_loss(
            self, model, batch["input_ids"], views, temperature=r.temperature, entropy_weight=r.entropy_weight
        )


# -- block-diffusion models (LLaDA2-MoE, SDAR): dFactory's LLaDA2 dParallel trainer ----------------------
#
# dFactory (``train_llada2_bd_with_dparallel.py``) trains a block-diffusion model on one noised view:
# ``process_mdm_tokenized_example`` masks response positions with a per-example noise level, the model
# sees the ``[noisy | clean]`` concatenation under the block-diffusion training mask (positions
# ``cat(arange(n), arange(n))``), and the loss on the noisy half's logits is the masked CE ("consistency")
# plus ``confidence_beta`` times the mean *untempered* entropy over the correctly predicted labels.


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


class BlockDiffusionDParallelObjective(RecipeObjective):
    """dFactory's dParallel certainty forcing for block-diffusion models (LLaDA2-MoE, SDAR).

    ``collate``: ``prompt + response + [EOS]`` right-padded with EOS to ``max_length`` (as
    :class:`DParallelObjective`), then :func:`~fewstep.distill.blockdiff.mdm_noise` with the trainer's
    generator over the recipe's noise range: one noised view ``x_t`` per sequence. ``loss``: one
    ``[x_t | x_0]`` forward under the block-diffusion mask (noisy block b sees itself and the clean blocks
    before it: the state of block b when it is decoded) and :func:`block_certainty_forcing_loss` on the
    noisy half (same-token labels unless ``shifted_labels``; ``confidence_beta`` 0 = CE only, dParallel's
    certainty forcing is ``confidence_beta > 0``). Block 0 or none: the model's block length.
    ``per_sequence``: dFactory's loss at its micro-batch of 1; False: means over the micro-batch (what the
    parity oracles record for their batch of 2).
    """

    name = "dparallel"
    pads_to_max_length = True

    def collate(self, examples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Fixed-length EOS-padded clean ids, the noised ids and the labels (-100 off the masked positions)."""
        input_ids, prompt_lengths = eos_padded(examples, self.max_length, self.ids.eos)
        noisy, labels = mdm_noise(input_ids, prompt_lengths, self.ids.mask, generator, self.recipe.noise_range)
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
        r = self.recipe
        block = block_size_of(model, r.block_size)
        logits = block_diffusion_logits(model, batch["noisy_input_ids"], batch["input_ids"], block)
        labels = batch["labels"]

        def of(rows: slice) -> tuple[torch.Tensor, dict[str, float]]:
            out = block_certainty_forcing_loss(logits[rows], labels[rows], r.confidence_beta, not r.shifted_labels)
            return out["total"], loss_logs(out)

        return self.reduce(labels.shape[0], of)


# -- the recipes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DParallelRecipe(TrainingRecipe):
    """dParallel's recipe for one model family (``config_lora_{llada,dream}.yaml`` and ``DLMTrainer``).

    The references train on 8 GPUs with an effective batch of 64 sequences, in bfloat16, with AdamW
    (weight decay 0.01, clip 1) and LoRA r = alpha = 128 on LLaDA (whose config lists seven targets, but
    LLaDA names its attention output / MLP gate / MLP down ``attn_out`` / ``ff_proj`` / ``ff_out``, so only
    q, k, v, up are adapted: ``--lora-targets dparallel``) and r = alpha = 32 on all seven projections of
    Dream; sequences are padded to 384 tokens (:data:`PAPER_MAX_LENGTH`).
    """

    objective_class: ClassVar[type] = DParallelObjective

    block_size: int | None = option(32, "dparallel: masking block, 0 = the whole response (Dream's)")
    temperature: float = option(0.5, "dparallel: entropy temperature")
    entropy_weight: float = option(2.0, "dparallel: entropy weight w")
    mask_ratio: float = option(0.5, "dparallel: Bernoulli ratio inside the block")
    reference_masking: bool = option(False, "dparallel: the official masker bit for bit (batch quirks)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "block_size", self.block_size is None or self.block_size >= 0, "be >= 0")
        require(self, "temperature", self.temperature > 0, "be > 0")
        require(self, "entropy_weight", self.entropy_weight >= 0, "be >= 0")
        require(self, "mask_ratio", 0 <= self.mask_ratio <= 1, "lie in [0, 1]")


@dataclass(frozen=True)
class BlockDParallelRecipe(TrainingRecipe):
    """dParallel on a block-diffusion model (LLaDA2-MoE, SDAR), as dFactory's LLaDA2 dParallel trainer.

    ``train_llada2_bd_with_dparallel.py`` with ``configs/sft/llada2_mini_bd_sft.yaml``: full fine-tuning
    (FSDP2, bf16), AdamW (0.9, 0.999, weight decay 0.1, clip 1), LR 1e-5, one epoch, cosine after a 3 %
    warm-up, global batch 8, noise range (0.3, 0.8), block 32 (LLaDA2's block length), same-position
    labels. fewstep keeps weight decay 0.01 here, as for the other recipes. ``confidence_beta`` is the
    certainty-forcing weight; the trainer's own default 0 switches the term off and no released config
    sets it, so fewstep uses 1 (the fixtures' oracles hold 0.5 and 1). SDAR has no dParallel recipe of its
    own: it takes this one (``SDARModel.recipes_from``), with its own block length (4).
    """

    objective_class: ClassVar[type] = BlockDiffusionDParallelObjective

    block_size: int | None = option(
        None, "dparallel (block models): block of the [noisy | clean] mask, 0 = the model's"
    )
    confidence_beta: float = option(1.0, "dparallel (block models): weight of the entropy on correct tokens")
    noise_range_low: float = option(0.3, "dparallel (block models): lowest masking ratio of a sequence")
    noise_range_high: float = option(0.8, "dparallel (block models): highest masking ratio of a sequence")
    shifted_labels: bool = option(
        False, "dparallel (block models): next-token labels (dFactory's same_token_labels false)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "block_size", self.block_size is None or self.block_size >= 0, "be >= 0")
        require(self, "confidence_beta", self.confidence_beta >= 0, "be >= 0")
        require(self, "noise_range_low", 0 <= self.noise_range_low <= self.noise_range_high, "lie in [0, high]")
        require(self, "noise_range_high", self.noise_range_high <= 1, "be <= 1")

    @property
    def noise_range(self) -> tuple[float, float]:
        """``(low, high)`` of the per-sequence masking ratio."""
        return self.noise_range_low, self.noise_range_high


#: dParallel per recipe family (a model class's ``recipes_from`` names the rows it takes): the single
#: source of ``fewstep distill --method dparallel``'s defaults, of :func:`fewstep.distill.build_objective`
#: and of the recipe table in docs/distillation.md. The block-diffusion row is dFactory's objective.
RECIPES: dict[str, DParallelRecipe | BlockDParallelRecipe] = {
    "llada": DParallelRecipe(finetune="lora", lr=2e-5, epochs=6.0, schedule="constant", warmup_steps=0),
    "dream": DParallelRecipe(
        finetune="lora",
        lr=2e-5,
        epochs=3.0,
        schedule="cosine",
        warmup_steps=None,
        warmup_ratio=0.05,
        block_size=None,
        entropy_weight=1.0,
    ),
    "llada2": BlockDParallelRecipe(
        finetune="full", lr=1e-5, epochs=1.0, schedule="cosine", warmup_steps=None, warmup_ratio=0.03
    ),
}
