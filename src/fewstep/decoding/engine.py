"""The step-level, continuous-batching engine that ``fewstep.generate`` and the server share (issue 12).

Every request becomes a **row** that carries its own progress: prompt and answer length, block length,
current block and steps in it, policy and policy memory, random stream (a seeded row has its own
generator), KV cache and NFE. A round (:meth:`Engine.step`):

1. acts on the inbox: cancelled rows leave (one last ``Update``), waiting requests join the running set
   in FIFO order up to ``max_batch``;
2. rows entering a block get their policy memory (``start_block``, one call per policy group);
3. runs at most three batched model calls, one per kind of forward (:mod:`fewstep.decoding.forward`):
   full-canvas forwards (cache ``none``, and the first forward of a block with a cache), prefix-cached
   forwards and dual-cached forwards. Rows of every length, block and cache mode share these calls;
4. groups the rows by policy (same instance, or same spec string) and block geometry and makes one
   ``select`` call per group; commits, counts NFE, and asks the policy which rows are done;
5. a row whose block is done moves to its next block at once ("first done, first out"), stops at an EOS
   with ``early_stop``, finishes after its last block, or stops at ``max_nfe``.

Exactness: a row's forward sees exactly its own canvas at its own RoPE positions (pads are masked keys,
before its real columns or after its queries); its policy state, memory, step counter and random stream
are its own, so each request gets the tokens and NFE it gets alone, whatever shares the round.

Contract (callers rely on every name here):

* ``Request``: one prompt and how to decode it. Validation errors raise :class:`RequestError` (a
  ``ValueError`` whose ``field`` names the ``Request`` field at fault) from :meth:`Engine.submit`, at
  once, with a message fit for a user; :meth:`Engine.validate` runs the same checks without enqueuing.
* ``Engine(model, *, max_batch=32, tokenizer=None)``: ``submit(request) -> id`` and ``cancel(id)`` are
  thread-safe and cheap (they only enqueue; the engine acts on them at the start of its next round);
  ``step()`` runs one round and returns the :class:`Update` of every request that took part;
  ``has_work()`` is True from ``submit`` until the round that emits the request's last update (so a
  loop ``while has_work(): step()`` always sees every request finish); ``cancel`` of an id that is not pending or running (finished, unknown) does nothing
  and keeps nothing; ``run(requests)`` submits and steps
  until all are done and returns their :class:`RowResult` in order. Only one thread may call
  ``step``/``run``.
* A cancelled request emits one last ``Update`` with ``done=True`` and ``result.cancelled=True``.
* ``max_nfe``: a request that reached it stops; its answer keeps ``mask_id`` where nothing was
  committed and ``result.stopped_by_max_nfe`` is True.
* A row whose policy makes no progress within ``max_steps_per_block`` forwards, or whose policy raises,
  ends with ``result.error`` set (``run`` raises ``RuntimeError`` with it); the other rows go on.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fewstep.decoding.forward import BlockRun, Seqs, block_forward, dual_forward, full_forward, prefix_forward
from fewstep.decoding.policies import Policy, StepState, parse_policy
from fewstep.decoding.policies.base import RowRNG
from fewstep.models.block import attention_block

CACHE_MODES = ("none", "prefix", "dual")
# token strings that end a turn in the chat formats fewstep knows (looked up in the tokenizer's vocab)
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot|>")


def stop_ids(model, tokenizer=None) -> tuple[int, ...]:
    """End-of-sequence ids: the model config's ``eos_token_id`` (int or list), the tokenizer's EOS and
    every known end-of-turn token present in the tokenizer's vocabulary. Never hard-coded ids."""
    ids: list[int] = []
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    ids.extend(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if tokenizer is not None:
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.append(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        ids.extend(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return tuple(dict.fromkeys(int(i) for i in ids))


class RequestError(ValueError):
    """A bad request (a user mistake); ``field`` names the :class:`Request` field at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class Request:
    """One prompt and its decoding settings (the per-row arguments of :func:`fewstep.generate`)."""

    prompt: Sequence[int]
    policy: Policy | str = "threshold"
    gen_length: int = 128
    block_length: int | None = None
    cache: str = "none"
    seed: int | None = None
    early_stop: bool = False
    eos_ids: Sequence[int] | None = None
    cfg_scale: float = 0.0
    max_nfe: int | None = None
    id: Any = None  # assigned by Engine.submit when None
    mask_id: int | None = None  # default: the model's mask token
    quirk_cache_extra_nfe: bool = False  # see fewstep.generate
    quirk_mask_prediction: bool = False
    max_steps_per_block: int | None = None  # default 4 * block_length + 64
    eos_early_stop: bool = False  # stop mid-block once the answer up to its first EOS is decoded (LLaDA2)
    quirk_early_stop_scans_prompt: bool = False  # eos_early_stop also finds an EOS inside the prompt
    quirk_unstored_blocks: bool = False  # block models: a block left with masks is never stored (SDAR)


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
    error: str | None = None  # the policy made no progress (see max_steps_per_block)


@dataclass
class Update:
    """One request's progress at one forward (what a streaming client or the page needs)."""

    id: Any
    nfe: int  # this request's forwards so far
    block: int
    positions: list[int]  # answer-relative positions committed at this forward
    tokens: list[int]
    answer: list[int]  # the whole answer canvas after this forward (mask_id where masked)
    decode_step: list[int]
    mask_id: int
    done: bool = False
    result: RowResult | None = None  # set when done


@dataclass
class Settings:
    """A request's resolved decoding settings (validated; no prompt needed)."""

    policy: Policy
    gen_length: int
    block_length: int
    cache: str
    cfg_scale: float
    mask_id: int
    eos: tuple[int, ...]
    fill_id: int | None  # early stop's filler (None: no early stop)
    limit: int
    block_diffusion: bool = False  # the model is block-causal: blocks aligned to absolute positions


def default_block_length(model_block: int | None, gen_length: int, block_length: int | None = None) -> int:
    """The decoding block for ``block_length`` (None: the default). A block-diffusion model decodes in the
    blocks of its attention (``model_block``, :func:`fewstep.models.block.attention_block`; any given length,
    never cut to the answer); a full-attention model in blocks of 32, never longer than the answer."""
    if model_block:
        return model_block if block_length is None else block_length
    return min(32 if block_length is None else block_length, gen_length)


def resolve_settings(model, req: Request, tokenizer=None, policy: Policy | None = None) -> Settings:
    """Validate ``req``'s settings against ``model``; ValueError with a message fit for a user."""
    cfg = model.config
    try:
        policy = parse_policy(req.policy) if policy is None else policy
    except ValueError as exc:
        raise RequestError(str(exc), "policy") from None
    if req.cache not in CACHE_MODES:
        raise RequestError(f"cache must be one of {', '.join(CACHE_MODES)}; got {req.cache!r}")
    vocab = int(cfg.vocab_size)
    mask_id = int(cfg.mask_token_id if req.mask_id is None else req.mask_id)
    if not 0 <= mask_id < vocab:
        raise RequestError(f"mask_id must be in [0, {vocab - 1}] (the vocabulary); got {mask_id}", "mask_id")
    G = req.gen_length
    if not isinstance(G, int) or isinstance(G, bool) or G < 1:
        raise RequestError(f"gen_length must be an integer >= 1; got {G!r}", "gen_length")
    bd = bool(getattr(model, "block_diffusion", False))
    L = default_block_length(attention_block(model), G) if req.block_length is None else req.block_length
    L = policy.blocks(G, L)
    if bd:  # blocks of the model's attention, aligned to absolute positions: any length >= 1
        if not isinstance(L, int) or isinstance(L, bool) or L < 1:
            raise RequestError(f"block_length must be an integer >= 1; got {L!r}", "block_length")
    elif not isinstance(L, int) or not 1 <= L <= G:
        raise RequestError(f"block_length must be in [1, gen_length={G}]; got {L!r}", "block_length")
    elif G % L:
        msg = f"gen_length ({G}) must be a multiple of block_length ({L}); valid block lengths divide {G}"
        raise RequestError(msg, "block_length")
    if req.cfg_scale < 0:
        raise RequestError(f"cfg_scale must be >= 0; got {req.cfg_scale}", "cfg_scale")
    if req.max_nfe is not None and (
        not isinstance(req.max_nfe, int) or isinstance(req.max_nfe, bool) or req.max_nfe < 1
    ):
        raise RequestError(f"max_nfe must be an integer >= 1 or None; got {req.max_nfe!r}", "max_nfe")
    try:
        policy.validate(-(-G // L) * L if bd else G, L)
    except ValueError as exc:
        raise RequestError(str(exc), "policy") from None
    eos = tuple(int(i) for i in req.eos_ids) if req.eos_ids is not None else stop_ids(model, tokenizer)
    fill_id = eos[0] if eos else None
    if (req.early_stop or req.eos_early_stop) and fill_id is None:
        msg = "early_stop and eos_early_stop need eos_ids (the model config has no eos_token_id)"
        raise RequestError(msg, "eos_ids")
    limit = req.max_steps_per_block or 4 * L + 64
    fill = fill_id if req.early_stop else None
    return Settings(policy, G, L, req.cache, float(req.cfg_scale), mask_id, eos, fill, limit, bd)


def check_prompt(model, prompt: Sequence[int], gen_length: int) -> list[int]:
    """The prompt as a list of ints; :class:`RequestError` if it is empty, out of the vocabulary or too
    long (``field`` "prompt", or "gen_length" when the prompt alone fits the context)."""
    ids = [int(t) for t in prompt]
    vocab = int(model.config.vocab_size)
    if not ids:
        raise RequestError("the prompt must hold at least one token", "prompt")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"input_ids must be token ids in [0, {vocab - 1}] (the vocabulary); got {bad[:5]}", "prompt")
    n, max_len = len(ids) + gen_length, getattr(model.config, "max_sequence_length", None)
    if max_len is not None and len(ids) >= max_len:
        raise RequestError(
            f"the prompt has {len(ids)} tokens; the model's context (max_sequence_length) is {max_len} tokens",
            "prompt",
        )
    if max_len is not None and max_len < n:
        raise RequestError(
            f"prompt length ({len(ids)}) + gen_length ({gen_length}) = {n} exceeds the model's context "
            f"(max_sequence_length {max_len}); valid gen_length: <= {max_len - len(ids)}",
            "gen_length",
        )
    return ids


class _Row:
    """One running request: its canvas and every counter of its own progress."""

    def __init__(self, req: Request, st: Settings, prompt: list[int], device: torch.device, order: int):
        self.req, self.st, self.order = req, st, order
        self.P, self.G, self.L = len(prompt), st.gen_length, st.block_length
        self.bd = st.block_diffusion
        if self.bd:  # blocks counted from the row's first token; decoding starts at the prompt tail's block
            self.origin, self.b0, self.num_blocks = 0, self.P // self.L, -(-(self.P + self.G) // self.L)
        else:
            self.origin, self.b0, self.num_blocks = self.P, 0, self.G // self.L
        n = self.origin + self.num_blocks * self.L
        self.x = torch.tensor(prompt + [st.mask_id] * (n - self.P), dtype=torch.long, device=device)
        self.gen = None if req.seed is None else torch.Generator(device=device).manual_seed(int(req.seed))
        self.suppress_mask = not req.quirk_mask_prediction
        self.cache = "prefix" if self.bd and st.cache == "dual" else st.cache  # dual == prefix when block-causal
        self.quirk_extra_nfe = req.quirk_cache_extra_nfe and st.cache != "none" and not self.bd
        self.nfe, self.tokens_per_step = 0, []
        self.decode_step = torch.zeros(self.G, dtype=torch.long, device=device)
        self.b, self.steps, self.memory, self.kv = self.b0, 0, None, None
        # block models with a cache: "prefill" (complete prompt blocks), "denoise", "store" (a completed block)
        self.phase = "prefill" if self.bd and self.cache != "none" and self.b0 > 0 else "denoise"
        self.finished_early = self.stopped_by_max_nfe = self.stop_now = False
        self.error: str | None = None

    @property
    def s(self) -> int:
        return self.origin + self.b * self.L

    @property
    def e(self) -> int:
        return self.s + self.L

    def seqs(self) -> Seqs:
        """The sequences this row runs: its canvas, and with CFG the copy with the prompt masked."""
        x = self.x[None]
        if self.st.cfg_scale > 0:
            un = x.clone()
            un[:, : self.P] = self.st.mask_id
            x = torch.cat([x, un])
        return Seqs(x, self.kv, self.s, self.e)

    def block_run(self) -> BlockRun:
        """This row's part of a block-diffusion call: its phase's columns, cache and wanted logits."""
        x = self.seqs().x
        if self.phase == "prefill":
            return BlockRun(x[:, : self.s], None, 0, self.L, None, True)
        if self.cache == "none":  # no cache: the canvas up to the block (later blocks are never attended)
            return BlockRun(x[:, : self.e], None, 0, self.L, (self.s, self.e), False)
        store = self.phase == "store"
        return BlockRun(x[:, self.s : self.e], self.kv, self.s, self.L, None if store else (0, self.L), store)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The block logits ``[L, V]`` from this row's ``[n_seq, L, V]`` slice (CFG combined; a view without)."""
        if self.st.cfg_scale > 0:
            return z[1] + (self.st.cfg_scale + 1) * (z[0] - z[1])
        return z[0]

    def result(self, cancelled: bool = False) -> RowResult:
        return RowResult(
            id=self.req.id,
            prompt=self.x[: self.P].tolist(),
            answer=self.answer(),
            nfe=self.nfe,
            tokens_per_step=list(self.tokens_per_step),
            decode_step=self.decode_step.tolist(),
            finished_early=self.finished_early,
            cancelled=cancelled,
            stopped_by_max_nfe=self.stopped_by_max_nfe,
            error=self.error,
        )

    def answer(self) -> list[int]:
        return self.x[self.P : self.P + self.G].tolist()

    def early_stop(self) -> bool:
        """With early stop: if the answer so far holds an EOS, fill everything after it with EOS."""
        if self.st.fill_id is None:
            return False
        hit = torch.isin(self.x[self.P : min(self.e, self.P + self.G)], torch.tensor(self.st.eos, device=self.x.device))
        if not bool(hit.any()):
            return False
        self._stop_at(self.P + int(hit.nonzero()[0]))
        return True

    def _stop_at(self, first: int) -> None:
        """Stop at the EOS at canvas column ``first``: the answer after it is EOS, never committed."""
        cut = max(first + 1, self.P)
        self.x[cut:] = self.st.eos[0]
        self.decode_step[cut - self.P :] = 0
        self.finished_early = True

    def eos_stop(self, committed_eos: bool) -> bool:
        """``eos_early_stop`` (LLaDA2's): after a step that committed an EOS, stop now if every answer
        position before the first EOS of the canvas so far is decoded (from 0 with the prompt quirk)."""
        if not (self.req.eos_early_stop and committed_eos):
            return False
        lo = 0 if self.req.quirk_early_stop_scans_prompt else self.P
        hit = torch.isin(self.x[lo : self.e], torch.tensor(self.st.eos, device=self.x.device))
        if not bool(hit.any()):
            return False
        first = lo + int(hit.nonzero()[0])
        if bool((self.x[self.P : first] == self.st.mask_id).any()):
            return False
        self._stop_at(first)
        return True


class _GroupRNG(RowRNG):
    """The random streams of one policy group: row ``j`` draws from its own generator (or the global
    RNG when unseeded); with no seeded row, one draw for the group (torch's global stream, as before)."""

    def __init__(self, rows: list[_Row], device: torch.device):
        gens = [r.gen for r in rows]
        self.generators = None if all(g is None for g in gens) else gens
        self.device = device


def _group_key(r: _Row) -> tuple:
    """Rows that can share one ``select`` call: same policy, block length, mask/EOS ids, and (for rules
    that read the batch-wide block scalars of ``StepState``) the same block and answer length."""
    st = r.st
    key = (id(st.policy), r.L, st.mask_id, st.eos, r.suppress_mask)
    return key + ((r.b - r.b0, r.num_blocks - r.b0, r.G) if st.policy.uses_block_scalars else ())


def _state(rows: list[_Row], device: torch.device, memory: dict | None = None) -> StepState:
    """The policy's view of ``rows`` (one group: same policy and block geometry)."""
    r0 = rows[0]
    if not r0.bd and len({(r.G, r.b) for r in rows}) == 1:
        gen = torch.stack([r.x[r.P :] for r in rows])
        lo = r0.s - r0.P
        tokens, gen_masked = gen[:, lo : lo + r0.L], (gen == r0.st.mask_id).sum(-1)
    else:  # rows at different blocks / answer lengths, or block models (blocks from absolute positions)
        tokens = torch.stack([r.x[r.s : r.e] for r in rows])
        gen_masked = torch.stack([(r.x[r.P : r.P + r.G] == r.st.mask_id).sum() for r in rows])
    if memory is None:
        memory = {k: torch.cat([r.memory[k] for r in rows]) for k in (r0.memory or {})}
    return StepState(
        tokens=tokens,
        mask=tokens == r0.st.mask_id,
        step=torch.tensor([r.steps for r in rows], dtype=torch.long, device=device),
        rows=torch.arange(len(rows), device=device),
        block=r0.b - r0.b0,
        num_blocks=r0.num_blocks - r0.b0,
        block_length=r0.L,
        gen_length=r0.G,
        gen_masked=gen_masked,
        mask_id=r0.st.mask_id,
        eos_ids=r0.st.eos,
        rng=_GroupRNG(rows, device),
        memory=memory,
    )


def _groups(rows: list[_Row]) -> list[list[_Row]]:
    out: dict[tuple, list[_Row]] = {}
    for r in rows:
        out.setdefault(_group_key(r), []).append(r)
    return list(out.values())


@dataclass
class _Inbox:
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: deque = field(default_factory=deque)
    cancelled: set = field(default_factory=set)  # ids to cancel at the next round (cleared every round)
    live: set = field(default_factory=set)  # ids submitted whose last update has not been emitted


class Engine:
    """Decodes requests that arrive at any time, in continuously batched rounds (see the module docstring)."""

    def __init__(self, model, *, max_batch: int = 32, tokenizer=None, max_padding: float = 0.25):
        """``max_padding``: the share of padded columns one batched call may run before the engine splits
        a kind of forward into calls of similar lengths (rows sorted by the columns they run). Padding
        costs compute in proportion on a CPU and little on a GPU; ``float("inf")``: always one call per
        kind of forward per round."""
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1; got {max_batch!r}")
        if not max_padding >= 0:
            raise ValueError(f"max_padding must be >= 0; got {max_padding!r}")
        self.model, self.max_batch, self.tokenizer, self.max_padding = model, max_batch, tokenizer, max_padding
        self.device = model.device
        cfg = model.config
        eos = stop_ids(model, tokenizer)
        self.pad_id = int(
            cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else (eos[0] if eos else 0)
        )
        self._inbox = _Inbox()
        self._ids = itertools.count()
        self._order = itertools.count()
        self._policies: dict[str, Policy] = {}
        self._running: list[_Row] = []
        self.forward_calls = 0  # batched model calls so far (at most one per kind of forward per round)
        self.rounds = 0  # rounds that ran forwards
        self.cancelled = 0  # requests cancelled so far (before or while running)

    def _policy(self, spec: Policy | str) -> Policy:
        """One instance per spec string, so requests with the same spec share ``select`` calls."""
        if isinstance(spec, Policy):
            return spec
        key = spec.strip() if isinstance(spec, str) else spec
        if key not in self._policies:
            self._policies[key] = parse_policy(spec)
        return self._policies[key]

    def validate(self, request: Request) -> tuple[Settings, list[int]]:
        """The checks of :meth:`submit` without enqueuing: the resolved settings and the prompt as ints.

        Raises :class:`RequestError` (``field``: the request field at fault) for a user mistake."""
        try:
            policy = self._policy(request.policy)
        except ValueError as exc:
            raise RequestError(str(exc), "policy") from None
        g = request.gen_length
        g = g if isinstance(g, int) and not isinstance(g, bool) and g > 0 else 0  # a bad one: resolve_settings says so
        prompt = check_prompt(self.model, request.prompt, g)  # the context first: an answer too long is the mistake
        return resolve_settings(self.model, request, self.tokenizer, policy), prompt

    def submit(self, request: Request) -> Any:
        """Validate and enqueue ``request``; returns its id. Raises :class:`RequestError` (a ValueError)
        for bad settings, or for an explicit ``id`` that is already pending or running."""
        st, prompt = self.validate(request)
        with self._inbox.lock:
            if request.id is None:
                request.id = next(self._ids)
            elif request.id in self._inbox.live:
                raise RequestError(f"request id {request.id!r} is already pending or running", "id")
            self._inbox.live.add(request.id)
            self._inbox.pending.append((request, st, prompt))
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
        self._start_blocks([r for r in rows if r.memory is None])
        for r in rows:
            if r.steps >= r.st.limit:
                r.error = (
                    f"policy {r.st.policy.describe()} made no progress on block {r.b} within {r.st.limit} "
                    "forwards (raise max_steps_per_block if this is intended)"
                )
        failed = [r for r in rows if r.error is not None]
        rows = [r for r in rows if r.error is None]
        self.rounds += bool(rows)
        logits = self._forward(rows) if rows else {}
        done: set[int] = set()
        commits: dict[int, tuple[list[int], list[int]]] = {}
        for group in _groups([r for r in rows if id(r) in logits]):
            try:
                self._select(group, logits, commits, done)
            except Exception as exc:  # a policy that fails ends its own rows, not the engine
                for r in group:
                    r.error = f"policy {r.st.policy.describe()} failed: {type(exc).__name__}: {exc}"
                failed += group
        for r in failed:
            updates.append(self._finish(r, None))
        for r in rows:
            if r.error is None:
                commit = commits.get(id(r), ([], []))
                updates.append(self._advance(r, commit, id(r) in done, id(r) not in logits))
        return updates

    def _admit(self) -> list[Update]:
        """Cancellations and FIFO admission (up to ``max_batch`` running rows)."""
        updates = []
        with self._inbox.lock:
            cancelled, self._inbox.cancelled = self._inbox.cancelled, set()
            keep = deque()
            for req, st, prompt in self._inbox.pending:
                if req.id in cancelled:
                    row = _Row(req, st, prompt, self.device, -1)
                    updates.append(self._final(row, cancelled=True))
                    self._inbox.live.discard(req.id)
                else:
                    keep.append((req, st, prompt))
            self._inbox.pending = keep
            for row in [r for r in self._running if r.req.id in cancelled]:
                self._running.remove(row)
                updates.append(self._final(row, cancelled=True))
                self._inbox.live.discard(row.req.id)
            while self._inbox.pending and len(self._running) < self.max_batch:
                req, st, prompt = self._inbox.pending.popleft()
                self._running.append(_Row(req, st, prompt, self.device, next(self._order)))
        return updates

    def _start_blocks(self, rows: list[_Row]) -> None:
        """Policy memory for rows entering a block (one ``start_block`` call per group)."""
        for group in _groups(rows):
            state = _state(group, self.device, memory={})
            mem = group[0].st.policy.start_block(state)
            for i, r in enumerate(group):
                r.memory = {k: v[i : i + 1] for k, v in mem.items()}

    def _forward(self, rows: list[_Row]) -> dict[int, torch.Tensor]:
        """Block logits ``[L, V]`` per row (keyed by ``id(row)``): at most one model call per kind."""
        kinds: dict[str, list[_Row]] = {"full": [], "prefix": [], "dual": [], "block": []}
        for r in rows:
            kinds["block" if r.bd else "full" if r.st.cache == "none" or r.steps == 0 else r.st.cache].append(r)
        out: dict[int, torch.Tensor] = {}
        for kind, group in ((k, g) for k, rs in kinds.items() for g in self._calls(k, rs)):
            seqs = [r.seqs() for r in group]
            self.forward_calls += 1
            if kind == "block":
                zs, caches = block_forward(self.model, [r.block_run() for r in group], self.pad_id)
                for r, z, kv in zip(group, zs, caches):
                    if kv is not None:
                        r.kv = kv
                    if z is not None:
                        out[id(r)] = r.logits(z)
                continue
            if kind == "full":
                want = any(r.st.cache != "none" for r in group)
                zs, caches = full_forward(self.model, seqs, self.pad_id, want)
                for r, kv in zip(group, caches):
                    if r.st.cache != "none":
                        r.kv = kv
            elif kind == "prefix":
                zs = prefix_forward(self.model, seqs, self.pad_id)
            else:
                zs = dual_forward(self.model, seqs, self.pad_id)
            for r, z in zip(group, zs):
                out[id(r)] = r.logits(z)
        return out

    def _calls(self, kind: str, rows: list[_Row]) -> list[list[_Row]]:
        """Split one kind's rows into calls whose padded columns stay within ``max_padding`` (by length)."""
        if not rows:
            return []
        sh = self.model.logit_shift

        def cols(r: _Row) -> int:  # the columns this row runs through the network (block: and attends to)
            if kind == "block":
                run = r.block_run()
                return run.x.shape[1] + (0 if run.kv is None else run.kv.length)
            return len(r.x) if kind == "full" else (len(r.x) - r.s + sh if kind == "prefix" else r.L + sh)

        calls: list[list[_Row]] = []
        real = 0
        for r in sorted(rows, key=lambda r: (cols(r), len(r.x), r.order)):
            c = cols(r)
            if calls and (len(calls[-1]) + 1) * c <= (1 + self.max_padding) * (real + c):
                calls[-1].append(r)
                real += c
            else:
                calls.append([r])
                real = c
        return calls

    def _select(self, group: list[_Row], logits: dict, commits: dict, done: set) -> None:
        """One policy call for ``group``: commit, count, and record which rows are done with the block."""
        r0, policy = group[0], group[0].st.policy
        state = _state(group, self.device)
        z = torch.stack([logits[id(r)] for r in group])
        if r0.suppress_mask:
            z[..., r0.st.mask_id] = torch.finfo(z.dtype).min
        sel = policy.select(z, state)
        # block models write wherever the policy commits (SDAR's uncapped top-k overwrites decoded and
        # prompt tokens); full-attention rows only at masks. Counters count the masks committed.
        write = sel.commit if r0.bd else sel.commit & state.mask
        fresh = write & state.mask
        new = torch.where(write, sel.tokens, state.tokens)
        committed_eos = [False] * len(group)
        if r0.st.eos and any(r.req.eos_early_stop for r in group):
            committed_eos = (torch.isin(new, torch.tensor(r0.st.eos, device=self.device)) & write).any(-1).tolist()
        flags, new_l, fresh_n = write.tolist(), new.tolist(), fresh.sum(-1).tolist()
        for i, r in enumerate(group):
            r.x[r.s : r.e] = new[i]
            lo = r.s - r.P  # answer-relative start of the window (negative: the prompt tail's block)
            a, b = max(0, -lo), min(r.L, r.G - lo)
            if a < b:
                ds = r.decode_step[lo + a : lo + b]
                r.decode_step[lo + a : lo + b] = torch.where(fresh[i, a:b], r.nfe + 1, ds)
            r.nfe += 1
            r.steps += 1
            for k, v in (sel.memory or {}).items():
                r.memory[k] = v[i : i + 1]
            pos = [j for j in range(a, b) if flags[i][j]]
            r.tokens_per_step.append(fresh_n[i])
            commits[id(r)] = ([lo + j for j in pos], [new_l[i][j] for j in pos])
            r.stop_now = r.eos_stop(committed_eos[i])
        finished = policy.block_done(_state(group, self.device))
        for r, f in zip(group, finished.tolist()):
            if f and not (r.quirk_extra_nfe and r.steps < 2):
                done.add(id(r))

    def _advance(self, r: _Row, commit: tuple[list[int], list[int]], block_done: bool, cache_call: bool) -> Update:
        """After a row's forward: next block, early stop, end, or ``max_nfe``; its update.

        ``cache_call``: the forward was a block model's prefill or store forward (no policy step)."""
        block, (pos, toks) = r.b - r.b0, commit
        finished = r.stop_now
        if cache_call:
            r.nfe += 1
            if r.phase == "prefill":
                r.phase = "denoise"
            else:  # the completed block is stored: the block ends now
                r.phase, block_done = "denoise", True
        elif block_done and r.bd and r.cache != "none" and not finished:
            cap = r.st.policy.iteration_cap()
            left = bool((r.x[r.s : r.e] == r.st.mask_id).any()) or (cap is not None and r.steps >= cap)
            if not (left and r.req.quirk_unstored_blocks):
                r.phase, block_done = "store", False  # one more forward stores the block in the cache
        if block_done and not finished:
            if r.early_stop() or r.b + 1 == r.num_blocks:
                finished = True
            else:
                r.b, r.steps, r.memory = r.b + 1, 0, None
                if not r.bd:
                    r.kv = None
        if not finished and r.req.max_nfe is not None and r.nfe >= r.req.max_nfe:
            r.stopped_by_max_nfe = finished = True
        if finished:
            return self._finish(r, (block, pos, toks))
        return Update(r.req.id, r.nfe, block, pos, toks, r.answer(), r.decode_step.tolist(), r.st.mask_id)

    def _finish(self, r: _Row, step: tuple | None) -> Update:
        self._running.remove(r)
        with self._inbox.lock:
            self._inbox.live.discard(r.req.id)
        up = self._final(r)
        if step is not None:
            up.block, up.positions, up.tokens = step
        return up

    def _final(self, r: _Row, cancelled: bool = False) -> Update:
        res = r.result(cancelled=cancelled)
        self.cancelled += cancelled
        return Update(r.req.id, r.nfe, r.b - r.b0, [], [], res.answer, res.decode_step, r.st.mask_id, True, res)

    def run(self, requests: Sequence[Request]) -> list[RowResult]:
        """Submit ``requests``, step until every one is done, return their results in order.

        Raises ``RuntimeError`` when a request ended with an error (a policy that made no progress)."""
        ids = [self.submit(r) for r in requests]
        results: dict[Any, RowResult] = {}
        while len(results) < len(ids):
            for u in self.step():
                if u.done and u.result is not None:
                    if u.result.error is not None:
                        raise RuntimeError(u.result.error)
                    results[u.id] = u.result
        return [results[i] for i in ids]
