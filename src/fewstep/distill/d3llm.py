"""d3LLM: pseudo-trajectory distillation (Hao AI Lab, ``hao-ai-lab/d3LLM``; beyond-seeds.md §1).

d3LLM keeps dParallel's certainty-forcing loss and complementary views and changes what is masked:

* **Stage 1, trajectories** (``fewstep rollout --trajectory``): the teacher decodes one token per
  forward (LLaDA: low-confidence remasking, ``steps = gen_length``; Dream: the lowest-entropy masked
  position), retrying at temperature ``0.1·attempt`` (attempts 0..4) until the verifier accepts. Because
  one position is committed per forward, the whole trajectory is the final answer plus a **rank**
  ``π(j)`` per answer position ``j``: the 0-based forward that committed it (:func:`commit_rank`).
  Snapshot ``s`` of the trajectory masks exactly the positions with ``π(j) > s``.
* **Noisy states** (:func:`select_span`, :func:`trajectory_views`): per row, a block ``[a, e)`` of the
  response (``k ~ U{0..⌊R/b⌋}``, ``a = P + k·b``; the last index runs to the end of the row) and a mask
  ratio ``r`` pick the snapshot ``s = min((a − P) + ⌊(1 − r)(e − a)⌋, S − 1)``; view 1 masks the
  block's positions the teacher had not committed yet at ``s``, view 2 the complement (both restricted to
  the block); the prefix stays clean and everything after the block is masked in both views (input
  only). A row without a trajectory falls back to Bernoulli masks with ``p = (1 − 10⁻³)·r + 10⁻³``.
* **Curricula** (pure functions of the optimiser step, so a resumed run continues them exactly):
  ``r ~ U(ρ(t), r_max)`` with ``ρ`` rising linearly from ``r_min`` to ``r_max`` over the run
  (:func:`mask_ratio_floor`), and the block size interpolated along a list by fractional epoch
  (:func:`block_size_at`).
* **Loss** (:func:`d3llm_loss`): ``(CE + CE' + w·(H + H'))/4``: LLaDA forces the entropy of view 1 only
  (``w = 2``), Dream of both views (``w = 1``, next-token logits through the alignment seam).

What fewstep does differently from the official scripts, on purpose (docs/distillation.md, "d3LLM"):
masks are read at the **response offset** of the training row (the official code reads the snapshot at
the absolute position, which shifts the pattern when the training prompt is longer than the trajectory's;
``reference_offsets=True`` reproduces that); trajectories come with their record (or are joined on the
record ``id``, never on a row index); the mask ratio is drawn per row instead of per micro-batch (the
loss does not depend on how the global batch is split); the window list is spread over the run (its
entries are epochs at the official settings, where ``epochs = len(block_sizes)``); an empty view
contributes zero instead of NaN.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fewstep.distill.dparallel import (
    CertaintyForcingLoss,
    ComplementaryMasks,
    certainty_forcing_loss,
    eos_padded,
    two_view_loss,
)
from fewstep.train.config import option, require
from fewstep.train.objective import RecipeObjective, unwrap
from fewstep.train.recipe import TrainingRecipe

#: Rank of a position that is never masked (prompt; Dream's positions past the teacher canvas).
NEVER = -1
#: Rank of a position that is always masked (LLaDA's positions past the teacher canvas).
ALWAYS = 2**31 - 1
ENTROPY_VIEWS = ("first", "both")
PAST_CANVAS = ("masked", "clean")

# -- curricula: pure functions of the step ---------------------------------------------------------------


def mask_ratio_floor(step: int, max_steps: int, min_ratio: float = 0.0, max_ratio: float = 0.8) -> float:
    """``ρ(t) = r_min + (t/T)·(r_max − r_min)``, the lower end of the mask-ratio draw at step ``t``
    (``get_current_mask_ratio``; ``r_min`` when ``max_steps`` is 0)."""
    if max_steps <= 0:
        return min_ratio
    return min_ratio + (step / max_steps) * (max_ratio - min_ratio)


def draw_mask_ratio(u: float, floor: float, max_ratio: float = 0.8) -> float:
    """``r ~ U(floor, max_ratio)`` from a uniform ``u ∈ [0, 1)``, as ``random.uniform`` computes it."""
    return floor + (max_ratio - floor) * u


def block_size_at(epoch: float | None, sizes: Sequence[int]) -> int:
    """The window size at fractional epoch ``epoch`` (``get_current_block_size``): ``i = min(⌊ε⌋, n−1)``,
    ``B[i]`` at the last index, else ``int(B[i] + (ε − i)·(B[i+1] − B[i]))``; ``B[0]`` when ``epoch`` is None."""
    if not sizes:
        raise ValueError("the window curriculum needs at least one block size")
    if epoch is None:
        return int(sizes[0])
    i = min(math.floor(epoch), len(sizes) - 1)
    if i == len(sizes) - 1:
        return int(sizes[i])
    return int(sizes[i] + (epoch - i) * (sizes[i + 1] - sizes[i]))


def curriculum_epoch(step: int, max_steps: int, n_sizes: int) -> float:
    """The fractional epoch the window curriculum reads at ``step``: the list is spread over the run
    (``step / max_steps · len(sizes)``, the trainer's fractional epoch when ``epochs = len(sizes)``)."""
    return step / max(max_steps, 1) * n_sizes


def parse_block_sizes(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"16,16,24"`` (or a sequence) -> ``(16, 16, 24)``; ValueError unless every size is a positive int."""
    parts = [p for p in str(text).replace(" ", "").split(",") if p] if isinstance(text, str) else list(text)
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"block sizes must be comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"block sizes must be comma-separated positive integers, got {text!r}")
    return sizes


# -- stage 1: teacher trajectories -------------------------------------------------------------------------

#: Attempts per prompt (temperature ``0.1·attempt``, attempt 0 greedy), as ``d3llm_*_generate_partly.py``.
TRAJECTORY_ATTEMPTS = 5
RETRY_TEMPERATURE_STEP = 0.1


def retry_temperature(attempt: int) -> float:
    """Sampling temperature of retry ``attempt`` (0 = greedy)."""
    return RETRY_TEMPERATURE_STEP * attempt


def teacher_policy(architecture: str, gen_length: int) -> str:
    """The one-token-per-forward teacher of a family: LLaDA low-confidence remasking with ``steps =
    gen_length`` (float64 confidence), Dream the lowest-entropy masked position of the block."""
    if architecture == "llada":
        return f"llada:steps={gen_length},probs_dtype=float64"
    if architecture == "dream":
        return "entropy-dream:threshold=0"  # H < 0 never holds: only the forced lowest-entropy commit
    raise ValueError(
        f"d3LLM trajectories are defined for the full-attention families (llada, dream), not {architecture!r}"
    )


def commit_rank(decode_step: Sequence[int]) -> list[int]:
    """``π`` from the engine's per-position ``decode_step`` (1-based NFE of the commit): ``π = step − 1``.

    ValueError if a position was never committed by a forward (early stop, or a policy that stopped)
    or if a forward committed several positions (the trajectory would not be one token per forward).
    """
    steps = [int(s) for s in decode_step]
    if any(s < 1 for s in steps):
        raise ValueError("a trajectory needs every answer position committed by a forward (run without early stop)")
    if len(set(steps)) != len(steps):
        raise ValueError("a trajectory needs exactly one commit per forward (use a one-token-per-forward policy)")
    return [s - 1 for s in steps]


# -- noisy states ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A row's block ``[start, end)`` and the trajectory snapshot it reads (None: Bernoulli fallback)."""

    start: int
    end: int
    snapshot: int | None


def num_block_choices(prompt_len: int, full_len: int, block_size: int) -> int:
    """``K + 1``: the block index is drawn from ``0..K`` with ``K = ⌊R / b⌋``, ``R = full_len − P``."""
    return (full_len - prompt_len) // block_size + 1


def select_span(
    prompt_len: int, full_len: int, length: int, block_size: int, k: int, ratio: float, steps: int | None
) -> Span:
    """Block ``k`` of a row and its snapshot (``select_trajectory_by_ratio``): ``a = P + k·b``,
    ``e = a + b`` unless ``k = K`` (then the row's end ``length``), ``s = min((a − P) + ⌊(1 − r)(e − a)⌋,
    S − 1)`` for a trajectory of ``S = steps`` snapshots (None: no trajectory)."""
    last = (full_len - prompt_len) // block_size
    if not 0 <= k <= last:
        raise ValueError(f"block index {k} outside 0..{last}")
    a = prompt_len + k * block_size
    e = a + block_size if k < last else length
    s = None if not steps else min((a - prompt_len) + int((1 - ratio) * (e - a)), steps - 1)
    return Span(a, e, s)


def rank_table(
    rank: Sequence[int] | None,
    length: int,
    prompt_length: int,
    *,
    trajectory_prompt_length: int | None = None,
    past_canvas: str = "masked",
    reference_offsets: bool = False,
) -> torch.Tensor | None:
    """``[length]`` ranks of a training row: :data:`NEVER` over the prompt, ``π(j)`` at response offset
    ``j``, and past the teacher canvas :data:`ALWAYS` (``past_canvas="masked"``, LLaDA pads its snapshots
    with the mask) or :data:`NEVER` (``"clean"``, Dream pads with EOS). None for a row without trajectory.

    ``reference_offsets``: the official indexing, where the snapshot (laid out with the *trajectory's*
    prompt length) is read at the training row's absolute positions; a snapshot longer than the row makes
    the official code fall back to Bernoulli masks (None here too).
    """
    if rank is None:
        return None
    if past_canvas not in PAST_CANVAS:
        raise ValueError(f"past_canvas must be one of {', '.join(PAST_CANVAS)}, got {past_canvas!r}")
    origin = prompt_length
    if reference_offsets:
        origin = prompt_length if trajectory_prompt_length is None else trajectory_prompt_length
        if origin + len(rank) > length:
            return None
    table = torch.full((length,), ALWAYS if past_canvas == "masked" else NEVER, dtype=torch.long)
    table[: max(origin, 0)] = NEVER
    lo, hi = max(origin, 0), min(origin + len(rank), length)
    if hi > lo:
        table[lo:hi] = torch.tensor(list(rank[lo - origin : hi - origin]), dtype=torch.long)
    return table


def bernoulli_p(ratio: float, eps: float = 1e-3) -> float:
    """The fallback's masking probability ``(1 − eps)·r + eps``."""
    return (1 - eps) * ratio + eps


def trajectory_views(
    input_ids: torch.Tensor,
    spans: Sequence[Span | None],
    ranks: torch.Tensor | Sequence[torch.Tensor | None],
    *,
    mask_id: int,
    ratios: Sequence[float] | None = None,
    fallback_uniforms: torch.Tensor | None = None,
    eps: float = 1e-3,
) -> ComplementaryMasks:
    """Both views of a clean batch ``[B, L]`` from each row's span (None: the row stays clean).

    Inside ``[a, e)`` view 1 masks the positions whose rank exceeds the snapshot (``ranks[i]``, see
    :func:`rank_table`), view 2 the others; a span whose snapshot is None (no trajectory) masks
    ``fallback_uniforms[i, a:e] < (1 − eps)·ratios[i] + eps`` instead. Positions ``≥ e`` are masked in both
    views (input only), earlier positions stay clean. ``mask``/``mask_rev`` are the loss positions.
    """
    b, length = input_ids.shape
    device = input_ids.device
    mask = torch.zeros((b, length), dtype=torch.bool, device=device)
    mask_rev = torch.zeros_like(mask)
    future = torch.zeros_like(mask)
    for i, span in enumerate(spans):
        if span is None:
            continue
        a, e = span.start, span.end
        if span.snapshot is not None:
            seg = ranks[i][a:e].to(device) > span.snapshot
        else:
            if fallback_uniforms is None or ratios is None:
                raise ValueError(f"row {i} has no trajectory: the Bernoulli fallback needs its uniforms and ratio")
            seg = fallback_uniforms[i, a:e].to(device) < bernoulli_p(ratios[i], eps)
        mask[i, a:e] = seg
        mask_rev[i, a:e] = ~seg
        future[i, e:] = True
    noisy = input_ids.masked_fill(mask | future, mask_id)
    noisy_rev = input_ids.masked_fill(mask_rev | future, mask_id)
    return ComplementaryMasks(noisy, noisy_rev, mask, mask_rev)


def reference_noisy_states(
    input_ids: torch.Tensor,
    prompt_lengths: Sequence[int],
    full_lengths: Sequence[int],
    ranks: Sequence[torch.Tensor | None],
    steps: Sequence[int],
    *,
    block_size: int,
    mask_ratio: float,
    mask_id: int,
    rng: random.Random,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
) -> tuple[ComplementaryMasks, list[Span]]:
    """``forward_process_with_trajectory`` with the official draws: ``rng.randint(0, K)`` per row, then
    ``torch.rand(e − a)`` for each row without trajectory (``ranks[i]`` None), in row order; one
    ``mask_ratio`` for the batch. Returns the views and the spans."""
    length = input_ids.shape[1]
    spans = []
    for p, f, table, s in zip(prompt_lengths, full_lengths, ranks, steps):
        k = rng.randint(0, num_block_choices(int(p), int(f), block_size) - 1)
        spans.append(select_span(int(p), int(f), length, block_size, k, mask_ratio, s if table is not None else None))
    uniforms = torch.zeros(input_ids.shape, dtype=torch.float32)
    for i, span in enumerate(spans):
        if span.snapshot is None:
            uniforms[i, span.start : span.end] = torch.rand(span.end - span.start, generator=generator)
    ratios = [mask_ratio] * len(spans)
    views = trajectory_views(
        input_ids, spans, ranks, mask_id=mask_id, ratios=ratios, fallback_uniforms=uniforms, eps=eps
    )
    return views, spans


# -- loss ----------------------------------------------------------------------------------------------------


def d3llm_loss(
    logits: torch.Tensor,
    logits_rev: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    mask_rev: torch.Tensor,
    *,
    temperature: float = 0.5,
    entropy_weight: float = 2.0,
    entropy_views: str = "first",
    eps: float = 1e-12,
) -> CertaintyForcingLoss:
    """``(CE + CE' + w·(H + H'))/4`` from the aligned logits of both views (``DLMTrainer.compute_loss``).

    CE: mean cross-entropy over each view's masked positions; H: mean entropy of ``softmax(z / T)`` over
    the masked positions whose untempered argmax is the label. ``entropy_views="first"`` (LLaDA) leaves
    ``H'`` out; ``"both"`` (Dream) includes it. An empty view contributes 0.
    """
    if entropy_views not in ENTROPY_VIEWS:
        raise ValueError(f"entropy_views must be one of {', '.join(ENTROPY_VIEWS)}, got {entropy_views!r}")
    return certainty_forcing_loss(
        logits,
        logits_rev,
        labels,
        mask,
        mask_rev,
        **_loss_settings(temperature, entropy_weight, entropy_views),
        eps=eps,
    )


def _loss_settings(temperature: float, entropy_weight: float, entropy_views: str) -> dict[str, Any]:
    """:func:`~fewstep.distill.dparallel.certainty_forcing_loss`'s settings for d3LLM's loss."""
    forced = 2 if entropy_views == "both" else 1
    return {"temperature": temperature, "entropy_weight": entropy_weight, "forced_views": forced, "scale": 0.25}


# -- trajectories joined to the training examples --------------------------------------------------------


def _trajectory_of(record: dict[str, Any]) -> tuple[list[int], int | None] | None:
    rank = record.get("commit_rank")
    if rank is None:
        return None
    if not isinstance(rank, list) or not all(isinstance(r, int) for r in rank):
        raise ValueError(f"record {record.get('id')!r}: commit_rank must be a list of ints")
    prompt = record.get("prompt_tokens")
    return rank, None if prompt is None else int(prompt)


def attach_trajectories(
    examples: list[dict[str, Any]],
    records: Sequence[dict[str, Any]],
    trajectories: Sequence[dict[str, Any]] | None = None,
) -> dict[str, int]:
    """Give each tokenized example the teacher's commit ranks (``rank``, ``rank_prompt_length``).

    Without ``trajectories`` the ranks come with each record (a ``fewstep rollout --trajectory`` folder);
    its ``response_ids`` (the teacher's exact answer tokens) replace the re-tokenized response when the
    two differ, so that ranks and tokens stay aligned. With ``trajectories`` (another rollout) they are
    joined on the record ``id``. Examples without a trajectory keep none (Bernoulli fallback). Returns
    counts: ``with_trajectory``, ``fallback``, ``retokenized``.
    """
    if len(examples) != len(records):
        raise ValueError(f"{len(examples)} examples for {len(records)} records")
    index: dict[str, dict[str, Any]] | None = None
    if trajectories is not None:
        index = {}
        for t in trajectories:
            if "id" not in t:
                raise ValueError("trajectory records need an 'id' to be joined with the training records")
            key = str(t["id"])
            if key in index:
                raise ValueError(f"trajectory id {key!r} appears twice")
            index[key] = t
    counts = {"with_trajectory": 0, "fallback": 0, "retokenized": 0}
    for ex, rec in zip(examples, records):
        if index is not None:
            if "id" not in rec:
                raise ValueError("training records need an 'id' to be joined with the trajectories")
            source = index.get(str(rec["id"]))
        else:
            source = rec
        found = None if source is None else _trajectory_of(source)
        if found is None:
            counts["fallback"] += 1
            continue
        rank = found[0]
        ex["rank"] = array("h" if max(rank, default=0) < 2**15 else "i", rank)  # int16: 2 bytes per token
        ex["rank_prompt_length"] = found[1]
        counts["with_trajectory"] += 1
        exact = rec.get("response_ids") if index is None else None
        if exact is not None and list(exact) != list(ex["response_ids"]):
            ex["response_ids"] = array("i", exact)
            counts["retokenized"] += 1
    return counts


# -- the objective -------------------------------------------------------------------------------------------


class D3LLMObjective(RecipeObjective):
    """d3LLM's trajectory-masked certainty forcing for the trainer (LLaDA and Dream).

    :meth:`prepare` joins each example with the teacher's commit ranks (:func:`attach_trajectories`).
    ``collate``: ``prompt + response + [EOS]`` right-padded with EOS to ``max_length`` (as dParallel),
    each row's rank table (:func:`rank_table`) and its random draws (mask ratio, block index, fallback
    uniforms) from the trainer's generator. ``loss``: the curricula at ``step`` of ``max_steps`` give the
    window size and the ratio floor; the spans and views are cut (:func:`trajectory_views`), two forwards
    and :func:`d3llm_loss`, with the recipe's settings. ``per_sequence`` as
    :class:`~fewstep.distill.dparallel.DParallelObjective`.
    """

    name = "d3llm"
    needs_teacher = False
    pads_to_max_length = True
    reads_trajectories = True
    #: ``eps`` of the Bernoulli fallback masks ``(1 − eps)·r + eps`` (the official masker's).
    eps = 1e-3

    @classmethod
    def prepare(
        cls,
        examples: list[dict[str, Any]],
        records: Sequence[dict[str, Any]],
        trajectories: Sequence[dict[str, Any]] | None = None,
    ) -> list[str]:
        """Attach the teacher's commit ranks (the records' own, or ``trajectories`` joined on the id);
        ValueError when no example has one; a note for the examples that fall back to Bernoulli masks."""
        counts = attach_trajectories(examples, records, trajectories)
        if not counts["with_trajectory"]:
            raise ValueError(
                "no training record has a teacher trajectory (commit_rank): make the data with fewstep rollout "
                "--trajectory, or pass --trajectories"
            )
        if counts["fallback"]:
            return [f"{counts['fallback']:,} of {len(examples):,} records have no trajectory and get Bernoulli masks"]
        return []

    def curricula(self, step: int, max_steps: int) -> tuple[int, float]:
        """``(block size, mask-ratio floor)`` at optimiser step ``step`` of ``max_steps``."""
        r = self.recipe
        epoch = curriculum_epoch(step, max_steps, len(r.block_sizes))
        floor = mask_ratio_floor(step, max_steps, r.min_mask_ratio, r.max_mask_ratio)
        return block_size_at(epoch, r.block_sizes), floor

    def collate(self, examples: list[dict[str, Any]], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Clean ids, lengths, rank tables and the per-row draws (the masks are cut in :meth:`loss`)."""
        length = self.max_length
        input_ids, prompt_lengths = eos_padded(examples, length, self.ids.eos)
        prompts = prompt_lengths.tolist()
        tables, steps = [], []
        for ex, p in zip(examples, prompts):
            table = rank_table(
                ex.get("rank"),
                length,
                p,
                trajectory_prompt_length=ex.get("rank_prompt_length"),
                past_canvas=self.recipe.past_canvas,
                reference_offsets=self.recipe.reference_offsets,
            )
            tables.append(table if table is not None else torch.full((length,), NEVER, dtype=torch.long))
            steps.append(len(ex["rank"]) if table is not None else 0)
        n = len(examples)
        return {
            "input_ids": input_ids,
            "prompt_lengths": prompt_lengths,
            "full_lengths": torch.tensor(
                [min(p + len(ex["response_ids"]) + 1, length) for ex, p in zip(examples, prompts)], dtype=torch.long
            ),
            "ranks": torch.stack(tables) if tables else torch.empty((0, length), dtype=torch.long),
            "steps": torch.tensor(steps, dtype=torch.long),
            "u_ratio": torch.rand(n, dtype=torch.float64, generator=generator),
            "u_block": torch.rand(n, dtype=torch.float64, generator=generator),
            "u_fallback": torch.rand((n, length), generator=generator),
        }

    def cut_views(self, batch: dict[str, torch.Tensor], step: int, max_steps: int) -> tuple[ComplementaryMasks, dict]:
        """The two views of ``batch`` at ``step`` and what was drawn (block size, mean ratio)."""
        block, floor = self.curricula(step, max_steps)
        ratios = [draw_mask_ratio(float(u), floor, self.recipe.max_mask_ratio) for u in batch["u_ratio"].tolist()]
        spans: list[Span | None] = []
        length = batch["input_ids"].shape[1]
        rows = zip(batch["prompt_lengths"].tolist(), batch["full_lengths"].tolist(), batch["steps"].tolist())
        for (p, f, s), u, r in zip(rows, batch["u_block"].tolist(), ratios):
            if f <= p:
                spans.append(None)
                continue
            choices = num_block_choices(p, f, block)
            k = min(int(u * choices), choices - 1)
            spans.append(select_span(p, f, length, block, k, r, s or None))
        views = trajectory_views(
            batch["input_ids"],
            spans,
            batch["ranks"],
            mask_id=self.ids.mask,
            ratios=ratios,
            fallback_uniforms=batch["u_fallback"],
            eps=self.eps,
        )
        drawn = {"block_size": float(block), "mask_ratio": sum(ratios) / max(len(ratios), 1)}
        return views, drawn

    def loss(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        *,
        step: int = 0,
        max_steps: int = 1,
        teacher: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Cut the views at ``step``, two forwards and :func:`d3llm_loss`."""
        views, drawn = self.cut_views(batch, step, max_steps)
        total, logs = self.views_loss(model, batch["input_ids"], views)
        return total, {**logs, **drawn}

    def views_loss(
        self, model: nn.Module, input_ids: torch.Tensor, views: ComplementaryMasks
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Two forwards (one per view) and :func:`d3llm_loss`, per sequence or over the batch."""
        if getattr(unwrap(model), "block_diffusion", False):
            raise ValueError("d3LLM trains full-attention models (llada, dream); use dparallel or cd4lm on llada2/sdar")
        r = self.recipe
        return two_view_loss(
            self, model, input_ids, views, **_loss_settings(r.temperature, r.entropy_weight, r.entropy_views)
        )


# -- recipes -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class D3LLMRecipe(TrainingRecipe):
    """d3LLM's recipe for one model family (``d3llm_train.yaml`` of the LLaDA and Dream trainers).

    Both official runs use LoRA r = alpha = 256 on q/k/v/o/gate/up/down (dropout 0), AdamW (weight decay
    0.01, clip 1), bf16, a global batch of 64 (4 per device x accumulation 4 x 4 GPUs), DeepSpeed ZeRO-2;
    sequences of 384 tokens (LLaDA) or 512 (Dream): :data:`PAPER_MAX_LENGTH`, :data:`PAPER_LORA_RANK`.
    ``block_sizes`` takes ``"16,24,32"`` or a sequence of ints.
    """

    objective_class: ClassVar[type] = D3LLMObjective

    temperature: float = option(0.5, "d3llm: entropy temperature")
    entropy_weight: float = option(2.0, "d3llm: entropy weight w")
    entropy_views: str = option(
        "first", "d3llm: views whose entropy is forced (first: LLaDA's, both: Dream's)", choices=ENTROPY_VIEWS
    )
    min_mask_ratio: float = option(0.0, "d3llm: start of the mask-ratio floor (noise curriculum)")
    max_mask_ratio: float = option(0.8, "d3llm: highest mask ratio r (r ~ U(floor, max))")
    block_sizes: tuple[int, ...] = option(
        (16, 16, 24, 24, 32, 32),
        "d3llm: window curriculum, comma-separated block sizes spread over the run (one per epoch)",
        type=parse_block_sizes,
    )
    past_canvas: str = option(
        "masked",
        "d3llm: positions past the teacher canvas in a trajectory (masked: LLaDA's padding, clean: Dream's)",
        choices=PAST_CANVAS,
    )
    reference_offsets: bool = option(
        False, "d3llm: read the trajectory at absolute positions, as the official code does (prompt-offset quirk)"
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_sizes", parse_block_sizes(self.block_sizes))
        super().__post_init__()
        require(self, "temperature", self.temperature > 0, "be > 0")
        require(self, "entropy_weight", self.entropy_weight >= 0, "be >= 0")
        require(self, "min_mask_ratio", 0 <= self.min_mask_ratio <= self.max_mask_ratio, "lie in [0, max]")
        require(self, "max_mask_ratio", self.max_mask_ratio <= 1, "be <= 1")


#: d3LLM per recipe family (full-attention only: the window curriculum changes the block size, which a
#: block-diffusion model fixes in its attention).
RECIPES: dict[str, D3LLMRecipe] = {
    "llada": D3LLMRecipe(finetune="lora", lr=2e-5, epochs=6.0, schedule="constant", warmup_steps=0),
    "dream": D3LLMRecipe(
        finetune="lora",
        lr=2e-5,
        epochs=3.0,
        schedule="cosine",
        warmup_steps=None,
        warmup_ratio=0.05,
        entropy_weight=1.0,
        entropy_views="both",
        block_sizes=(16, 24, 32),
        past_canvas="clean",
    ),
}
#: The official sequence lengths (prompt + response + EOS padding) and LoRA rank (= alpha).
PAPER_MAX_LENGTH = {"llada": 384, "dream": 512}
PAPER_LORA_RANK = 256
