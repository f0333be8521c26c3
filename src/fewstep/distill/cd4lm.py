"""CD4LM: Discrete-Space Consistency Distillation (DSCD, arXiv 2601.02236).

A student learns to be trajectory-invariant: from a heavily masked state ``x_S`` it should predict the
distribution a **frozen teacher** predicts from a less masked state ``x_T`` of the same sequence (the
teacher's masks are a random subset of the student's), plus a reconstruction cross-entropy on the
true tokens:

    L = λ·clamp(T²·KL(softmax(z_T/T) ‖ softmax(z_S/T)), 0, 5) + (1 − λ)·clamp(CE(z_S, x0), 0, 5)

over the student-masked answer positions, with λ following a cosine schedule with warm-up (0.9 → 0.5).
The recipes (end of this file) are the one place its hyper-parameters are written; the objectives read
them from ``self.recipe``.

Pieces, each usable alone: :func:`mask_ratios` and :func:`nested_mask_counts` / :func:`nested_masks`
(the masker), :func:`collate_nested` (the reference collator on token ids), :func:`consistency_kl`,
:func:`reconstruction_ce`, :func:`consistency_loss` (clamps and NaN guards) and
:func:`lambda_cosine_schedule`. :class:`CD4LMObjective` wires them for the trainer.

Quirks kept from the reference collator (``ConsistencyDistillationCollator``), documented in
``docs/distillation.md``: labels are -100 on **every token equal to the pad id** (with LLaDA that is
EOS, so an EOS inside an answer is never a loss position; ``train_on_pad_id=True`` keeps real tokens
and drops only the padding), and the student attention mask is ``x_S != pad``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.distill.blockdiff import block_diffusion_logits, block_size_of
from fewstep.train.config import option, require
from fewstep.train.objective import RecipeObjective, loss_logs, python_rng
from fewstep.train.recipe import TrainingRecipe

IGNORE = -100

# -- masker ----------------------------------------------------------------------------------------------


def mask_ratios(rng: random.Random) -> tuple[float, float]:
    """Student ratio ``r_S ~ U(0.40, 0.90)``, teacher ratio ``clip(r_S·U(0.30, 0.70), 0.10, 0.60)``."""
    r_s = rng.uniform(0.40, 0.90)
    u = rng.uniform(0.30, 0.70)
    return r_s, max(0.10, min(0.60, r_s * u))


def nested_mask_counts(answer_len: int, r_s: float, r_t: float) -> tuple[int, int]:
    """How many answer tokens the student and the teacher mask (``n_T <= n_S <= L``).

    Answers shorter than 20 tokens cap ``r_S`` at 0.5 (``r_T`` is not recomputed); answers of at most 10
    tokens get exactly 2 student masks and 1 teacher mask; otherwise ``n_S = max(⌊L·r_S⌋, 2, ⌈0.1·L⌉)``
    and ``n_T = min(⌊L·r_T⌋, n_S)``. Both are finally capped by ``L``.
    """
    if answer_len <= 0:
        return 0, 0
    if answer_len < 20:
        r_s = min(r_s, 0.50)
    if answer_len <= 10:
        n_s, n_t = 2, 1
    else:
        r_s, r_t = max(0.0, min(1.0, r_s)), max(0.0, min(1.0, r_t))
        n_s = max(int(answer_len * r_s), max(2, math.ceil(0.10 * answer_len)))
        n_t = min(int(answer_len * r_t), n_s)
    n_s = min(n_s, answer_len)
    return n_s, min(n_t, n_s)


def nested_masks(
    length: int, cond_len: int, r_s: float, r_t: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean student and teacher masks ``[length]`` over the answer ``[cond_len, length)``.

    One ``torch.randperm`` of the answer positions (none if nothing is masked): the student masks its
    first ``n_S`` entries, the teacher the first ``n_T`` of those, so teacher ⊆ student.
    """
    student = torch.zeros(length, dtype=torch.bool)
    teacher = torch.zeros(length, dtype=torch.bool)
    answer_len = length - cond_len
    n_s, n_t = nested_mask_counts(answer_len, r_s, r_t)
    if n_s == 0:
        return student, teacher
    picked = cond_len + torch.randperm(answer_len, generator=generator)[:n_s]
    student[picked] = True
    teacher[picked[:n_t]] = True
    return student, teacher


def collate_nested(
    sequences: Sequence[Sequence[int]],
    cond_lens: Sequence[int],
    *,
    mask_id: int,
    pad_id: int,
    rng: random.Random,
    generator: torch.Generator | None = None,
    train_on_pad_id: bool = False,
) -> dict[str, torch.Tensor]:
    """The nested-masking batch of the reference collator, from token ids.

    ``sequences`` are the clean ``x0`` (question then answer, no padding), ``cond_lens`` the answer
    starts. Per example, in order: two ``rng.uniform`` draws (:func:`mask_ratios`), then one
    ``torch.randperm`` when something is masked. Right-padded with ``pad_id`` to the longest sequence.

    Returns ``input_ids`` (``x_S``), ``attention_mask`` (``x_S != pad``, as the reference),
    ``teacher_consistency_input_ids`` (``x_T``), ``labels`` (``x0`` on the student masks, -100
    elsewhere, on the question and on pad-id tokens; with ``train_on_pad_id`` only the padding beyond
    each sequence is dropped), ``answer_start_indices``, ``lengths`` (the unpadded lengths) and
    ``clean_input_ids`` (``x0``, padded: the clean half of the block-diffusion views).
    """
    b = len(sequences)
    width = max((len(s) for s in sequences), default=0)
    x0 = torch.full((b, width), pad_id, dtype=torch.long)
    student = torch.zeros((b, width), dtype=torch.bool)
    teacher = torch.zeros((b, width), dtype=torch.bool)
    real = torch.zeros((b, width), dtype=torch.bool)
    for i, (seq, cond) in enumerate(zip(sequences, cond_lens)):
        n = len(seq)
        x0[i, :n] = torch.tensor(list(seq), dtype=torch.long)
        real[i, :n] = True
        r_s, r_t = mask_ratios(rng)
        if n > cond:
            student[i, :n], teacher[i, :n] = nested_masks(n, cond, r_s, r_t, generator)
    x_s = x0.masked_fill(student, mask_id)
    x_t = x0.masked_fill(teacher, mask_id)
    labels = x0.clone()
    for i, cond in enumerate(cond_lens):
        labels[i, :cond] = IGNORE
    labels[~real] = IGNORE
    if not train_on_pad_id:
        labels[x0 == pad_id] = IGNORE
    labels[~student] = IGNORE
    return {
        "input_ids": x_s,
        "attention_mask": (x_s != pad_id).long(),
        "teacher_consistency_input_ids": x_t,
        "labels": labels,
        "answer_start_indices": torch.tensor(list(cond_lens), dtype=torch.long),
        "lengths": real.sum(dim=1),
        "clean_input_ids": x0,
    }


# -- losses: pure functions of logits and labels ---------------------------------------------------------


def reconstruction_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over ``labels != -100`` (NaN when there is none, as ``CrossEntropyLoss``).

    Logits are aligned (row i predicts token i: :func:`fewstep.train.objective.align_logits`), as in
    every loss of this module."""
    lg, lb = student_logits, labels
    active = lb != IGNORE
    if not bool(active.any()):
        return lg.sum() * float("nan")
    return F.cross_entropy(lg[active].float(), lb[active])


def consistency_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
) -> torch.Tensor:
    """``T² · (1/N) Σ KL(softmax(z_T/T) ‖ softmax(z_S/T))`` over the ``N`` positions with a label
    (``batchmean`` over the active rows); 0 when ``N = 0``. The teacher logits carry no gradient."""
    lg, lb, tg = student_logits, labels, teacher_logits
    active = lb != IGNORE
    if not bool(active.any()):
        return torch.zeros((), device=lg.device, dtype=torch.float32)
    log_q = F.log_softmax(lg[active].float() / temperature, dim=-1)
    p = F.softmax(tg[active].detach().float() / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature**2


@dataclass
class ConsistencyLoss:
    """The total and its clamped and unclamped components; ``skipped`` when a NaN guard fired."""

    total: torch.Tensor
    consistency: torch.Tensor
    reconstruction: torch.Tensor
    consistency_unclamped: torch.Tensor
    reconstruction_unclamped: torch.Tensor
    lam: float
    skipped: bool = False

    def log_dict(self) -> dict[str, float]:
        """Floats for the trainer's log (``lambda``, ``skipped_nan``)."""
        return loss_logs(self, lam="lambda", skipped="skipped_nan")


def _zero_like_graph(logits: torch.Tensor) -> torch.Tensor:
    """A zero loss with a (zero) gradient path to the logits, even if they hold NaN/inf."""
    return (torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0) * 0.0).sum()


def consistency_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    lam: float,
    temperature: float = 2.0,
    clamp_max: float | None = 5.0,
) -> ConsistencyLoss:
    """``λ·clamp(L_cons) + (1 − λ)·clamp(L_rec)`` with the reference's clamps and NaN guards.

    A clamped term has zero gradient while it is above ``clamp_max`` (``None`` disables the clamps).
    Guard 1: non-finite student logits give a zero loss (zero gradient). Guard 2: a non-finite total
    (for example no label at all, where the CE is NaN) gives a zero loss and zero components.
    """
    nan = torch.tensor(float("nan"))
    if not bool(torch.isfinite(student_logits).all()):
        zero = _zero_like_graph(student_logits)
        return ConsistencyLoss(zero, zero.detach(), zero.detach(), nan, nan, lam, skipped=True)
    cons = consistency_kl(student_logits, teacher_logits, labels, temperature)
    rec = reconstruction_ce(student_logits, labels)
    cons_c, rec_c = cons, rec
    if clamp_max is not None:
        cons_c, rec_c = cons.clamp(0.0, clamp_max), rec.clamp(0.0, clamp_max)
    total = lam * cons_c + (1 - lam) * rec_c
    if not bool(torch.isfinite(total)):
        zero = _zero_like_graph(student_logits)
        return ConsistencyLoss(zero, zero.detach(), zero.detach(), cons.detach(), rec.detach(), lam, skipped=True)
    return ConsistencyLoss(total, cons_c, rec_c, cons.detach(), rec.detach(), lam)


def lambda_cosine_schedule(
    step: int, max_steps: int, warmup_ratio: float = 0.1, initial: float = 0.9, final: float = 0.5
) -> float:
    """λ at optimizer step ``step``: ``initial`` during the first ``warmup_ratio`` of training, then a
    half-cosine from ``initial`` to ``final`` at ``max_steps`` (ascending or descending)."""
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    progress = step / max_steps
    if progress < warmup_ratio:
        return initial
    s = (progress - warmup_ratio) / (1 - warmup_ratio)
    return initial + (final - initial) * (1 - 0.5 * (1 + math.cos(math.pi * s)))


# -- the objective ---------------------------------------------------------------------------------------


def visible_token_targets(
    teacher_logits: torch.Tensor, teacher_input_ids: torch.Tensor, labels: torch.Tensor, mask_id: int
) -> torch.Tensor:
    """Teacher logits with every labelled position the teacher *sees* replaced by a one-hot on its token.

    On ``M_S \\ M_T`` the teacher is shown the answer token itself; the reference distils the teacher's
    raw output there, an input position the masked-diffusion objective never trains. A masked-diffusion
    denoiser's estimate of a visible token is that token, so this is the consistency target the idea
    asks for (``--teacher-visible token``). The teacher logits are aligned (row i predicts token i).
    """
    visible = (teacher_input_ids != mask_id) & (labels != IGNORE)
    targets = labels.clamp_min(0)
    onehot = F.one_hot(targets, teacher_logits.shape[-1]).to(teacher_logits.dtype) * 1e4
    return torch.where(visible[..., None], onehot, teacher_logits)


class CD4LMObjective(RecipeObjective):
    """DSCD for the trainer: nested-mask collate, student and frozen-teacher forwards, clamped loss.

    ``collate``: ``x0 = prompt + response`` (as given, no EOS appended: the reference trains on raw
    ``"{question} {answer}"`` text), truncated to ``max_length``, answer start = ``len(prompt)``, padded
    to the longest row. The recipe's ``eos_pad`` instead appends EOS until the answer is ``gen_length``
    tokens long (:attr:`eos_pad_to`), the canvas LLaDA's SFT (and dParallel) trains on and decoding uses: a
    model that has only seen EOS-padded answers reads a short raw canvas badly (fewstep's tiny teacher:
    cross-entropy 11.4 on the raw canvas against 0.09 on the padded one), so distil such a model with it.
    ``teacher_visible="token"``: on the student-only masks the teacher sees the answer token, and the
    target there becomes that token (:func:`visible_token_targets`) instead of the teacher's raw output
    at a visible position (the reference, ``"logits"``). ``lam`` fixes λ; otherwise
    :func:`lambda_cosine_schedule` runs over the trainer's optimizer steps. ``mask_padding=False`` runs
    both models on the padded canvas without an attention mask, which is what the reference computes (its
    LLaDA ignores the mask); ``True`` masks the padding beyond each row for both student and teacher.
    ``per_sequence``: clamp and normalise each sequence on its own and average over sequences; False
    computes the means over all labelled positions of the micro-batch, as the reference does.
    """

    name = "cd4lm"
    needs_teacher = True

    @property
    def eos_pad_to(self) -> int | None:
        """The answer length EOS pads to (``eos_pad``), else None (the raw text)."""
        return self.gen_length if self.recipe.eos_pad else None

    def current_lambda(self, step: int, max_steps: int) -> float:
        """The fixed λ, or the cosine schedule's value at ``step``."""
        r = self.recipe
        if r.lam is not None:
            return r.lam
        return lambda_cosine_schedule(step, max(max_steps, 1), r.lambda_warmup_ratio, r.initial_lambda, r.final_lambda)

    def collate(self, examples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Nested student/teacher masks with the trainer's generator (see :func:`collate_nested`)."""
        pad_to = self.eos_pad_to or 0
        seqs = [
            [*ex["prompt_ids"], *ex["response_ids"], *[self.ids.eos] * (pad_to - len(ex["response_ids"]))][
                : self.max_length
            ]
            for ex in examples
        ]
        conds = [min(len(ex["prompt_ids"]), self.max_length) for ex in examples]
        return collate_nested(
            seqs,
            conds,
            mask_id=self.ids.mask,
            pad_id=self.ids.pad,
            rng=python_rng(generator),
            generator=generator,
            # the EOS tail is answer (LLaDA SFT trains on it), also where the pad id is the EOS id
            train_on_pad_id=self.recipe.train_on_pad_id or self.recipe.eos_pad,
        )

    def padding_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``[B, L]`` 1 on each row's real tokens with ``mask_padding``, else None (the reference's unmasked canvas)."""
        if not self.recipe.mask_padding:
            return None
        width = batch["input_ids"].shape[1]
        lengths = batch["lengths"].to(batch["input_ids"].device)
        return (torch.arange(width, device=lengths.device)[None] < lengths[:, None]).long()

    def view_logits(
        self, model: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned student logits on ``x_S`` and teacher logits on ``x_T`` (under ``no_grad``)."""
        attn = self.padding_mask(batch)
        student_logits = self.logits(model, batch["input_ids"], attn)
        with torch.no_grad():
            teacher_logits = self.logits(teacher, batch["teacher_consistency_input_ids"], attn, shift_of=model)
        return student_logits, teacher_logits

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        *,
        step: int = 0,
        max_steps: int = 1,
        teacher: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Student forward on ``x_S``, teacher forward on ``x_T`` under ``no_grad`` (:meth:`view_logits`),
        :func:`consistency_loss`."""
        if teacher is None:
            raise ValueError("CD4LM needs a frozen teacher model")
        student_logits, teacher_logits = self.view_logits(model, teacher, batch)
        r, labels = self.recipe, batch["labels"]
        if r.teacher_visible == "token":
            teacher_logits = visible_token_targets(
                teacher_logits, batch["teacher_consistency_input_ids"], labels, self.ids.mask
            )
        lam = self.current_lambda(step, max_steps)

        def of(rows: slice) -> tuple[torch.Tensor, dict[str, float]]:
            out = consistency_loss(
                student_logits[rows],
                teacher_logits[rows],
                labels[rows],
                lam=lam,
                temperature=r.temperature,
                clamp_max=r.clamp_max or None,
            )
            return out.total, out.log_dict()

        return self.reduce(labels.shape[0], of)


class BlockDiffusionCD4LMObjective(CD4LMObjective):
    """CD4LM on a block-diffusion model (LLaDA2-MoE, SDAR): both views inside the block-causal structure.

    The masks are CD4LM's own (:func:`collate_nested`, teacher ⊆ student over the answer), and each view
    is the noisy half of a ``[noisy | x0]`` forward under dFactory's block-diffusion mask
    (:func:`fewstep.distill.blockdiff.block_diffusion_logits`): the student runs ``[x_S | x0]``, the frozen
    teacher ``[x_T | x0]``. Noisy block b sees its own masked block and the *clean* blocks before it, the
    state in which block b is decoded (committed blocks in the exact cache), so the student learns, per
    block, to predict from its heavier masking what the teacher predicts from the lighter one, with the
    same clean context. Same loss, λ schedule, clamps and options as :class:`CD4LMObjective`;
    ``mask_padding`` hides each row's right padding as keys. Block 0 or none: the model's block length.
    """

    def view_logits(
        self, model: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Student ``[x_S | x0]`` and teacher ``[x_T | x0]`` block-diffusion logits (the noisy halves)."""
        block = block_size_of(model, self.recipe.block_size)
        clean, valid = batch["clean_input_ids"], self.padding_mask(batch)
        student = block_diffusion_logits(model, batch["input_ids"], clean, block, valid)
        with torch.no_grad():
            teacher_logits = block_diffusion_logits(
                teacher, batch["teacher_consistency_input_ids"], clean, block, valid
            )
        return student, teacher_logits


# -- the recipes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CD4LMRecipe(TrainingRecipe):
    """CD4LM's recipe (``run_training.sh``, ``configs/``): full fine-tuning of LLaDA-8B-Instruct with a
    frozen copy as teacher, DeepSpeed ZeRO-2 on 8 GPUs (effective batch 64 = 8 x 2 x grad-acc 4), AdamW
    (0.9, 0.999, weight decay 0.01, clip 1), LR warmed up over 200 steps then constant, sequences of 512
    tokens (:data:`PAPER_MAX_LENGTH`), bfloat16. Not reproduced: early stopping on the eval loss (every 50
    steps, patience 15). The README says T = 2.0 (the script's argparse default is 3.0).
    """

    objective_class: ClassVar[type] = CD4LMObjective

    temperature: float = option(2.0, "cd4lm: KL temperature T")
    lam: float | None = option(None, "cd4lm: fixed lambda (none: the cosine schedule)", flag="--lambda", type=float)
    initial_lambda: float = option(0.9, "cd4lm: lambda at the start")
    final_lambda: float = option(0.5, "cd4lm: lambda at the end")
    lambda_warmup_ratio: float = option(0.1, "cd4lm: flat share of the run before the cosine")
    clamp_max: float = option(5.0, "cd4lm: clamp of each loss term (0 disables)")
    mask_padding: bool = option(False, "cd4lm: attention mask over the padding")
    eos_pad: bool = option(
        False,
        "cd4lm: pad each answer with EOS to --gen-length (LLaDA's SFT canvas; the reference trains on the raw "
        "text). Use it for models trained on EOS-padded answers, like fewstep's tiny teacher",
    )
    teacher_visible: str = option(
        "logits",
        "cd4lm: consistency target where only the student is masked: the teacher's output at that visible "
        "position (reference) or the token the teacher sees there",
        choices=("logits", "token"),
    )
    train_on_pad_id: bool = option(False, "cd4lm: keep in-answer tokens equal to the pad id")

    def check_run(self, gen_length: int | None) -> None:
        """``eos_pad`` needs the run's answer length."""
        if self.eos_pad and (gen_length is None or gen_length < 1):
            raise ValueError(f"--eos-pad needs the answer length (--gen-length >= 1); got {gen_length}")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "temperature", self.temperature > 0, "be > 0")
        require(self, "lam", self.lam is None or 0 <= self.lam <= 1, "lie in [0, 1]")
        require(self, "initial_lambda", 0 <= self.initial_lambda <= 1, "lie in [0, 1]")
        require(self, "final_lambda", 0 <= self.final_lambda <= 1, "lie in [0, 1]")
        require(self, "lambda_warmup_ratio", 0 <= self.lambda_warmup_ratio < 1, "lie in [0, 1)")
        require(self, "clamp_max", self.clamp_max >= 0, "be >= 0")


@dataclass(frozen=True)
class BlockCD4LMRecipe(CD4LMRecipe):
    """CD4LM on a block-diffusion model (:class:`BlockDiffusionCD4LMObjective`): the paper's settings, plus
    the block of the ``[noisy | clean]`` mask (0 or none = the model's block length)."""

    objective_class: ClassVar[type] = BlockDiffusionCD4LMObjective

    block_size: int | None = option(None, "cd4lm (block models): block of the [noisy | clean] mask, 0 = the model's")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "block_size", self.block_size is None or self.block_size >= 0, "be >= 0")


_PAPER = {"finetune": "full", "lr": 5e-6, "epochs": 10.0, "schedule": "constant", "warmup_steps": 200}
#: CD4LM per recipe family (the paper trains LLaDA; the families without a row of their own take the one
#: their model class's ``recipes_from`` names; the block-diffusion row trains its views inside the
#: block-causal structure).
RECIPES: dict[str, CD4LMRecipe] = {"llada": CD4LMRecipe(**_PAPER), "llada2": BlockCD4LMRecipe(**_PAPER)}
#: The reference's sequence length.
PAPER_MAX_LENGTH = 512
