"""DMax: On-Policy Uniform Training (OPUT; Chen et al., "DMax: Aggressive Parallel Decoding for dLLMs",
arXiv 2604.08302; official code ``czg1225/DMax``, dFactory ``tasks/train_llada2_bd_oput.py``).

A masked diffusion model only ever sees masks as noise, so a token it commits wrongly in a parallel step
is noise it was never trained to repair. OPUT trains every example **twice** (:func:`oput_examples`, the
``flag`` of the official data): once as plain masked diffusion (``flag`` False) and once **on-policy**
(``flag`` True), where every mask of the noisy input is replaced by the model's own one-shot prediction
(one no-grad forward in eval mode, argmax, all masks at once: :func:`on_policy_fill`). The loss
(:func:`oput_loss`) is the cross-entropy against the clean answer at **every** answer position, clean
ones included, so the model learns to keep right tokens and to revise its own wrong ones: the noise DMax's
soft parallel decoding revises at decoding time.

Data (:func:`oput_labels`, :func:`sigma_noise`, as dFactory's ``process_mdm_sft_example``): ``prompt +
answer + EOS`` right-padded with EOS to ``max_length``; labels on every answer position, the prompt at
-100 and, in the trailing EOS run, only the first ``eos_labels`` (32) EOS keep a label; every answer
position is masked i.i.d. with probability σ ~ U(noise range) = 0.75 (both ends 0.75 in the official
config), padding EOS included.

Two layouts of the noisy input, one per kind of model:

* **block diffusion** (LLaDA2-MoE, SDAR: the official one, :class:`BlockDiffusionDMaxObjective`): the
  rollout and the loss forward both run ``[x_t ; x_0]`` under the block-diffusion training mask
  (:func:`fewstep.distill.blockdiff.block_diffusion_logits`: noisy block b sees itself and the clean blocks
  before it); σ-masking covers the whole answer (not per block); the loss is on the ``x_t`` half, same
  position labels (``--shifted-labels``: next-token, dFactory's ``same_token_labels: false``).
* **semi-autoregressive** (LLaDA, Dream: an adaptation, not in the official code; :class:`DMaxObjective`,
  :func:`semi_ar_view`): one answer block ``[a, a + b)`` per row is drawn; the prompt and the answer
  before it stay clean, the block is σ-masked, everything after it is masked (the state semi-AR decoding
  is in when it reaches that block; dParallel's view). The on-policy view fills the block's masks by the
  no-grad argmax (the masks after the block stay); the loss covers every labelled position of the block.
  Nothing in OPUT needs block-causal attention; this puts the two views in the state the full-attention
  models are decoded in.

Randomness comes from the trainer's ``torch.Generator`` only: per row, the semi-AR block index
(``torch.randint``), then σ (``torch.rand(1)``), then the move draws (``torch.rand``), the order and the
draws of the official transform for the block layout (:func:`sigma_noise`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.distill.blockdiff import block_diffusion_logits, block_size_of
from fewstep.distill.dparallel import eos_padded
from fewstep.train.config import option, require
from fewstep.train.objective import RecipeObjective
from fewstep.train.recipe import TrainingRecipe

IGNORE = -100
#: which views of an example are trained: both (OPUT), only the on-policy one, only plain masked diffusion
VIEWS = ("both", "on-policy", "mdm")

# -- data: flags, labels, noise --------------------------------------------------------------------------


def oput_examples(examples: Sequence[dict[str, Any]], views: str = "both") -> list[dict[str, Any]]:
    """Each example with its ``flag``: ``both`` writes it twice (True, then False), as the official data
    (``build_dataset_oput.py``: the union of both copies; the trainer shuffles it every epoch);
    ``on-policy`` / ``mdm`` write it once with True / False (the ablations)."""
    if views not in VIEWS:
        raise ValueError(f"views must be one of {', '.join(VIEWS)}, got {views!r}")
    flags = {"both": (True, False), "on-policy": (True,), "mdm": (False,)}[views]
    return [{**ex, "flag": f} for ex in examples for f in flags]


def oput_labels(input_ids: torch.Tensor, prompt_lengths: Sequence[int], eos_id: int, eos_labels: int = 32):
    """Labels ``[B, L]``: the clean ids everywhere after the prompt, except past the first ``eos_labels``
    EOS of the trailing EOS run (``process_mdm_sft_example``: an all-EOS row keeps position 0's run start)."""
    labels = input_ids.clone()
    for i, p in enumerate(prompt_lengths):
        labels[i, :p] = IGNORE
        real = (input_ids[i] != eos_id).nonzero()
        run_start = int(real[-1]) + 1 if len(real) else 0
        labels[i, max(run_start + eos_labels, p) :] = IGNORE
    return labels


def _sigma(generator: torch.Generator | None, noise_range: tuple[float, float]) -> float:
    lo, hi = noise_range
    return float(torch.rand(1, generator=generator) * (hi - lo) + lo)


def sigma_noise(
    input_ids: torch.Tensor,
    prompt_lengths: Sequence[int],
    mask_id: int,
    generator: torch.Generator | None,
    noise_range: tuple[float, float] = (0.75, 0.75),
) -> torch.Tensor:
    """``x_t``: per row σ ~ U(noise range) (``torch.rand(1)``), then every position after the prompt masked
    where ``torch.rand(L) < σ``: the draws of dFactory's ``sft_noise_transition``."""
    noisy = input_ids.clone()
    for i, p in enumerate(prompt_lengths):
        sigma = _sigma(generator, noise_range)
        move = torch.rand(input_ids.shape[1], generator=generator) < sigma
        move[:p] = False
        noisy[i, move.to(noisy.device)] = mask_id
    return noisy


def semi_ar_view(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    prompt_lengths: Sequence[int],
    mask_id: int,
    block_size: int | None,
    generator: torch.Generator | None,
    noise_range: tuple[float, float] = (0.75, 0.75),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The semi-AR view of each row: ``(x_t, block labels, block span)``.

    The block ``[a, e)`` is ``a = P + k·b`` with ``k`` uniform over the blocks holding a label
    (``torch.randint``; ``block_size`` None: the whole answer), ``e = min(a + b, L)``; before it the row is
    clean, inside it σ-masked (:func:`sigma_noise`'s draws over the block), after it all mask. Labels
    outside the block are -100. A row without labels is masked after its prompt and has none.
    """
    noisy, block_labels = input_ids.clone(), torch.full_like(labels, IGNORE)
    span = torch.zeros_like(input_ids, dtype=torch.bool)
    L = input_ids.shape[1]
    for i, p in enumerate(prompt_lengths):
        labelled = (labels[i] != IGNORE).nonzero()
        if not len(labelled):
            noisy[i, p:] = mask_id
            continue
        room = int(labelled[-1]) + 1 - p
        b = block_size or (L - p)
        k = int(torch.randint(-(-room // b), (1,), generator=generator))
        a, e = p + k * b, min(p + (k + 1) * b, L)
        sigma = _sigma(generator, noise_range)
        move = (torch.rand(e - a, generator=generator) < sigma).to(noisy.device)
        noisy[i, a:e] = torch.where(move, mask_id, input_ids[i, a:e])
        noisy[i, e:] = mask_id
        block_labels[i, a:e] = labels[i, a:e]
        span[i, a:e] = True
    return noisy, block_labels, span


# -- the rollout and the loss ------------------------------------------------------------------------


@torch.no_grad()
def on_policy_fill(
    model: nn.Module,
    noisy: torch.Tensor,
    fill: torch.Tensor,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``noisy`` with the positions ``fill`` replaced by the model's one-shot argmax.

    ``logits_of(rows)`` runs the view's forward for those batch rows (only rows with something to fill run)
    and returns aligned logits; it runs in eval mode (dropout off, as the official rollout) without
    gradients, and the model's train/eval state is restored. The argmax is over the whole vocabulary.
    """
    rows = fill.any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return noisy
    was_training = model.training
    model.eval()
    try:
        predicted = logits_of(rows).argmax(dim=-1)
    finally:
        model.train(was_training)
    out = noisy.clone()
    out[rows] = torch.where(fill[rows], predicted, noisy[rows])
    return out


def oput_loss(logits: torch.Tensor, labels: torch.Tensor, same_token: bool = True) -> torch.Tensor:
    """Cross-entropy summed over the labelled positions and divided by their number (float32); a zero
    with a graph when nothing is labelled. ``same_token`` False: the logits at ``i`` predict label ``i + 1``
    (dFactory's ``same_token_labels: false``)."""
    if not same_token:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE
    if not bool(keep.any()):
        return 0.0 * logits.sum()
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum") / keep.sum()


# -- the objectives ----------------------------------------------------------------------------------------


class DMaxObjective(RecipeObjective):
    """OPUT, semi-autoregressive layout (LLaDA, Dream; an adaptation, see the module docstring).

    ``training_examples`` writes every example once per view of the recipe (:func:`oput_examples`);
    ``collate`` pads ``prompt + answer + EOS`` with EOS to ``max_length``, builds the labels and the noisy
    view, and marks ``fill``: the masks the on-policy rollout replaces (none in an MDM row); ``loss`` runs
    the rollout on the on-policy rows, then one forward on every row and :func:`oput_loss`.
    ``per_sequence``: each row's loss over its own labels, mean over rows (the official micro-batch of 1);
    False: one mean over every label of the micro-batch (the official loss at a larger micro-batch).
    """

    name = "dmax"
    needs_teacher = False
    pads_to_max_length = True

    @property
    def same_token_labels(self) -> bool:
        """Labels at their own position (the semi-AR layout always)."""
        return True

    def training_examples(self, examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every example once per trained view, with its ``flag`` (:func:`oput_examples`)."""
        return oput_examples(examples, self.recipe.views)

    def flags(self, examples: Sequence[dict[str, Any]]) -> torch.Tensor:
        """The examples' flags (True = on-policy); unflagged examples take the single view of ``views``."""
        views = self.recipe.views
        if views == "both" and any("flag" not in ex for ex in examples):
            raise ValueError("DMax examples carry a flag: train on objective.training_examples(examples)")
        default = views == "on-policy"
        return torch.tensor([bool(ex.get("flag", default)) for ex in examples])

    def clean_rows(self, examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """``prompt + answer + EOS`` EOS-padded to ``max_length``, the prompt lengths, the labels."""
        input_ids, prompt_lengths = eos_padded(list(examples), self.max_length, self.ids.eos)
        prompts = prompt_lengths.tolist()
        return input_ids, prompts, oput_labels(input_ids, prompts, self.ids.eos, self.recipe.eos_labels)

    def collate(self, examples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Clean ids, the semi-AR noisy view, its block labels, the flags and the positions to fill."""
        flag = self.flags(examples)
        input_ids, prompts, labels = self.clean_rows(examples)
        mask, r = self.ids.mask, self.recipe
        noisy, labels, span = semi_ar_view(
            input_ids, labels, prompts, mask, r.block_size or None, generator, r.noise_range
        )
        fill = (noisy == mask) & span & flag[:, None]
        return {"input_ids": input_ids, "noisy_input_ids": noisy, "labels": labels, "fill": fill, "flag": flag}

    def view_logits(self, model: nn.Module, noisy: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Aligned logits of the noisy rows (semi-AR: one plain forward)."""
        return self.logits(model, noisy)

    def on_policy_input(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``x_t`` after the rollout: the batch's ``fill`` positions replaced by the model's no-grad argmax."""
        noisy = batch["noisy_input_ids"]
        return on_policy_fill(
            model, noisy, batch["fill"], lambda rows: self.view_logits(model, noisy[rows], _rows(batch, rows))
        )

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        *,
        step: int = 0,
        max_steps: int = 1,
        teacher: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The on-policy rollout, one forward of every row and :func:`oput_loss`."""
        fill, clean = batch["fill"], batch["input_ids"]
        x_t = self.on_policy_input(model, batch)
        logits = self.view_logits(model, x_t, batch)
        labels, same = batch["labels"], self.same_token_labels
        filled = int(fill.sum())
        stats = {
            "on_policy_rows": float(batch["flag"].float().mean()),
            "filled_wrong": float(((x_t != clean) & fill).sum()) / filled if filled else 0.0,
        }

        def of(rows: slice) -> tuple[torch.Tensor, dict[str, float]]:
            total = oput_loss(logits[rows], labels[rows], same)
            return total, {"loss": float(total.detach())}

        total, logs = self.reduce(labels.shape[0], of)
        return total, {**logs, **stats}


def _rows(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


class BlockDiffusionDMaxObjective(DMaxObjective):
    """OPUT, block-diffusion layout (LLaDA2-MoE, SDAR): dFactory's ``train_llada2_bd_oput.py``.

    ``collate``: σ-masking over the whole answer (:func:`sigma_noise`), labels on every answer position;
    the on-policy rows fill **every** mask. Rollout and loss forward are ``[x_t ; x_0]`` under the
    block-diffusion mask (:func:`~fewstep.distill.blockdiff.block_diffusion_logits`); the loss is on the
    ``x_t`` half. Block 0 or none: the model's block length; ``shifted_labels``: next-token labels.
    """

    @property
    def same_token_labels(self) -> bool:
        """Same-position labels unless the recipe shifts them (dFactory's ``same_token_labels: false``)."""
        return not self.recipe.shifted_labels

    def collate(self, examples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Clean ids, ``x_t`` (σ-masked answer), labels, flags and the masks to fill (every mask of a flag row)."""
        flag = self.flags(examples)
        input_ids, prompts, labels = self.clean_rows(examples)
        noisy = sigma_noise(input_ids, prompts, self.ids.mask, generator, self.recipe.noise_range)
        fill = (noisy == self.ids.mask) & flag[:, None]
        return {"input_ids": input_ids, "noisy_input_ids": noisy, "labels": labels, "fill": fill, "flag": flag}

    def view_logits(self, model: nn.Module, noisy: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``x_t`` half's logits of one ``[x_t ; x_0]`` block-diffusion forward."""
        block = block_size_of(model, self.recipe.block_size)
        return block_diffusion_logits(model, noisy, batch["input_ids"], block)


# -- the recipes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DMaxRecipe(TrainingRecipe):
    """OPUT on a full-attention model (LLaDA, Dream): the semi-AR adaptation with the official settings
    (full fine-tuning, LR 2e-6 cosine after a 3 % warm-up, 2 epochs, σ 0.75) and the decoding block 32."""

    objective_class: ClassVar[type] = DMaxObjective

    block_size: int | None = option(32, "dmax (LLaDA, Dream): block of the semi-AR view, 0 = the whole answer")
    noise_range_low: float = option(0.75, "dmax: lowest masking ratio sigma of a sequence")
    noise_range_high: float = option(0.75, "dmax: highest masking ratio sigma of a sequence")
    views: str = option(
        "both",
        "dmax: the views each example is trained in: both (OPUT: once masked, once with its masks filled by the "
        "model's own one-shot argmax), on-policy only, or mdm only (plain masked diffusion, the ablation)",
        choices=VIEWS,
    )
    eos_labels: int = option(32, "dmax: EOS of the trailing EOS run that keep a label")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "block_size", self.block_size is None or self.block_size >= 0, "be >= 0")
        require(self, "noise_range_low", 0 <= self.noise_range_low <= self.noise_range_high, "lie in [0, high]")
        require(self, "noise_range_high", self.noise_range_high <= 1, "be <= 1")
        require(self, "eos_labels", self.eos_labels >= 0, "be >= 0")

    @property
    def noise_range(self) -> tuple[float, float]:
        """``(low, high)`` of σ."""
        return self.noise_range_low, self.noise_range_high


@dataclass(frozen=True)
class BlockDMaxRecipe(DMaxRecipe):
    """OPUT on a block-diffusion model (LLaDA2-MoE, SDAR): ``configs/sft/llada2_mini_bd_oput.yaml``: full
    fine-tuning (FSDP2, bf16 mixed precision), AdamW (0.9, 0.999, weight decay 0.01, clip 1), LR 2e-6,
    cosine after a 3 % warm-up, 2 epochs, global batch 8 (micro 1), block 32, σ = 0.75, same-token labels,
    sequences of 2048 tokens. Block 0 or none: the model's block length."""

    objective_class: ClassVar[type] = BlockDiffusionDMaxObjective

    shifted_labels: bool = option(False, "dmax (block models): next-token labels (same_token_labels false)")


_OFFICIAL = dict(finetune="full", lr=2e-6, epochs=2.0, schedule="cosine", warmup_steps=None, warmup_ratio=0.03)
#: DMax per recipe family: LLaDA2 = the official OPUT config (block 32 as in its yaml); SDAR the same with
#: its own block length (none); LLaDA (and Dream, which takes LLaDA's row) the same settings in the semi-AR
#: layout (block 32).
RECIPES: dict[str, DMaxRecipe] = {
    "llada": DMaxRecipe(**_OFFICIAL),
    "llada2": BlockDMaxRecipe(**_OFFICIAL, block_size=32),
    "sdar": BlockDMaxRecipe(**_OFFICIAL, block_size=None),
}
#: The official sequence length (prompt + answer, EOS-padded).
PAPER_MAX_LENGTH = 2048
