"""LLaDA's Monte Carlo estimate of ``log p(answer | prompt)`` for a masked diffusion LM.

A masked diffusion LM has no left-to-right factorisation, so the log-likelihood of an answer is not a
sum of next-token log-probabilities. LLaDA (Nie et al., arXiv 2502.09992, eq. 6; reference
``ML-GSAI/LLaDA`` ``get_log_likelihood``) scores it with the masked-diffusion ELBO, a lower bound::

    log p(a | p) >= E_{n ~ U{1..A}} E_{S ⊂ answer, |S| = n} [ (A / n) · Σ_{i ∈ S} log p_θ(a_i | p, a with S masked) ]

and estimates the expectation by Monte Carlo: ``mc_num`` samples in rounds of ``batch_size`` rows.
In each round one ``k ~ U{1..A}`` is drawn and row ``r`` masks ``n_r = ((k - 1 + round(r·A/b)) mod A) + 1``
answer positions chosen by a random permutation (stratified counts: the rows of a round cover the range
of mask ratios evenly, which lowers the variance; every row's count is still uniform on ``1..A``, so
the estimate is unbiased). The prompt is never masked. A row's loss is its masked cross-entropy sum
divided by the mask ratio ``n_r / A``; the estimate is minus the mean row loss.

Two deliberate differences from the reference, neither of which changes the expectation: the offsets
``round(r·A/b)`` are computed in exact integer arithmetic (the reference rounds ``linspace`` in
floating point with round-half-to-even, which can map two values of ``k`` to the same count), and the
cross-entropy is taken in float32 whatever the model's dtype.

:func:`exact_elbo` computes the same bound exactly by enumerating every mask subset (tiny answers only);
the tests check that the Monte Carlo mean converges to it. The estimate is what LLaDA reports for
likelihood benchmarks; it is a bound, noisy at small ``mc_num``, and not comparable with an
autoregressive model's exact log-likelihood.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from itertools import combinations
from math import comb

import torch
import torch.nn.functional as F


def mask_counts(k: int, answer_length: int, rows: int) -> list[int]:
    """Stratified mask counts of one round: ``((k - 1 + round(r·A/rows)) mod A) + 1`` for each row ``r``.

    ``k`` is the round's draw from ``1..A``; the offsets ``round(r·A/rows)`` (half up, exact integers)
    spread the rows over the whole range of counts.
    """
    A = answer_length
    if not 1 <= k <= A:
        raise ValueError(f"k must be in [1, {A}]; got {k}")
    return [((k - 1 + (2 * r * A + rows) // (2 * rows)) % A) + 1 for r in range(rows)]


def request_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    """A seed that depends only on ``seed`` and the prompt: the estimate of a request does not depend
    on which other requests run, in which order or on which rank; the choices of one multiple-choice
    question share their random draws (common random numbers, a lower-variance comparison)."""
    digest = hashlib.sha256(",".join(map(str, prompt_ids)).encode()).digest()
    return (int(seed) * 1_000_003 + int.from_bytes(digest[:8], "little")) % (2**63 - 1)


def _answer_logits(model, x: torch.Tensor, P: int, A: int, cfg_scale: float, mask_id: int) -> torch.Tensor:
    """Logits ``[R, A, V]`` predicting the answer positions of the canvases ``x`` (alignment from the model)."""
    if cfg_scale > 0:
        un = x.clone()
        un[:, :P] = mask_id
        out = model.denoise(torch.cat([x, un]), None, logits_start=P, logits_end=P + A).logits
        cond, uncond = out.chunk(2)
        return uncond + (cfg_scale + 1) * (cond - uncond)
    return model.denoise(x, None, logits_start=P, logits_end=P + A).logits


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Per-row sum of the cross-entropy at the masked answer positions, ``[R]`` float32."""
    rows, cols = masked.nonzero(as_tuple=True)
    ce = F.cross_entropy(logits[rows, cols].float(), target[cols], reduction="none")
    return torch.zeros(masked.shape[0], dtype=torch.float32, device=logits.device).index_add_(0, rows, ce)


def _check(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], mask_id: int | None) -> int:
    if len(prompt_ids) == 0:
        raise ValueError("the prompt must hold at least one token (LLaDA conditions on it)")
    if len(answer_ids) == 0:
        raise ValueError("the answer must hold at least one token")
    mask_id = int(model.config.mask_token_id if mask_id is None else mask_id)
    if mask_id in answer_ids or mask_id in prompt_ids:
        raise ValueError(f"prompt and answer must not contain the mask token (id {mask_id})")
    return mask_id


@torch.no_grad()
def mc_loss_samples(
    model,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    *,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    mask_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The ``mc_num`` per-row losses ``Σ_{i∈S} CE_i / (n / A)`` of LLaDA's estimator, ``[mc_num]`` float32.

    ``-samples.mean()`` is the log-likelihood estimate (:func:`mc_log_likelihood`); the spread of the
    samples tells how noisy it is. ``generator`` (a CPU ``torch.Generator``) makes the draws reproducible.
    """
    mask_id = _check(model, prompt_ids, answer_ids, mask_id)
    if mc_num < 1 or batch_size < 1:
        raise ValueError(f"mc_num and batch_size must be >= 1; got {mc_num}, {batch_size}")
    batch_size = min(batch_size, mc_num)
    if mc_num % batch_size:
        raise ValueError(f"mc_num ({mc_num}) must be a multiple of the Monte Carlo batch size ({batch_size})")
    device = model.device
    P, A = len(prompt_ids), len(answer_ids)
    seq = torch.tensor([*prompt_ids, *answer_ids], dtype=torch.long, device=device)
    target = seq[P:]
    losses = []
    for _ in range(mc_num // batch_size):
        k = int(torch.randint(1, A + 1, (), generator=generator))
        counts = torch.tensor(mask_counts(k, A, batch_size))
        order = torch.stack([torch.randperm(A, generator=generator) for _ in range(batch_size)])
        masked = (order < counts[:, None]).to(device)  # row r masks the positions ranked below n_r
        x = seq.repeat(batch_size, 1)
        x[:, P:] = torch.where(masked, mask_id, target)
        logits = _answer_logits(model, x, P, A, cfg_scale, mask_id)
        losses.append(_masked_ce(logits, target, masked) / (counts.to(device).float() / A))
    return torch.cat(losses).cpu()


def mc_log_likelihood(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], **kwargs) -> float:
    """LLaDA's Monte Carlo estimate of ``log p(answer | prompt)`` (an ELBO; see the module docstring).

    Keyword arguments are those of :func:`mc_loss_samples` (``mc_num``, ``batch_size``, ``cfg_scale``,
    ``mask_id``, ``generator``).
    """
    return -float(mc_loss_samples(model, prompt_ids, answer_ids, **kwargs).double().mean())


@torch.no_grad()
def exact_elbo(
    model,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    *,
    cfg_scale: float = 0.0,
    mask_id: int | None = None,
    batch_size: int = 64,
    max_answer: int = 12,
) -> float:
    """The expectation that :func:`mc_log_likelihood` estimates, computed exactly over all ``2^A - 1``
    mask subsets: ``-Σ_n (1/n) · mean_{|S|=n} Σ_{i∈S} CE_i(S)``. For tiny answers (``A <= max_answer``)."""
    mask_id = _check(model, prompt_ids, answer_ids, mask_id)
    P, A = len(prompt_ids), len(answer_ids)
    if max_answer < A:
        raise ValueError(f"exact_elbo enumerates 2^A subsets; A = {A} > max_answer = {max_answer}")
    device = model.device
    seq = torch.tensor([*prompt_ids, *answer_ids], dtype=torch.long, device=device)
    target = seq[P:]
    subsets = [s for n in range(1, A + 1) for s in combinations(range(A), n)]
    weights = torch.tensor([1.0 / (len(s) * comb(A, len(s))) for s in subsets], dtype=torch.float64)
    total = 0.0
    for i in range(0, len(subsets), batch_size):
        chunk = subsets[i : i + batch_size]
        masked = torch.zeros(len(chunk), A, dtype=torch.bool)
        for r, s in enumerate(chunk):
            masked[r, list(s)] = True
        masked = masked.to(device)
        x = seq.repeat(len(chunk), 1)
        x[:, P:] = torch.where(masked, mask_id, target)
        ce = _masked_ce(_answer_logits(model, x, P, A, cfg_scale, mask_id), target, masked)
        total += float((ce.double().cpu() * weights[i : i + len(chunk)]).sum())
    return -total


@torch.no_grad()
def greedy_suffix_matches(
    model, prompt_ids: Sequence[int], answer_ids: Sequence[int], *, cfg_scale: float = 0.0, mask_id: int | None = None
) -> bool:
    """LLaDA's ``is_greedy``: decode the answer span from all masks, one token per step, always the
    single most confident position (confidence in float64), and compare with ``answer_ids``."""
    from fewstep.decoding import generate
    from fewstep.decoding.policies import LowConfidencePolicy

    mask_id = _check(model, prompt_ids, answer_ids, mask_id)
    A = len(answer_ids)
    out = generate(
        model,
        [list(prompt_ids)],
        LowConfidencePolicy(steps=A, probs_dtype="float64"),
        gen_length=A,
        block_length=A,
        cfg_scale=cfg_scale,
        mask_id=mask_id,
        eos_ids=(),
    )
    return out.answers[0].tolist() == list(map(int, answer_ids))
