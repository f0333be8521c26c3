"""The step-level engine: the interface that ``fewstep.generate`` and the server share (issue 12).

This file fixes the **contract**. The implementation below is the simplest correct one: each
:meth:`Engine.step` decodes the oldest pending request alone, through :func:`fewstep.generate`, and
returns all of its per-forward updates at once. It is exact by construction (every request is decoded
alone) but it does not batch; the continuous-batching engine replaces the body, not the interface.

Contract (callers rely on every name here):

* ``Request``: one prompt and how to decode it. Validation errors raise ``ValueError`` from
  :meth:`Engine.submit`, at once, with a message fit for a user.
* ``Engine(model, *, max_batch=32, tokenizer=None)``: ``submit(request) -> id`` and ``cancel(id)`` are
  thread-safe and cheap (they only enqueue; the engine acts on them at the start of its next round);
  ``step()`` runs one round (one batched forward over the running rows) and returns the
  :class:`Update` of every request that took part; ``has_work()`` says whether any request is pending
  or running; ``run(requests)`` submits and steps until all are done and returns their
  :class:`RowResult` in order. Only one thread may call ``step``/``run``.
* A cancelled request emits one last ``Update`` with ``done=True`` and ``result.cancelled=True``.
* ``max_nfe``: a request that reached it stops; its answer keeps ``mask_id`` where nothing was
  committed and ``result.stopped_by_max_nfe`` is True.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fewstep.decoding.policies import Policy


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
class _Inbox:
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: deque = field(default_factory=deque)
    cancelled: set = field(default_factory=set)


class Engine:
    """Decodes requests that arrive at any time; see the module docstring for the contract."""

    def __init__(self, model, *, max_batch: int = 32, tokenizer=None):
        self.model, self.max_batch, self.tokenizer = model, max_batch, tokenizer
        self._inbox = _Inbox()
        self._ids = itertools.count()

    def submit(self, request: Request) -> Any:
        """Validate and enqueue ``request``; returns its id. Raises ValueError for bad settings."""
        from fewstep.decoding.policies import parse_policy

        parse_policy(request.policy)  # fail fast on a bad spec
        if request.id is None:
            request.id = next(self._ids)
        with self._inbox.lock:
            self._inbox.pending.append(request)
        return request.id

    def cancel(self, request_id: Any) -> None:
        """Cancel a pending or running request (acted on at the start of the next round)."""
        with self._inbox.lock:
            self._inbox.cancelled.add(request_id)

    def has_work(self) -> bool:
        with self._inbox.lock:
            return bool(self._inbox.pending)

    def step(self) -> list[Update]:
        """Decode the oldest pending request alone (placeholder for one batched round)."""
        with self._inbox.lock:
            if not self._inbox.pending:
                return []
            req = self._inbox.pending.popleft()
            cancelled = req.id in self._inbox.cancelled
            self._inbox.cancelled.discard(req.id)
        if cancelled:
            res = RowResult(req.id, list(req.prompt), [], 0, [], [], cancelled=True)
            return [Update(req.id, 0, 0, [], [], [], [], self.model.config.mask_token_id, True, res)]
        return self._decode_alone(req)

    def _decode_alone(self, req: Request) -> list[Update]:
        from fewstep.decoding.pipeline import generate

        mask_id = int(self.model.config.mask_token_id)
        updates: list[Update] = []

        def on_step(ev) -> None:
            ans = ev.canvas[0, ev.prompt_length :].tolist()
            updates.append(Update(req.id, int(ev.nfe[0]), ev.block, ev.positions[0], ev.tokens[0], ans, [], mask_id))

        out = generate(
            self.model,
            [list(req.prompt)],
            req.policy,
            gen_length=req.gen_length,
            block_length=req.block_length,
            cache=req.cache,
            seed=None if req.seed is None else [req.seed],
            early_stop=req.early_stop,
            eos_ids=req.eos_ids,
            tokenizer=self.tokenizer,
            cfg_scale=req.cfg_scale,
            callback=on_step,
        )
        res = RowResult(
            id=req.id,
            prompt=list(req.prompt),
            answer=out.answers[0].tolist(),
            nfe=int(out.nfe[0]),
            tokens_per_step=out.tokens_per_step[0],
            decode_step=out.decode_step[0].tolist(),
            finished_early=bool(out.finished_early[0]) if out.finished_early is not None else False,
        )
        for u in updates:
            u.decode_step = res.decode_step
        if updates:
            updates[-1].done, updates[-1].result = True, res
        return updates

    def run(self, requests: Sequence[Request]) -> list[RowResult]:
        """Submit ``requests``, step until every one is done, return their results in order."""
        ids = [self.submit(r) for r in requests]
        results: dict[Any, RowResult] = {}
        while len(results) < len(ids):
            for u in self.step():
                if u.done and u.result is not None:
                    results[u.id] = u.result
        return [results[i] for i in ids]
