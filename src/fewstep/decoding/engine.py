"""The step-level, continuous-batching engine that ``fewstep.generate`` and the server share.

Every request becomes a **row** that carries its own progress: prompt and answer length, block length,
its decode window (the canvas columns of its current block; for a policy that ``spans_blocks``, from its
current block to the answer's end, several blocks decoded at once) and phase, policy and policy memory, random
stream (a seeded row has its own generator), KV cache, NFE, and what the current round produced for it
(:class:`Outcome`). A round (:meth:`Engine.step`):

1. acts on the inbox: cancelled rows leave (one last ``Update``), waiting requests join the running set
   in FIFO order up to ``max_batch``;
2. rows entering a block get their policy memory (``start_block``, one call per policy group);
3. runs at most three batched model calls, one per kind of forward (:mod:`fewstep.decoding.forward`):
   full-canvas forwards (cache ``none``, and the first forward of a block with a cache), prefix-cached
   forwards and dual-cached forwards. Rows of every length, block and cache mode share these calls;
4. groups the rows by policy (equal policies: same class and options, :func:`policy_key`) and block
   geometry and makes one ``select`` call per group; commits, counts NFE, and asks the policy which rows are
   done;
5. a row whose block is done moves to its next block at once ("first done, first out"; a spanning row to
   its next block that holds a mask), stops at an EOS with ``early_stop`` (after the block), ``eos_early_stop``
   or ``eos_fill`` (after the forward: d3LLM's fill of everything after the first EOS, then a row with no
   mask left is done), finishes after its last block, or stops at ``max_nfe``.

Policy capabilities (:mod:`fewstep.decoding.policies.base`): a ``revises`` policy's commits may overwrite
decoded tokens of the open block (counted as revisions: ``RowResult.revisions``/``revised``, ``Update.revised``);
a ``uses_embeddings`` policy gets the model's input embedding in its ``StepState`` and its ``Selection.embeds``
become the row's window inputs at its next forward; a ``folds_store`` policy's finished block is stored in the
exact block cache by the next block's first forward (which runs both blocks) instead of a store forward;
a ``spans_blocks`` policy's window runs from the row's current block to the answer's end, its memory lives
from block to block and, with ``cache="prefix"``, it plans the row's prefix cache (``Row.prefix_plan``).

Exactness: a row's forward sees exactly its own canvas at its own RoPE positions (pads are masked keys,
before its real columns or after its queries); its policy state, memory, step counter and random stream
are its own, so each request gets the tokens and NFE it gets alone, whatever shares the round.

Fault isolation: an exception while serving one request ends that request only. A batched model call,
``start_block``, ``select`` or ``block_done`` call that raises is run again row by row (seeded random
streams restored first), and only the rows that raise alone end, with ``result.error``; a request whose
row cannot be built (admission) or whose bookkeeping raises ends the same way. Every other row goes on
with exactly the tokens and NFE it gets alone, and the engine keeps serving.

Contract (callers rely on every name here):

* ``Request``: one prompt and how to decode it (:mod:`fewstep.decoding.request`, where every field is
  validated). Validation errors raise :class:`RequestError` (a ``ValueError`` whose ``field`` names the
  ``Request`` field at fault) from :meth:`Engine.submit`, at once, with a message fit for a user;
  :meth:`Engine.validate` runs the same checks without enqueuing.
* ``Engine(model, *, max_batch=32, tokenizer=None)``: ``submit(request) -> id`` and ``cancel(id)`` are
  thread-safe and cheap (they only enqueue; the engine acts on them at the start of its next round);
  ``step()`` runs one round and returns the :class:`Update` of every request that took part;
  ``has_work()`` is True from ``submit`` until the round that emits the request's last update (so a
  loop ``while has_work(): step()`` always sees every request finish); ``cancel`` of an id that is not
  pending or running (finished, unknown) does nothing and keeps nothing; ``run(requests)`` submits and
  steps until all are done and returns their :class:`RowResult` in order. Only one thread may call
  ``step``/``run``.
* A cancelled request emits one last ``Update`` with ``done=True`` and ``result.cancelled=True``.
* ``max_nfe``: a request that reached it stops; its answer keeps ``mask_id`` where nothing was
  committed and ``result.stopped_by_max_nfe`` is True.
* A row whose policy makes no progress within ``max_steps_per_block`` forwards, or that fails (see fault
  isolation), ends with ``result.error`` set (``run`` raises ``RuntimeError`` with it); the others go on.
"""

from __future__ import annotations

import enum
import itertools
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, NamedTuple

import torch

from fewstep.decoding.forward import (
    BlockRun,
    Seqs,
    block_forward,
    dual_forward,
    full_forward,
    prefix_forward,
    prefix_store_forward,
)
from fewstep.decoding.policies import Policy, StepState
from fewstep.decoding.policies.base import RowRNG, shown
from fewstep.decoding.request import (
    CACHE_MODES,
    END_OF_TURN_TOKENS,
    Quirks,
    Request,
    RequestError,
    ResolvedSettings,
    check_id,
    check_prompt,
    default_block_length,
    request_policy,
    resolve_settings,
    stop_ids,
)
from fewstep.models.base import KVCache

__all__ = [
    "CACHE_MODES",
    "END_OF_TURN_TOKENS",
    "Engine",
    "Outcome",
    "Phase",
    "Quirks",
    "Request",
    "RequestError",
    "ResolvedSettings",
    "RowResult",
    "Update",
    "Window",
    "check_prompt",
    "default_block_length",
    "resolve_settings",
    "stop_ids",
]

POLICY_CACHE = 256  # parsed policy specs the engine keeps (least recently used dropped first)


@dataclass
class RowResult:
    """What one request got: its answer ``[G]`` (mask_id where never committed) and its counters."""

    id: Any
    prompt: list[int]
    answer: list[int]
    nfe: int
    tokens_per_step: list[int]
    decode_step: list[int]  # per answer position: the row's NFE at the forward that committed it (0: never)
    finished_early: bool = False  # early_stop hit an EOS
    cancelled: bool = False
    stopped_by_max_nfe: bool = False
    error: str | None = None  # why the request failed (its policy made no progress, or a fault)
    revisions: int = 0  # revision events: a decoded answer token replaced by another one (revising policies)
    revised: int = 0  # committed answer positions whose final token differs from their first committed one

    @property
    def revised_fraction(self) -> float:
        """The share of the committed answer tokens that revision changed (0 when none was committed)."""
        committed = sum(1 for s in self.decode_step if s)
        return self.revised / committed if committed else 0.0


@dataclass
class Update:
    """One request's progress at one forward (what a streaming client or the page needs)."""

    id: Any
    nfe: int  # this request's forwards so far
    block: int
    positions: list[int]  # answer-relative positions whose token this forward set (first commits and revisions)
    tokens: list[int]
    answer: list[int]  # the whole answer canvas after this forward (mask_id where masked)
    decode_step: list[int]
    mask_id: int
    done: bool = False
    result: RowResult | None = None  # set when done
    revised: list[int] = field(default_factory=list)  # the positions among them that replaced a decoded token
    mutable_from: int | None = None  # answer positions from here on may still change (a revising policy's
    # open block); None: every committed token is final


class Phase(enum.Enum):
    """What a row's next forward does."""

    DENOISE = "denoise"  # a policy step on the decode window
    PREFILL = "prefill"  # block models with a cache: the complete prompt blocks go into the cache
    STORE = "store"  # block models with a cache: the completed block goes into the cache


class Window(NamedTuple):
    """The canvas columns ``[start, end)`` a row decodes now (its current block)."""

    start: int
    end: int


@dataclass
class Outcome:
    """What the current round produced for one row (reset at the start of every round)."""

    block: int  # the answer-relative block of this round's forward
    logits: torch.Tensor | None = None  # [L, V] the window's logits until the policy step (None after it)
    denoised: bool = False  # the policy stepped the row (else the forward was a block model's cache forward)
    positions: list[int] = field(default_factory=list)  # answer-relative positions set (commits, revisions)
    tokens: list[int] = field(default_factory=list)
    revised: list[int] = field(default_factory=list)  # the positions among them that replaced a decoded token
    block_done: bool = False  # the policy is done with the block
    eos_stop: bool = False  # eos_early_stop or eos_fill ended the row at this forward


class _Row:
    """One running request: its canvas, its decode window and phase, every counter of its own progress and
    this round's :class:`Outcome`."""

    def __init__(self, request: Request, settings: ResolvedSettings, prompt: list[int], device, order: int):
        self.request, self.settings, self.order = request, settings, order
        self.policy_key = policy_key(settings.policy)
        self.prompt_length, self.gen_length = len(prompt), settings.gen_length
        self.block_length, self.block_diffusion = settings.block_length, settings.block_diffusion
        self.spans = settings.policy.spans_blocks and not self.block_diffusion  # the window runs to the answer end
        P, G, L = self.prompt_length, self.gen_length, self.block_length
        if self.block_diffusion:  # blocks counted from the row's first token; decoding starts at the prompt tail's
            self.origin, self.first_block, self.num_blocks = 0, P // L, -(-(P + G) // L)
        else:
            self.origin, self.first_block, self.num_blocks = P, 0, G // L
        n = self.origin + self.num_blocks * L
        self.canvas = torch.tensor(prompt + [settings.mask_id] * (n - P), dtype=torch.long, device=device)
        seed = request.seed
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(int(seed))
        quirks = request.quirks
        self.suppress_mask = not quirks.mask_prediction
        self.own_first = quirks.prefix_own_logit
        # dual == prefix when block-causal
        self.cache = "prefix" if self.block_diffusion and settings.cache == "dual" else settings.cache
        self.extra_nfe = quirks.cache_extra_nfe and settings.cache != "none" and not self.block_diffusion
        # the exact block cache stores a finished block in the next block's first forward (no store forward)
        self.folds = self.block_diffusion and self.cache != "none" and settings.policy.folds_store
        self.nfe, self.tokens_per_step = 0, []
        self.decode_step = torch.zeros(G, dtype=torch.long, device=device)
        self.first_token = torch.full((G,), -1, dtype=torch.long, device=device)  # first committed token
        self.revisions = 0
        self.kv = None
        self.memory = None
        self.fold = False  # the next forward also runs the previous block and stores it (folds_store)
        self.enter_block(self.first_block)
        short = quirks.prefill_short_prompt  # dInfer prefills the first block even when the prompt fills none
        cached_prompt = self.block_diffusion and self.cache != "none" and (self.first_block > 0 or short)
        self.phase = Phase.PREFILL if cached_prompt else Phase.DENOISE
        self.finished_early = self.stopped_by_max_nfe = False
        self.error: str | None = None
        self.outcome = Outcome(0)

    def enter_block(self, block: int) -> None:
        """Make ``block`` (absolute index) the decode window: no steps, no policy memory yet.

        A row whose policy spans blocks (``Policy.spans_blocks``) decodes from ``block`` to the answer end and
        keeps its policy memory and its cache from block to block (the policy manages both)."""
        self.block, self.steps = block, 0
        self.embeds = None  # [L, D] the window's input embeddings for the next forward (None: its ids)
        start = self.origin + block * self.block_length
        end = self.origin + self.num_blocks * self.block_length if self.spans else start + self.block_length
        self.window = Window(start, end)
        if not self.spans:
            self.memory = None
            if not self.block_diffusion:
                self.kv = None

    def next_block(self) -> int:
        """The block after the current one that the row decodes next: the next one, or for a spanning row the
        first later block that still holds a mask (``num_blocks`` when there is none)."""
        b = self.block + 1
        if self.spans:
            mask, L = self.settings.mask_id, self.block_length
            while b < self.num_blocks:
                s = self.origin + b * L
                if bool((self.canvas[s : s + L] == mask).any()):
                    break
                b += 1
        return b

    def prefix_plan(self) -> tuple[int, int]:
        """A spanning row with ``cache="prefix"``: the canvas columns its next forward takes from its cache and
        the columns its cache holds after it, from the policy's ``prefix_reuse`` / ``prefix_keep`` memory
        (counted in blocks: 0 none, 1 the prompt, ``k + 1`` the prompt and ``k`` answer blocks)."""
        mem = self.memory or {}

        def cols(key: str) -> int:
            n = int(mem[key][0]) if key in mem else 0
            return 0 if n <= 0 else self.prompt_length + (n - 1) * self.block_length

        reuse = cols("prefix_reuse") if self.kv is not None else 0
        return reuse, cols("prefix_keep")

    @property
    def block_index(self) -> int:
        """The current block, counted from the answer's first decoded block."""
        return self.block - self.first_block

    def fail(self, message: str) -> None:
        """End this request with an error (the first one wins)."""
        if self.error is None:
            self.error = message

    def seqs(self) -> Seqs:
        """The sequences this row runs: its canvas, and with CFG the copy with the prompt masked."""
        x = self.canvas[None]
        if self.settings.cfg_scale > 0:
            un = x.clone()
            un[:, : self.prompt_length] = self.settings.mask_id
            x = torch.cat([x, un])
        extra = {}
        if self.spans and self.settings.cache == "prefix":
            extra = {"cut": self.prefix_plan()[0], "own_first": self.own_first}
        return Seqs(x, self.kv, *self.window, embeds=self.embeds, **extra)

    def block_run(self) -> BlockRun:
        """This row's part of a block-diffusion call: its phase's columns, cache and wanted logits."""
        x, (s, e), L = self.seqs().x, self.window, self.block_length
        if self.phase is Phase.PREFILL:  # the complete prompt blocks (a short prompt: its first block, not kept)
            return BlockRun(x[:, :s], None, 0, L, None, True) if s else BlockRun(x[:, :e], None, 0, L, None, False)
        embeds = None if self.embeds is None else (s, self.embeds)
        if self.cache == "none":  # no cache: the canvas up to the block (later blocks are never attended)
            return BlockRun(x[:, :e], None, 0, L, (s, e), False, embeds=embeds)
        if self.fold:  # the previous block (stored: its columns' keys are kept) and this one, in one forward
            return BlockRun(x[:, s - L : e], self.kv, s - L, L, (L, 2 * L), True, keep=L)
        store = self.phase is Phase.STORE
        embeds = None if embeds is None else (0, self.embeds)
        return BlockRun(x[:, s:e], self.kv, s, L, None if store else (0, L), store, embeds=embeds)

    def combine(self, z: torch.Tensor) -> torch.Tensor:
        """The window's logits ``[L, V]`` from this row's ``[n_seq, L, V]`` slice (CFG combined; a view without)."""
        scale = self.settings.cfg_scale
        return z[1] + (scale + 1) * (z[0] - z[1]) if scale > 0 else z[0]

    def result(self, cancelled: bool = False) -> RowResult:
        return RowResult(
            id=self.request.id,
            prompt=self.canvas[: self.prompt_length].tolist(),
            answer=self.answer(),
            nfe=self.nfe,
            tokens_per_step=list(self.tokens_per_step),
            decode_step=self.decode_step.tolist(),
            finished_early=self.finished_early,
            cancelled=cancelled,
            stopped_by_max_nfe=self.stopped_by_max_nfe,
            error=self.error,
            revisions=self.revisions,
            revised=self.revised_count(),
        )

    def revised_count(self) -> int:
        """Committed answer positions (not filled by early stop) whose token differs from their first commit."""
        answer = self.canvas[self.prompt_length : self.prompt_length + self.gen_length]
        kept = (self.decode_step > 0) & (self.first_token >= 0)
        return int((kept & (answer != self.first_token)).sum())

    def answer(self) -> list[int]:
        return self.canvas[self.prompt_length : self.prompt_length + self.gen_length].tolist()

    def early_stop(self, upto: int) -> bool:
        """With early stop: if the answer before canvas column ``upto`` (the decoded blocks) holds an EOS,
        fill everything after it with EOS."""
        st, P = self.settings, self.prompt_length
        if st.fill_id is None:
            return False
        if self.request.quirks.early_stop_keeps_block:
            return self._stop_after_block()
        answer = self.canvas[P : min(upto, P + self.gen_length)]
        hit = torch.isin(answer, torch.tensor(st.eos, device=self.canvas.device))
        if not bool(hit.any()):
            return False
        self._stop_at(P + int(hit.nonzero()[0]))
        return True

    def _stop_after_block(self) -> bool:
        """dInfer's early stop: an EOS anywhere in the finished block (its prompt tail included) stops the
        row; the block is kept whole and everything after it is EOS."""
        s, e = self.window
        eos = torch.tensor(self.settings.eos, device=self.canvas.device)
        if not bool(torch.isin(self.canvas[s:e], eos).any()):
            return False
        self.canvas[e:] = self.settings.eos[0]
        self.decode_step[max(0, e - self.prompt_length) :] = 0
        self.finished_early = True
        return True

    def _stop_at(self, first: int) -> None:
        """Stop at the EOS at canvas column ``first``: the answer after it is EOS, never committed."""
        cut = max(first + 1, self.prompt_length)
        self.canvas[cut:] = self.settings.eos[0]
        self.decode_step[cut - self.prompt_length :] = 0
        self.finished_early = True

    def eos_fill(self) -> bool:
        """``eos_fill`` (d3LLM's end-of-text stop): once the answer holds an EOS, everything after the first
        one becomes EOS at once (masks and decoded tokens alike, no forward); True when no mask is left, so
        the row is done. Decode steps stay those of the forwards (0 for masks the fill turned into EOS)."""
        if not self.request.eos_fill:
            return False
        st, P, G = self.settings, self.prompt_length, self.gen_length
        answer = self.canvas[P : P + G]
        hit = torch.isin(answer, torch.tensor(st.eos, device=self.canvas.device))
        if not bool(hit.any()):
            return False
        masked = bool((answer == st.mask_id).any())
        answer[int(hit.nonzero()[0]) + 1 :] = st.eos[0]
        if bool((answer == st.mask_id).any()):
            return False  # masks before the first EOS are still to decode
        self.finished_early = True
        if masked and self.request.quirks.eos_fill_nfe:
            self.nfe += 1  # d3LLM counts the forward before its loop-head fill, which then ends the row
        return True

    def eos_stop(self, committed_eos: bool) -> bool:
        """``eos_early_stop`` (LLaDA2's): after a step that committed an EOS, stop now if every answer
        position before the first EOS of the canvas so far is decoded (from 0 with the prompt quirk)."""
        if not (self.request.eos_early_stop and committed_eos):
            return False
        st, P = self.settings, self.prompt_length
        lo = 0 if self.request.quirks.early_stop_scans_prompt else P
        hit = torch.isin(self.canvas[lo : self.window.end], torch.tensor(st.eos, device=self.canvas.device))
        if not bool(hit.any()):
            return False
        first = lo + int(hit.nonzero()[0])
        if bool((self.canvas[P:first] == st.mask_id).any()):
            return False
        self._stop_at(first)
        return True


class _GroupRNG(RowRNG):
    """The random streams of one policy group: row ``j`` draws from its own generator (or the global
    RNG when unseeded); with no seeded row, one draw for the group from torch's global stream.

    It saves each generator's state before its first draw, so a failed call can be undone (:meth:`restore`)
    and run again row by row with exactly the draws each row makes alone."""

    def __init__(self, rows: list[_Row], device: torch.device):
        gens = [r.generator for r in rows]
        self.generators = None if all(g is None for g in gens) else gens
        self.device = device
        self._saved: dict[int, torch.Tensor] = {}

    def uniform(self, rows: torch.Tensor, counts: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        if self.generators is not None:
            for j in rows.tolist():
                g = self.generators[j]
                if g is not None and j not in self._saved:
                    self._saved[j] = g.get_state()
        return super().uniform(rows, counts, width, dtype)

    def restore(self) -> None:
        """Put every generator back where it was before this group's draws."""
        for j, state in self._saved.items():
            self.generators[j].set_state(state)
        self._saved.clear()


def policy_key(policy: Policy) -> tuple:
    """Equal policies share ``select`` calls: a dataclass policy is keyed by its class and options (a rule
    is a pure function of them), so requests that each carry their own instance of one spec (the server's)
    are decided together; any other policy by its identity."""
    if is_dataclass(policy):
        return (type(policy), *((f.name, repr(getattr(policy, f.name))) for f in fields(policy)))
    return (id(policy),)


def _group_key(r: _Row, start: bool = False) -> tuple:
    """Rows that can share one policy call: equal policies, block length, mask/EOS ids, and the same block
    and answer length for ``start_block`` (``start=True``) and for rules that read the batch-wide block
    scalars of ``StepState`` in ``select``/``block_done``."""
    st = r.settings
    key = (r.policy_key, r.block_length, st.mask_id, st.eos, r.suppress_mask)
    scalars = (r.block_index, r.num_blocks - r.first_block, r.gen_length)
    return key + (scalars if start or st.policy.uses_block_scalars else ())


def _kind(r: _Row) -> str:
    """The kind of forward a row runs this round (:mod:`fewstep.decoding.forward`)."""
    cache = r.settings.cache
    if r.block_diffusion:
        return "block"
    if r.spans and cache == "prefix":  # the policy plans its cache: a full forward unless it reuses one
        return "prefix" if r.prefix_plan()[0] > 0 else "full"
    return "full" if cache == "none" or r.steps == 0 else cache


def _state(rows: list[_Row], device: torch.device, memory: dict | None = None, model=None) -> StepState:
    """The policy's view of ``rows`` (one group: same policy and block geometry); with ``model``, a policy that
    ``uses_embeddings`` gets the model's input embedding (never the model itself)."""
    r0, mask_id = rows[0], rows[0].settings.mask_id
    if not r0.block_diffusion and len({(r.gen_length, r.block) for r in rows}) == 1:
        answers = torch.stack([r.canvas[r.prompt_length :] for r in rows])
        lo = r0.window.start - r0.prompt_length
        tokens, gen_masked = answers[:, lo : lo + r0.window.end - r0.window.start], (answers == mask_id).sum(-1)
    else:  # rows at different blocks / answer lengths, or block models (blocks from absolute positions)
        tokens = torch.stack([r.canvas[r.window.start : r.window.end] for r in rows])
        answers = [r.canvas[r.prompt_length : r.prompt_length + r.gen_length] for r in rows]
        gen_masked = torch.stack([(a == mask_id).sum() for a in answers])
    if memory is None:
        memory = {k: torch.cat([r.memory[k] for r in rows]) for k in (r0.memory or {})}
    embed = mask_embedding = None
    if model is not None and r0.settings.policy.uses_embeddings:
        embed = model.embed
        mask_embedding = model.embed(torch.tensor([mask_id], device=device))[0]
    return StepState(
        tokens=tokens,
        mask=tokens == mask_id,
        step=torch.tensor([r.steps for r in rows], dtype=torch.long, device=device),
        rows=torch.arange(len(rows), device=device),
        block=r0.block_index,
        num_blocks=r0.num_blocks - r0.first_block,
        block_length=r0.block_length,
        gen_length=r0.gen_length,
        gen_masked=gen_masked,
        mask_id=mask_id,
        eos_ids=r0.settings.eos,
        rng=_GroupRNG(rows, device),
        memory=memory,
        embed=embed,
        mask_embedding=mask_embedding,
    )


def _groups(rows: list[_Row], start: bool = False) -> list[list[_Row]]:
    out: dict[tuple, list[_Row]] = {}
    for r in rows:
        out.setdefault(_group_key(r, start), []).append(r)
    return list(out.values())


#: the fewest columns :func:`default_call_columns` allows one call on a CPU
MIN_CALL_COLUMNS = 1024


def default_call_columns(model) -> float:
    """The widest model call worth running at once on ``model``'s device (see ``Engine(max_call_columns)``).

    On a CPU a batched call costs less per row than a single one until its activations (columns x the
    widest projection) outgrow the caches, then more again (the shipped student: 2.4-2.7 ms per row at
    8-12 rows of 74 columns, 3.5-3.9 ms at 32-48 rows). Weights are read once per call, so splitting pays
    while a call's activations exceed its weights: the bound is twice a layer's parameters over its widest
    projection (the same product for the activations; 1,158 columns for the student, 35,500 for an
    LLaDA-8B layer, where no batch of ours splits), at least :data:`MIN_CALL_COLUMNS`. Elsewhere (GPU):
    unbounded."""
    if model.device.type != "cpu" or not hasattr(model, "stack"):
        return float("inf")
    layers = model.stack()[1]
    if len(layers) == 0:
        return float("inf")
    weights = [p for p in layers[0].parameters() if p.dim() == 2]
    if not weights:
        return float("inf")
    params = sum(p.numel() for p in weights)
    return float(max(MIN_CALL_COLUMNS, 2 * params // max(p.shape[0] for p in weights)))


def _even_split(rows: list, width: int, limit: float) -> list[list]:
    """``rows`` (one call ``width`` columns wide) as the fewest near-equal consecutive calls under ``limit``."""
    k = min(len(rows), math.ceil(width / limit))
    if k <= 1:
        return [rows]
    size, extra = divmod(len(rows), k)
    out, i = [], 0
    for j in range(k):
        n = size + (j < extra)
        out.append(rows[i : i + n])
        i += n
    return out


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _policy_failed(rows: list[_Row]) -> Callable[[BaseException], str]:
    return lambda exc: f"policy {rows[0].settings.policy.describe()} failed: {_reason(exc)}"


class _Pending(NamedTuple):
    request: Request
    settings: ResolvedSettings
    prompt: list[int]


@dataclass
class _Inbox:
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: deque = field(default_factory=deque)  # _Pending, FIFO
    cancelled: set = field(default_factory=set)  # ids to cancel at the next round (cleared every round)
    live: set = field(default_factory=set)  # ids submitted whose last update has not been emitted


class Engine:
    """Decodes requests that arrive at any time, in continuously batched rounds (see the module docstring)."""

    def __init__(
        self,
        model,
        *,
        max_batch: int = 32,
        tokenizer=None,
        max_padding: float = 0.25,
        max_call_columns: float | None = None,
    ):
        """``max_padding``: the share of padded columns one batched call may run before the engine splits
        a kind of forward into calls of similar lengths (rows sorted by the columns they run). Padding
        costs compute in proportion on a CPU and little on a GPU; ``float("inf")``: one call per kind of
        forward per round (up to ``max_call_columns``).

        ``max_call_columns``: the most columns (rows x sequences x columns run) one model call runs; a wider
        call is split into near-equal calls. None: :func:`default_call_columns` (on a CPU, where a call whose
        activations outgrow the caches costs more per row; unbounded elsewhere); ``float("inf")``: never.
        Every call is exact, so this changes speed only."""
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1; got {max_batch!r}")
        if not max_padding >= 0:
            raise ValueError(f"max_padding must be >= 0; got {max_padding!r}")
        if max_call_columns is not None and not max_call_columns >= 1:
            raise ValueError(f"max_call_columns must be >= 1 or None; got {max_call_columns!r}")
        self.model, self.max_batch, self.tokenizer, self.max_padding = model, max_batch, tokenizer, max_padding
        self.device = model.device
        self.max_call_columns = default_call_columns(model) if max_call_columns is None else float(max_call_columns)
        cfg = model.config
        eos = stop_ids(model, tokenizer)
        self.pad_id = int(
            cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else (eos[0] if eos else 0)
        )
        self._inbox = _Inbox()
        self._ids = itertools.count()
        self._order = itertools.count()
        self._policies: dict[str, Policy] = {}  # spec -> instance, least recently used first
        self._running: list[_Row] = []
        self.forward_calls = 0  # batched model calls so far (at most one per kind of forward per round)
        self.rounds = 0  # rounds that ran forwards
        self.cancelled = 0  # requests cancelled so far (before or while running)
        self.failed = 0  # requests that ended with an error

    def _policy(self, spec: Policy | str) -> Policy:
        """One instance per spec string, so requests with the same spec share ``select`` calls."""
        if isinstance(spec, Policy) or not isinstance(spec, str):
            return request_policy(spec)
        key = spec.strip()
        policy = self._policies.pop(key, None)
        self._policies[key] = policy if policy is not None else request_policy(spec)
        while len(self._policies) > POLICY_CACHE:
            del self._policies[next(iter(self._policies))]
        return self._policies[key]

    def validate(self, request: Request) -> tuple[ResolvedSettings, list[int]]:
        """The checks of :meth:`submit` without enqueuing: the resolved settings and the prompt as ints.

        Raises :class:`RequestError` (``field``: the request field at fault) for a user mistake."""
        policy = self._policy(request.policy)
        check_id(request.id)
        g = request.gen_length
        g = g if isinstance(g, int) and not isinstance(g, bool) and g > 0 else 0  # a bad one: resolve_settings says so
        prompt = check_prompt(self.model, request.prompt, g)  # the context first: an answer too long is the mistake
        return resolve_settings(self.model, request, self.tokenizer, policy), prompt

    def submit(self, request: Request) -> Any:
        """Validate and enqueue ``request``; returns its id. Raises :class:`RequestError` (a ValueError)
        for bad settings, or for an explicit ``id`` that is already pending or running."""
        settings, prompt = self.validate(request)
        with self._inbox.lock:
            if request.id is None:
                request.id = next(self._ids)
            elif request.id in self._inbox.live:
                raise RequestError("request {id} {value} is already pending or running", "id", value=shown(request.id))
            self._inbox.live.add(request.id)
            self._inbox.pending.append(_Pending(request, settings, prompt))
        return request.id

    def cancel(self, request_id: Any) -> bool:
        """Cancel a pending or running request (acted on at the start of the next round); True if it was
        one. An id that is finished or unknown is ignored (nothing is kept for it)."""
        with self._inbox.lock:
            if request_id not in self._inbox.live:
                return False
            self._inbox.cancelled.add(request_id)
            return True

    def has_work(self) -> bool:
        """Whether any request is pending or running (True until the round that emits its last update)."""
        with self._inbox.lock:
            return bool(self._inbox.live)

    @property
    def running(self) -> int:
        """Rows in the running set."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests waiting for a place in the running set."""
        with self._inbox.lock:
            return len(self._inbox.pending)

    # -- one round --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Update]:
        """One round: inbox, block starts, one batched forward per kind, policy commits, row exits."""
        updates = self._admit()
        rows = list(self._running)
        if not rows:
            return updates
        try:
            self._round(rows, updates)
        except Exception as exc:  # a fault outside the per-row guards: end this round's rows, keep serving
            for r in rows:
                if r in self._running:
                    r.fail(f"the engine failed: {_reason(exc)}")
                    updates.append(self._finish(r))
        return updates

    def _round(self, rows: list[_Row], updates: list[Update]) -> None:
        for r in rows:
            r.outcome = Outcome(r.block_index)
        self._start_blocks([r for r in rows if r.memory is None])
        for r in rows:
            if r.steps >= r.settings.limit:
                r.fail(
                    f"policy {r.settings.policy.describe()} made no progress on block {r.block} within "
                    f"{r.settings.limit} forwards (raise max_steps_per_block if this is intended)"
                )
        live = [r for r in rows if r.error is None]
        self.rounds += bool(live)
        self._forward(live)
        for group in _groups([r for r in live if r.error is None and r.outcome.logits is not None]):
            self._decide(group)
        for r in rows:
            updates.append(self._conclude(r))

    def _admit(self) -> list[Update]:
        """Cancellations and FIFO admission (up to ``max_batch`` running rows)."""
        inbox = self._inbox
        with inbox.lock:
            cancelled, inbox.cancelled = inbox.cancelled, set()
            dropped = [p for p in inbox.pending if p.request.id in cancelled]
            inbox.pending = deque(p for p in inbox.pending if p.request.id not in cancelled)
        updates = [self._unstarted(p, cancelled=True) for p in dropped]
        for row in [r for r in self._running if r.request.id in cancelled]:
            updates.append(self._finish(row, cancelled=True))
        with inbox.lock:
            free = self.max_batch - len(self._running)
            admitted = [inbox.pending.popleft() for _ in range(min(free, len(inbox.pending)))]
        for p in admitted:
            try:
                self._running.append(_Row(p.request, p.settings, p.prompt, self.device, next(self._order)))
            except Exception as exc:  # e.g. a seed the generator refuses: this request ends, the others go on
                updates.append(self._unstarted(p, error=f"the request could not start: {_reason(exc)}"))
        return updates

    def _isolated(self, rows: list[_Row], action: Callable[[list[_Row]], None], failure) -> list[_Row]:
        """``action(rows)``; if it raises, ``action`` again row by row, and the rows that raise alone fail
        with ``failure(exc)``. ``action`` changes no row before it succeeds (it restores the random streams
        it drew from itself). Returns the rows it succeeded for."""
        try:
            action(rows)
            return rows
        except Exception as exc:
            if len(rows) == 1:
                rows[0].fail(failure(exc))
                return []
        ok = []
        for r in rows:
            try:
                action([r])
                ok.append(r)
            except Exception as exc:
                r.fail(failure(exc))
        return ok

    def _start_blocks(self, rows: list[_Row]) -> None:
        """Policy memory for rows entering a block (one ``start_block`` call per group)."""
        for group in _groups(rows, start=True):
            self._isolated(group, self._start_block, _policy_failed(group))

    def _start_block(self, rows: list[_Row]) -> None:
        mem = rows[0].settings.policy.start_block(_state(rows, self.device, memory={}))
        for i, r in enumerate(rows):
            r.memory = {k: v[i : i + 1] for k, v in mem.items()}

    def _forward(self, rows: list[_Row]) -> None:
        """Each row's forward of this round (its window's logits go to ``row.outcome.logits``): at most one
        model call per kind; a call that raises is run again row by row and only the rows that fail alone fail."""
        kinds: dict[str, list[_Row]] = {"full": [], "prefix": [], "dual": [], "block": []}
        for r in rows:
            kinds[_kind(r)].append(r)
        for kind, group in ((k, g) for k, rs in kinds.items() for g in self._calls(k, rs)):
            self._isolated(
                group,
                lambda call, kind=kind: self._call(kind, call),
                lambda e: f"the model forward failed: {_reason(e)}",
            )

    def _call(self, kind: str, rows: list[_Row]) -> None:
        """One batched model call of ``kind`` for ``rows``; rows change only once it succeeded."""
        self.forward_calls += 1
        if kind == "block":
            zs, caches = block_forward(self.model, [r.block_run() for r in rows], self.pad_id)
            logits = [None if z is None else r.combine(z) for r, z in zip(rows, zs)]
        else:
            seqs = [r.seqs() for r in rows]
            caches = [None] * len(rows)
            if kind == "full":
                want = any(r.settings.cache != "none" for r in rows)
                zs, caches = full_forward(self.model, seqs, self.pad_id, want)
            elif kind == "prefix":
                stores = [r.spans and r.prefix_plan()[1] > r.prefix_plan()[0] for r in rows]
                if any(stores):
                    zs, caches = prefix_store_forward(self.model, seqs, self.pad_id)
                    caches = [kv if store else None for kv, store in zip(caches, stores)]
                else:
                    zs = prefix_forward(self.model, seqs, self.pad_id)
            else:
                zs = dual_forward(self.model, seqs, self.pad_id)
            logits = [r.combine(z) for r, z in zip(rows, zs)]
        for r, z, kv in zip(rows, logits, caches):
            r.outcome.logits = z
            if kv is None or (kind != "block" and r.settings.cache == "none"):
                continue
            if r.spans:  # the policy's plan: the cache keeps its first `keep` columns
                keep = r.prefix_plan()[1]
                r.kv = (
                    KVCache([(k[:, :, :keep].clone(), v[:, :, :keep].clone()) for k, v in kv.layers]) if keep else None
                )
            else:
                r.kv = kv
            r.fold = False

    def _calls(self, kind: str, rows: list[_Row]) -> list[list[_Row]]:
        """Split one kind's rows into calls whose padded columns stay within ``max_padding`` (by length), and
        a call wider than ``max_call_columns`` into near-equal calls under it."""
        if not rows:
            return []
        sh = self.model.logit_shift

        def cols(r: _Row) -> int:  # the columns this row runs through the network (block: and attends to)
            if kind == "block":
                run = r.block_run()
                return run.x.shape[1] + (0 if run.kv is None else run.kv.length)
            n, (s, e) = len(r.canvas), r.window
            if kind == "prefix" and r.spans:
                return n - r.prefix_plan()[0]
            return n if kind == "full" else (n - s + sh if kind == "prefix" else e - s + sh)

        calls: list[tuple[list[_Row], int]] = []  # (rows, widest row: its columns x sequences)
        real = 0
        for r in sorted(rows, key=lambda r: (cols(r), len(r.canvas), r.order)):
            c = cols(r)
            w = c * (2 if r.settings.cfg_scale > 0 else 1)
            if calls and (len(calls[-1][0]) + 1) * c <= (1 + self.max_padding) * (real + c):
                calls[-1][0].append(r)
                calls[-1] = (calls[-1][0], max(calls[-1][1], w))
                real += c
            else:
                calls.append(([r], w))
                real = c
        return [part for call, w in calls for part in _even_split(call, len(call) * w, self.max_call_columns)]

    def _decide(self, group: list[_Row]) -> None:
        """The policy step of one group: ``select`` and commit, then ``block_done``, each isolated per row."""
        failed = _policy_failed(group)
        stepped = self._isolated(group, self._select, failed)
        self._isolated(stepped, self._block_done, failed)
        for r in group:
            r.outcome.logits = None  # the [L, V] logits are not kept past the policy step

    def _select(self, rows: list[_Row]) -> None:
        """One ``select`` call for ``rows``: commit, count, and record what each row committed."""
        r0, policy = rows[0], rows[0].settings.policy
        state = _state(rows, self.device, model=self.model)
        try:
            z = torch.stack([r.outcome.logits for r in rows])
            if r0.suppress_mask:
                z[..., r0.settings.mask_id] = torch.finfo(z.dtype).min
            sel = policy.select(z, state)
            # block models write wherever the policy commits (SDAR's uncapped top-k overwrites decoded and
            # prompt tokens), and so does a revising policy; full-attention rows only at masks. Counters count
            # the masks committed; a decoded token replaced by another one is a revision.
            write = sel.commit if (r0.block_diffusion or policy.revises) else sel.commit & state.mask
            fresh = write & state.mask
            new = torch.where(write, sel.tokens, state.tokens)
            changed = write & (new != state.tokens)
            committed_eos = [False] * len(rows)
            if r0.settings.eos and any(r.request.eos_early_stop for r in rows):
                eos = torch.tensor(r0.settings.eos, device=self.device)
                committed_eos = (torch.isin(new, eos) & write).any(-1).tolist()
            shown_l, new_l, fresh_n = (fresh | changed).tolist(), new.tolist(), fresh.sum(-1).tolist()
            revised_l = (changed & ~state.mask).tolist()
        except Exception:
            state.rng.restore()  # nothing was written: undo the draws so that a retry draws the same
            raise
        for i, r in enumerate(rows):
            r.canvas[r.window.start : r.window.end] = new[i]
            self._count(r, i, fresh, new)
            for k, v in (sel.memory or {}).items():
                r.memory[k] = v[i : i + 1]
            r.embeds = None if sel.embeds is None else sel.embeds[i]
            o, lo = r.outcome, r.window.start - r.prompt_length
            width = r.window.end - r.window.start  # the block, or a spanning row's blocks to the answer end
            pos = [j for j in range(max(0, -lo), min(width, r.gen_length - lo)) if shown_l[i][j]]
            r.tokens_per_step.append(fresh_n[i])
            o.positions, o.tokens = [lo + j for j in pos], [new_l[i][j] for j in pos]
            o.revised = [lo + j for j in pos if revised_l[i][j]]
            r.revisions += len(o.revised)
            o.eos_stop = r.eos_stop(committed_eos[i]) or r.eos_fill()
            o.denoised = True

    @staticmethod
    def _count(r: _Row, i: int, fresh: torch.Tensor, new: torch.Tensor) -> None:
        """A row's counters after its step: decode steps and first tokens of the answer positions it committed."""
        s, e = r.window
        lo = s - r.prompt_length  # answer-relative start of the window (negative: the prompt tail's block)
        a, b = max(0, -lo), min(e - s, r.gen_length - lo)
        if a < b:
            f = fresh[i, a:b]
            ds = r.decode_step[lo + a : lo + b]
            r.decode_step[lo + a : lo + b] = torch.where(f, r.nfe + 1, ds)
            first = r.first_token[lo + a : lo + b]
            t = new[i, a:b]
            take = f & (first < 0) & (t != r.settings.mask_id)
            r.first_token[lo + a : lo + b] = torch.where(take, t, first)
        r.nfe += 1
        r.steps += 1

    def _block_done(self, rows: list[_Row]) -> None:
        finished = rows[0].settings.policy.block_done(_state(rows, self.device)).tolist()
        for r, f in zip(rows, finished):
            r.outcome.block_done = bool(f) and not (r.extra_nfe and r.steps < 2)
            if r.outcome.block_done:
                r.embeds = None  # a finished block's store forward runs its ids

    def _conclude(self, r: _Row) -> Update:
        """The row's update for this round: its progress, or its last one when it finished or failed."""
        finished = False
        if r.error is None:
            try:
                finished = self._advance(r)
            except Exception as exc:
                r.fail(f"the engine failed: {_reason(exc)}")
        if r.error is not None:
            return self._finish(r)
        if finished:
            return self._finish(r, forwarded=True)
        o = r.outcome
        mutable = max(0, r.window.start - r.prompt_length) if r.settings.policy.revises else None
        return Update(
            r.request.id,
            r.nfe,
            o.block,
            o.positions,
            o.tokens,
            r.answer(),
            r.decode_step.tolist(),
            r.settings.mask_id,
            revised=o.revised,
            mutable_from=mutable,
        )

    def _advance(self, r: _Row) -> bool:
        """After a row's forward: next block, early stop, end, or ``max_nfe``. True when the row is finished."""
        o = r.outcome
        finished, block_done = o.eos_stop, o.block_done
        if not o.denoised:  # a block model's prefill or store forward (no policy step)
            r.nfe += 1
            block_done = r.phase is Phase.STORE  # the completed block is stored: the block ends now
            r.phase = Phase.DENOISE
        elif block_done and r.block_diffusion and r.cache != "none" and not finished and not r.folds:
            cap = r.settings.policy.iteration_cap()
            s, e = r.window
            left = bool((r.canvas[s:e] == r.settings.mask_id).any()) or (cap is not None and r.steps >= cap)
            if not (left and r.request.quirks.unstored_blocks):
                r.phase, block_done = Phase.STORE, False  # one more forward stores the block in the cache
        if block_done and not finished:
            nxt = r.next_block()
            if r.early_stop(r.origin + nxt * r.block_length) or nxt >= r.num_blocks:
                finished = True
            else:
                r.enter_block(nxt)
                r.fold = r.folds  # the finished block is stored by the next block's first forward
        if not finished and r.request.max_nfe is not None and r.nfe >= r.request.max_nfe:
            r.stopped_by_max_nfe = finished = True
        return finished

    def _finish(self, r: _Row, *, cancelled: bool = False, forwarded: bool = False) -> Update:
        """The row's last update; its place in the running set and its id in the live set are freed.

        ``forwarded``: it finished after a forward of this round (the update carries that forward's commits)."""
        if r in self._running:
            self._running.remove(r)
        with self._inbox.lock:
            self._inbox.live.discard(r.request.id)
        self.cancelled += cancelled
        try:
            res = r.result(cancelled=cancelled)
        except Exception as exc:  # the row cannot report itself: its request still ends, with the error
            r.fail(f"the engine failed: {_reason(exc)}")
            res = RowResult(r.request.id, [], [], r.nfe, [], [], cancelled=cancelled, error=r.error)
        self.failed += res.error is not None
        o = r.outcome
        block, pos, tok, rev = (o.block, o.positions, o.tokens, o.revised) if forwarded else (r.block_index, [], [], [])
        mask = r.settings.mask_id
        return Update(r.request.id, r.nfe, block, pos, tok, res.answer, res.decode_step, mask, True, res, rev)

    def _unstarted(self, p: _Pending, *, cancelled: bool = False, error: str | None = None) -> Update:
        """The last update of a request that never became a row (cancelled while waiting, or failed to start)."""
        with self._inbox.lock:
            self._inbox.live.discard(p.request.id)
        self.cancelled += cancelled
        self.failed += error is not None
        mask, G = p.settings.mask_id, p.settings.gen_length
        res = RowResult(p.request.id, list(p.prompt), [mask] * G, 0, [], [0] * G, cancelled=cancelled, error=error)
        return Update(p.request.id, 0, 0, [], [], res.answer, res.decode_step, mask, True, res)

    def run(self, requests: Sequence[Request]) -> list[RowResult]:
        """Submit ``requests``, step until every one is done, return their results in order.

        Raises ``RuntimeError`` when a request ended with an error (a policy that made no progress, a fault)."""
        ids = [self.submit(r) for r in requests]
        results: dict[Any, RowResult] = {}
        while len(results) < len(ids):
            for u in self.step():
                if u.done and u.result is not None:
                    if u.result.error is not None:
                        raise RuntimeError(u.result.error)
                    results[u.id] = u.result
        return [results[i] for i in ids]
