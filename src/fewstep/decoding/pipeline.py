"""``fewstep.generate``: a batch of prompts through the step-level engine (:mod:`fewstep.decoding.engine`).

``generate`` checks the shape of its inputs, unpads the prompts, submits one request per row to an
:class:`~fewstep.decoding.engine.Engine` whose running set holds the whole batch (the engine validates
every setting and every row, :mod:`fewstep.decoding.request`), steps it to the end and assembles a
:class:`GenerateOutput`. The engine is the only generation loop of the package: every
row has its own progress (block, steps, policy memory, random stream, KV cache, NFE), so a row's
trajectory is exactly the one it gets alone, and a row that finishes its block moves on at once.
Cache modes (Fast-dLLM semantics): ``none`` recomputes the whole canvas every step; ``prefix`` runs a
full forward at the start of each block, keeps the keys/values before the block and then runs only
the block and everything after it; ``dual`` also keeps the keys/values after the block and runs only
the block (its own keys/values are recomputed every step).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fewstep.decoding import metrics
from fewstep.decoding.engine import (
    CACHE_MODES,
    END_OF_TURN_TOKENS,
    Engine,
    Quirks,
    Request,
    RequestError,
    resolve_settings,
    stop_ids,
)
from fewstep.decoding.policies import Policy
from fewstep.decoding.request import request_policy

__all__ = ["CACHE_MODES", "END_OF_TURN_TOKENS", "GenerateOutput", "StepEvent", "generate", "stop_ids"]


@dataclass
class StepEvent:
    """What a callback receives after every step (one forward)."""

    block: int
    rows: torch.Tensor  # [R] batch rows in this forward
    positions: list[list[int]]  # per row: answer-relative positions set at this step (commits and revisions)
    tokens: list[list[int]]  # per row: their tokens
    nfe: torch.Tensor  # [B] NFE so far, per row
    canvas: torch.Tensor  # [B, P + G] current canvas (do not modify)
    prompt_length: int
    revised: list[list[int]] | None = None  # per row: the positions among ``positions`` that were revised


@dataclass
class GenerateOutput:
    """Result of :func:`fewstep.generate`.

    * ``sequences`` [B, P + G]: prompt (as given, left-padded) followed by the answer;
    * ``nfe`` [B]: forwards each row took part in (a CFG pair counts once);
    * ``tokens_per_step``: per row, the tokens committed at each of its forwards;
    * ``decode_step`` [B, G]: per answer position, the row's NFE count at the forward that committed
      it (1-based; 0 for positions filled by early stop or never committed);
    * ``trace``: with ``trace=True``, one dict per forward (block, rows, the positions each row's forward set
      and their tokens, and among them the ``revised`` ones: a decoded token replaced by another);
    * ``eos_ids``, ``mask_id``: the end-of-sequence set and mask token the rows were decoded with;
    * ``revisions`` [B]: revision events (a decoded answer token replaced by another; revising policies such
      as ``spd``), ``revised`` [B]: committed answer positions whose final token differs from their first
      committed one (:attr:`revised_fraction` divides it by the committed positions).
    """

    sequences: torch.Tensor
    nfe: torch.Tensor
    tokens_per_step: list[list[int]]
    decode_step: torch.Tensor
    prompt_length: int
    policy: str
    cache: str
    trace: list[dict[str, Any]] | None = None
    finished_early: torch.Tensor | None = None  # [B], with an early stop: rows that stopped at an EOS
    eos_ids: tuple[int, ...] = ()
    mask_id: int | None = None
    revisions: torch.Tensor | None = None
    revised: torch.Tensor | None = None

    @property
    def revised_fraction(self) -> torch.Tensor:
        """Per row: the share of its committed answer tokens (decoded by a forward) that revision changed."""
        committed = (self.decode_step > 0).sum(-1).clamp_min(1)
        return self.revised.double() / committed

    @property
    def answers(self) -> torch.Tensor:
        """The generated part, ``[B, G]``."""
        return self.sequences[:, self.prompt_length :]

    @property
    def positions_per_forward(self) -> torch.Tensor:
        """Committed positions per forward, per row (``gen_length / nfe`` unless stopped early)."""
        nfe = self.nfe.tolist()
        rows = zip(self.tokens_per_step, nfe)
        return torch.tensor([metrics.positions_per_forward(t, n) for t, n in rows], dtype=torch.float64)

    @property
    def tokens_per_forward(self) -> torch.Tensor:
        """Answer tokens before the first EOS per forward, per row (:func:`fewstep.decoding.metrics.tokens_per_forward`)."""
        rows = zip(self.answers.tolist(), self.nfe.tolist())
        eos = set(self.eos_ids)
        tpf = [metrics.tokens_per_forward(a, eos, n, mask_id=self.mask_id) for a, n in rows]
        return torch.tensor(tpf, dtype=torch.float64)


def _prepare_inputs(input_ids, attention_mask, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, P]`` ids and mask from a tensor or a list of token lists (left-padded here)."""
    if not isinstance(input_ids, torch.Tensor):
        rows = [list(map(int, r)) for r in input_ids]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("input_ids must hold at least one non-empty prompt")
        p = max(len(r) for r in rows)
        ids = torch.full((len(rows), p), pad_id, dtype=torch.long)
        am = torch.zeros((len(rows), p), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, p - len(r) :] = torch.tensor(r)
            am[i, p - len(r) :] = 1
        if attention_mask is not None:
            raise ValueError("attention_mask must be None when input_ids is a list of prompts (fewstep pads them)")
        return ids.to(device), (am.to(device) if not bool(am.all()) else None)
    ids = input_ids.to(device).long()
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt_length] with prompt_length >= 1; got {tuple(ids.shape)}")
    if attention_mask is None:
        return ids, None
    am = attention_mask.to(device).long()
    if am.dim() == 1:
        am = am[None]
    if am.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(am.shape)} does not match input_ids {tuple(ids.shape)}")
    if bool((am[:, 1:] < am[:, :-1]).any()) or bool((am[:, -1] == 0).any()):
        raise ValueError("attention_mask must describe left padding (zeros, then ones, last column 1)")
    return ids, (None if bool(am.all()) else am)


def _seeds(seed, batch: int) -> list | None:
    """One seed per row (the engine checks each one's range)."""
    if seed is None:
        return None
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return [int(seed) + i for i in range(batch)]
    try:
        seeds = list(seed)
    except TypeError:
        raise RequestError("{seed} must be an int or one int per row; got {value}", "seed", value=repr(seed)) from None
    if len(seeds) != batch:
        raise ValueError(f"seed must be an int or one int per row ({batch}); got {len(seeds)} seeds")
    return seeds


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    policy: Policy | str = "threshold",
    *,
    gen_length: int = 128,
    block_length: int | None = None,
    cache: str = "none",
    attention_mask: torch.Tensor | None = None,
    cfg_scale: float = 0.0,
    mask_id: int | None = None,
    eos_ids: Sequence[int] | None = None,
    tokenizer=None,
    early_stop: bool = False,
    seed: int | Sequence[int] | None = None,
    callback: Callable[[StepEvent], None] | None = None,
    trace: bool = False,
    quirk_cache_extra_nfe: bool = False,
    quirk_mask_prediction: bool = False,
    max_steps_per_block: int | None = None,
    eos_early_stop: bool = False,
    quirk_early_stop_scans_prompt: bool = False,
    quirk_unstored_blocks: bool = False,
    quirk_prefill_short_prompt: bool = False,
    quirk_early_stop_keeps_block: bool = False,
    eos_fill: bool = False,
    quirk_eos_fill_nfe: bool = False,
    quirk_prefix_own_logit: bool = False,
) -> GenerateOutput:
    """Generate ``gen_length`` tokens after each prompt with a diffusion LM and an unmasking policy.

    A thin call of the step-level engine (:class:`fewstep.decoding.engine.Engine`): one request per
    row, every row decoded with its own progress (a row that finishes its block moves on at once).

    Args:
        model: a fewstep model (:func:`fewstep.load_model`), anything with ``denoise`` and ``config``.
        input_ids: ``[B, P]`` prompts, left-padded when ``attention_mask`` is given, or a list of token
            lists (padded here).
        policy: a :class:`~fewstep.decoding.policies.Policy` or a spec such as ``"threshold:0.9"``,
            ``"llada:steps=64"``, ``"cad:threshold=0.95,max_tokens=32"`` (see ``POLICIES``).
        gen_length: answer length; a multiple of ``block_length``.
        block_length: semi-autoregressive block length (None: 32, or ``gen_length`` if smaller).
        cache: ``"none"``, ``"prefix"`` or ``"dual"`` (Fast-dLLM KV caches).
        attention_mask: ``[B, P]`` padding mask (1 = token) for left-padded prompts.
        cfg_scale: classifier-free guidance: ``z_u + (cfg_scale + 1)(z_c - z_u)``, with the prompt
            masked in the unconditional copy; both copies run in one batched call (one NFE).
        mask_id: the mask token (default ``model.config.mask_token_id``).
        eos_ids: end-of-sequence ids for early stop and for CAD's EOS gating (default: the model's EOS
            plus the end-of-turn tokens of ``tokenizer`` when given).
        early_stop: a row whose decoded blocks contain an EOS id stops after that block (the rest of
            its answer is filled with EOS and it stops counting NFE). Off by default (reference parity).
        seed: int (row ``i`` uses ``seed + i``) or one seed per row: per-row random streams, so sampling
            does not depend on the batch. None uses torch's global RNG.
        callback: called with a :class:`StepEvent` after every forward (one event per block that rows
            of the batch worked on in that round).
        trace: record every step in ``GenerateOutput.trace``.
        quirk_cache_extra_nfe: Fast-dLLM's / dParallel's cached samplers test for block completion only
            after a cached forward, so a block finished by its first (full) forward costs one more,
            useless, forward. Off by default; parity tests turn it on.
        quirk_mask_prediction: the reference samplers let the mask token itself win the argmax;
            committing it changes nothing and the position stays masked (a loop that waits for the
            block to finish can then stall). By default fewstep never predicts the mask token (its
            logit is set to the dtype's minimum, which leaves every other probability unchanged up to
            rounding); parity tests turn the quirk on.
        max_steps_per_block: safety limit on forwards per block (default ``4 * block_length + 64``);
            exceeding it raises ``RuntimeError`` (a policy that never commits would loop forever).
        eos_early_stop: LLaDA2's mid-block stop: after a forward that committed an EOS, a row whose
            answer is decoded up to its first EOS stops at once (the rest is EOS).
        quirk_early_stop_scans_prompt: LLaDA2's ``eos_early_stop`` searches for the EOS from position 0,
            so an EOS inside the prompt ends the generation (answer all EOS). Off: from the answer start.
        quirk_unstored_blocks: block-diffusion models with ``cache="prefix"``: a block left with masks
            (``SDARPolicy(quirk_iteration_cap=True)``) is never stored in the cache, as SDAR's sampler does.
        quirk_prefill_short_prompt: block-diffusion models with a cache: a prompt shorter than one block still
            costs a prefill forward (over the first block, masks included), one NFE, as dInfer counts it.
        quirk_early_stop_keeps_block: ``early_stop`` as dInfer's ``decode_uniform``: an EOS anywhere in the
            finished block (its prompt tail included) stops the row, the block is kept whole (tokens after its
            first EOS stay) and everything after it is EOS.
        eos_fill: d3LLM's end-of-text stop, for any policy: after a forward, once the answer holds an EOS,
            everything after the first one becomes EOS at once (masks and decoded tokens, no forward), and a
            row with no mask left stops. Unlike ``early_stop`` (which waits for the block holding the EOS to
            finish and fills the later blocks) it also drops the masks after the EOS from the current block;
            unlike ``eos_early_stop`` (which stops only once everything before the EOS is decoded, decoding
            the masks after it meanwhile) it never spends a forward on a position after the EOS.
        quirk_eos_fill_nfe: d3LLM counts a forward before its loop-head fill, so a fill that ends the row
            costs one forward that never runs; on for parity only.
        quirk_prefix_own_logit: d3LLM's Dream cached sampler runs a prefix-cached forward from the first
            uncached column and shifts the logits inside the run, so that column is predicted from its own
            output instead of its left neighbour's (multi-block policies with ``cache="prefix"``).

    Block-diffusion models (LLaDA2-MoE, SDAR; ``model.block_diffusion``): ``block_length`` is the block
    size of the model's block-causal attention (default: the model's); blocks are aligned to positions
    from each row's first token and decoding starts at the block holding the prompt tail; ``cache``
    ``"prefix"`` (or ``"dual"``, the same for these models) is the **exact** cache of committed blocks:
    one prefill of the complete prompt blocks, per-block cached forwards and one store forward per
    completed block, each counted as one NFE (SDAR's official count); ``"none"`` re-runs the canvas up to
    the current block every step (LLaDA2's official sampler). See ``docs/models.md``.
    """
    cfg = model.config
    policy = request_policy(policy)
    base = Request(
        prompt=[0],
        policy=policy,
        gen_length=gen_length,
        block_length=block_length,
        cache=cache,
        early_stop=early_stop,
        eos_ids=eos_ids,
        cfg_scale=cfg_scale,
        mask_id=mask_id,
        max_steps_per_block=max_steps_per_block,
        eos_early_stop=eos_early_stop,
        eos_fill=eos_fill,
        quirks=Quirks(
            cache_extra_nfe=quirk_cache_extra_nfe,
            mask_prediction=quirk_mask_prediction,
            early_stop_scans_prompt=quirk_early_stop_scans_prompt,
            unstored_blocks=quirk_unstored_blocks,
            prefill_short_prompt=quirk_prefill_short_prompt,
            early_stop_keeps_block=quirk_early_stop_keeps_block,
            eos_fill_nfe=quirk_eos_fill_nfe,
            prefix_own_logit=quirk_prefix_own_logit,
        ),
    )
    st = resolve_settings(model, base, tokenizer, policy)  # the settings' errors before the prompts'
    pad_id = cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else (st.eos[0] if st.eos else 0)
    ids, am = _prepare_inputs(input_ids, attention_mask, pad_id, model.device)
    B = ids.shape[0]
    seeds = _seeds(seed, B)
    engine = Engine(model, max_batch=B, tokenizer=tokenizer)
    for i in range(B):  # the engine checks every row (its prompt, its seed) before any runs
        row = ids[i] if am is None else ids[i][am[i].bool()]
        engine.submit(replace(base, prompt=row.tolist(), seed=None if seeds is None else seeds[i], id=i))
    return _drive(engine, ids, st, policy.describe(), callback, trace, early=early_stop or eos_early_stop or eos_fill)


def _drive(engine: Engine, ids: torch.Tensor, st, policy: str, callback, trace: bool, early: bool) -> GenerateOutput:
    """Step ``engine`` to the end, turning its updates into StepEvents / trace entries per block."""
    B, P = ids.shape
    G, device = st.gen_length, ids.device
    canvas = torch.cat([ids, torch.full((B, G), st.mask_id, dtype=torch.long, device=device)], 1)
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    steps: list[dict[str, Any]] | None = [] if trace else None
    results = {}
    while engine.has_work():
        by_block: dict[int, list] = {}
        for u in engine.step():
            if u.done:
                if u.result.error is not None:
                    raise RuntimeError(u.result.error)
                results[u.id] = u.result
            if u.nfe > int(nfe[u.id]):  # this update is a forward of row u.id
                nfe[u.id] = u.nfe
                canvas[u.id, P:] = torch.tensor(u.answer, dtype=torch.long, device=device)
                by_block.setdefault(u.block, []).append(u)
        for block in sorted(by_block):
            ups = by_block[block]
            rows, pos, tok = [u.id for u in ups], [u.positions for u in ups], [u.tokens for u in ups]
            rev = [u.revised for u in ups]
            if steps is not None:
                steps.append({"block": block, "rows": rows, "positions": pos, "tokens": tok, "revised": rev})
            if callback is not None:
                callback(StepEvent(block, torch.tensor(rows, device=device), pos, tok, nfe, canvas, P, rev))
    res = [results[i] for i in range(B)]
    answers = torch.tensor([r.answer for r in res], dtype=torch.long, device=device)
    prompts = ids.clone()  # a block model's policy may overwrite prompt tokens (SDAR's uncapped top-k quirk)
    for i, r in enumerate(res):
        prompts[i, P - len(r.prompt) :] = torch.tensor(r.prompt, dtype=torch.long, device=device)
    return GenerateOutput(
        sequences=torch.cat([prompts, answers], 1),
        nfe=torch.tensor([r.nfe for r in res], dtype=torch.long, device=device),
        tokens_per_step=[r.tokens_per_step for r in res],
        decode_step=torch.tensor([r.decode_step for r in res], dtype=torch.long, device=device),
        prompt_length=P,
        policy=policy,
        cache=st.cache,
        trace=steps,
        finished_early=torch.tensor([r.finished_early for r in res], device=device) if early else None,
        eos_ids=st.eos,
        mask_id=st.mask_id,
        revisions=torch.tensor([r.revisions for r in res], dtype=torch.long, device=device),
        revised=torch.tensor([r.revised for r in res], dtype=torch.long, device=device),
    )
