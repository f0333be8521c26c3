"""The text layer: prompts in, answers out, on top of the step-level engine.

``encode prompt -> engine Request -> incremental detokenisation -> answer + stats``, shared by every
caller that speaks text: ``fewstep serve``, ``fewstep generate``, the eval runner, the rollout
generator, the lm-eval adapter and ``eval/embedded.py`` (its six users)::

    gen = TextGenerator(model, tokenizer)
    outs = gen.generate(["3 + 4 - 2 ?"], GenerationSettings(policy="entropy:0.45", max_tokens=64, stop=["."]))
    outs[0].text, outs[0].finish_reason, outs[0].nfe, outs[0].tokens_per_forward, outs[0].latency_s

The streaming side (the server's) is :meth:`TextGenerator.start` (a background thread that owns the
engine and calls ``step()`` in a loop) plus :meth:`TextGenerator.submit`, whose ``on_event`` callback
receives :class:`Delta` (append-only final text), :class:`Canvas` (every step's canvas, for the live
page) and one :class:`Completion` at the end, from the engine thread.

What is *final* text: the committed prefix of the answer (positions ``0..k-1`` all unmasked), cut at
the first stop id, decoded, with any trailing incomplete UTF-8 (``U+FFFD``) and any suffix that could
still start a stop string held back. A stop id ends the text at once but the row runs on until the
engine ends it (``early_stop``: after the block holding the EOS), so its NFE is exactly what
:func:`fewstep.generate` reports for it. A stop string (which the engine does not know) finishes the
request at once and cancels its row, so its NFE counts the forwards until the string became final.
Validation is the engine's (:meth:`Engine.validate`, :mod:`fewstep.decoding.request`): the text layer
checks only its own fields (stop strings) and maps its field names to the engine's through one table
(:data:`ENGINE_FIELDS`: ``max_tokens`` is the engine's ``gen_length``); the server states the engine's
errors in the text layer's names, which are the OpenAI API's, through the same table
(``err.renamed(TEXT_NAMES)``).

Faults stay per request: a request whose engine row fails, or whose text cannot be produced, ends with
``finish_reason`` ``"error"`` and :attr:`Completion.error`; the others go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from fewstep.decoding import metrics
from fewstep.decoding.engine import Engine, Request, RequestError, RowResult, Update
from fewstep.decoding.policies import Policy, parse_policy
from fewstep.decoding.policies.base import OptionError

Prompt = str | Sequence[int] | Sequence[dict]  # text, token ids, or chat messages [{"role", "content"}]

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256

#: GenerationSettings fields that are engine Request fields, and the engine's name for each: the one table
#: between the text layer's (and the OpenAI API's) field names and the engine's
ENGINE_FIELDS = {
    "max_tokens": "gen_length",
    "block_length": "block_length",
    "cache": "cache",
    "seed": "seed",
    "early_stop": "early_stop",
    "eos_fill": "eos_fill",
    "stop_ids": "eos_ids",
    "cfg_scale": "cfg_scale",
    "max_nfe": "max_nfe",
}
#: the text layer's name of every engine field it sets
TEXT_NAMES = {engine: name for name, engine in ENGINE_FIELDS.items()}
#: GenerationSettings fields that set the policy option of the same name
POLICY_OPTIONS = ("temperature", "top_p", "threshold")


@dataclass
class GenerationSettings:
    """How to generate one text request (the text-level knobs; ``None`` keeps the policy's own value)."""

    policy: Policy | str = "threshold:0.9"
    max_tokens: int = 128  # the answer length (the diffusion canvas); the text is cut at a stop
    block_length: int | None = None  # None: 32, or max_tokens if smaller
    cache: str = "none"
    temperature: float | None = None
    top_p: float | None = None
    threshold: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_ids: Sequence[int] | None = None  # None: the model's EOS + the tokenizer's end-of-turn ids
    early_stop: bool = True
    eos_fill: bool = False  # d3LLM's end-of-text stop: everything after the first EOS at once, no forward
    max_nfe: int | None = None
    cfg_scale: float = 0.0
    # True: text prompts go through the chat template when the tokenizer has one; False: always raw;
    # None: text raw, chat messages through the template (when there is one)
    chat: bool | None = None
    prefix: str = ""  # text the answer starts with: appended to the (templated) prompt, not part of the answer
    special_tokens: bool = False  # raw text prompts get the tokenizer's special tokens (BOS): fewstep generate
    # True: a stop string finishes the request at once (its row is cancelled: fewer forwards, the server's
    # way); False: the row decodes on until the engine ends it and the text is cut at the end, so NFE is
    # what fewstep.generate reports (the eval's, rollout's and lm-eval's measured NFE)
    cancel_at_stop: bool = True
    # match stop strings in the text decoded with special tokens kept, then drop the specials (the
    # LLaDA/dParallel lm-eval harnesses' convention: an ``until`` string may be a special token)
    stop_in_raw: bool = False

    def replace(self, **changes: Any) -> GenerationSettings:
        return dataclasses.replace(self, **changes)


@dataclass
class Completion:
    """One request's answer and its stats."""

    text: str
    token_ids: list[int]  # the answer tokens the text was decoded from
    finish_reason: str  # "stop" (stop id or string), "length" (canvas or max_nfe used up), "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    nfe: int
    tokens_per_forward: float  # answer tokens before the first EOS / NFE (fewstep.decoding.metrics)
    positions_per_forward: float  # committed positions / NFE
    latency_s: float  # submit -> finished
    first_delta_s: float | None  # submit -> first non-empty final text
    stop: str | int | None = None  # the stop string or stop id that ended it
    error: str | None = None  # why the request failed (finish_reason "error")
    policy: str = ""
    id: Any = None
    row: RowResult | None = None  # the engine's result (None when the text layer finished it first)
    answer_tokens: int = 0  # answer tokens before the first stop id (what stop strings cut aside)
    tokens_per_step: list[int] = dataclasses.field(default_factory=list)  # committed at each of its forwards
    decode_step: list[int] = dataclasses.field(default_factory=list)  # per position: the NFE that committed it
    batch_seconds: float = 0.0  # generate(): wall time of the whole call (CUDA synchronised)
    batch_rows: int = 1  # generate(): prompts in that call
    revisions: int = 0  # revision events: a decoded answer token replaced by another (revising policies)
    revised: int = 0  # committed answer tokens whose final token differs from their first commit

    @property
    def committed(self) -> int:
        """Answer tokens committed by the forwards (EOS filled in by early stop not counted)."""
        return sum(self.tokens_per_step)

    def stats(self) -> dict[str, Any]:
        """The per-request speed record of ``fewstep eval`` and the lm-eval adapter: NFE, answer tokens
        before the first stop id, tokens and positions per forward, and the batch's time shared out over
        its rows."""
        return {
            "nfe": self.nfe,
            "gen_tokens": self.answer_tokens,
            "tokens_per_forward": self.tokens_per_forward,
            "positions_per_forward": self.positions_per_forward,
            "latency_s": self.batch_seconds / self.batch_rows,
            "batch_seconds": self.batch_seconds,
            "batch_rows": self.batch_rows,
            "revisions": self.revisions,
            "revised": self.revised,
            "revised_fraction": self.revised / self.committed if self.committed else 0.0,
        }


@dataclass
class Delta:
    """New final text of a request (append-only)."""

    id: Any
    text: str


@dataclass
class Canvas:
    """A request's canvas after one forward (``stream_mode: "denoise"``)."""

    id: Any
    nfe: int
    block: int
    tokens: list[int | None]  # None where masked
    pieces: list[str | None]  # each token's text (None where masked)
    steps: list[int]  # per position: the NFE at which it was first committed (0: still masked)
    committed: list[int]  # positions set at this forward (first commits and revisions)
    text: str  # the final text so far
    revised: list[int] = dataclasses.field(default_factory=list)  # positions among them that replaced a token


Event = Delta | Canvas | Completion


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _templated(tokenizer: Any, prompt: Any, chat: bool | None) -> bool:
    """Whether ``prompt`` goes through the chat template (see :attr:`GenerationSettings.chat`)."""
    return has_chat_template(tokenizer) and (bool(chat) if isinstance(prompt, str) else chat is not False)


def render(tokenizer: Any, prompt: str | Sequence[dict], chat: bool | None = None, prefix: str = "") -> str:
    """The text the model conditions on: a text prompt (raw, or as a user turn in the chat template with
    ``chat=True``) or chat messages (in the template unless ``chat=False``), then ``prefix``.

    Without a chat template (the embedded tiny models) messages' contents are joined by newlines.
    """
    if not isinstance(prompt, str):
        items = list(prompt)
        if not all(isinstance(m, dict) for m in items):
            raise ValueError("a prompt is a string, a list of token ids, or a list of chat messages")
        if not _templated(tokenizer, items, chat):
            return "\n".join(str(m.get("content", "")) for m in items) + prefix
        return tokenizer.apply_chat_template(items, tokenize=False, add_generation_prompt=True) + prefix
    if _templated(tokenizer, prompt, chat):
        return render(tokenizer, [{"role": "user", "content": prompt}], True, prefix)
    return prompt + prefix


def encode(
    tokenizer: Any, prompt: Prompt, chat: bool | None = None, *, prefix: str = "", special_tokens: bool = False
) -> list[int]:
    """Token ids of a prompt: text or chat messages (:func:`render`, then tokenised), or token ids as given.

    No special tokens are added (a chat template writes its own), as in ``fewstep eval``, unless
    ``special_tokens`` and the prompt is raw text (``fewstep generate``'s plain prompts get the BOS).
    ``prefix`` is appended to token ids as its own tokens, to text before tokenising.
    """
    items = prompt if isinstance(prompt, str) else list(prompt)
    if not isinstance(items, str) and all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return [int(t) for t in items] + (encode(tokenizer, prefix) if prefix else [])
    if tokenizer is None:
        raise RequestError("a text {prompt} needs a tokenizer (give token ids instead)", "prompt")
    add = special_tokens and not _templated(tokenizer, items, chat)
    text = render(tokenizer, items, chat, prefix)
    return [int(i) for i in tokenizer(text, add_special_tokens=add)["input_ids"]]


def resolve_policy(settings: GenerationSettings) -> Policy:
    """The policy with ``temperature``, ``top_p`` and ``threshold`` applied; :class:`RequestError` naming the
    setting at fault (``policy``, or the option it sets: the policy checks the option's range)."""
    try:
        policy = parse_policy(settings.policy)
    except ValueError as exc:
        raise RequestError("{detail}", "policy", detail=str(exc)) from None
    names = {f.name for f in dataclasses.fields(policy)} if dataclasses.is_dataclass(policy) else set()
    changes: dict[str, Any] = {}
    for key in POLICY_OPTIONS:
        value = getattr(settings, key)
        if value is None:
            continue
        if key not in names:
            if key == "top_p" and value == 1.0:
                continue  # the no-op value every client may send
            msg = "policy {name} has no {key} option (options: {options})"
            raise RequestError(msg, key, name=repr(policy.name), key=key, options=", ".join(sorted(names)))
        changes[key] = value
    try:
        return dataclasses.replace(policy, **changes) if changes else policy
    except OptionError as exc:
        raise RequestError("{detail}", exc.option if exc.option in changes else "policy", detail=str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise RequestError("{detail}", "policy", detail=str(exc)) from None


def check_stops(stop: Any) -> tuple[str, ...]:
    """The stop strings of a request (a string is one), empty strings dropped (they stop nothing);
    :class:`RequestError` beyond ``MAX_STOP_STRINGS`` strings or ``MAX_STOP_LENGTH`` characters."""
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise RequestError("{stop} must be a string or a list of strings", "stop")
    stops = tuple(s for s in stops if s)
    if len(stops) > MAX_STOP_STRINGS:
        msg = "{stop} holds at most {n} strings; got {k}"
        raise RequestError(msg, "stop", n=MAX_STOP_STRINGS, k=len(stops))
    if any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise RequestError("each {stop} string is at most {n} characters", "stop", n=MAX_STOP_LENGTH)
    return stops


def first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """``(index, stop)`` of the earliest stop string in ``text`` (empty strings stop nothing), or None."""
    hits = [(text.find(s), s) for s in stops if s and s in text]
    return min(hits) if hits else None


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    hit = first_stop(text, stops)
    return text if hit is None else text[: hit[0]]


def _holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Prepared(NamedTuple):
    """One request encoded and validated, ready for :meth:`TextGenerator.submit`."""

    ids: list[int]  # the prompt's token ids
    request: Request
    policy: Policy  # with the settings' option overrides applied
    eos: tuple[int, ...]  # the end-of-sequence ids the engine decodes it with
    settings: GenerationSettings  # as given, stop strings checked


class _Tracker:
    """Turns one request's engine updates into final text, events and its :class:`Completion`."""

    def __init__(self, gen: TextGenerator, rid: Any, prepared: Prepared, sink):
        settings = prepared.settings
        self.gen, self.id, self.prompt_len, self.settings = gen, rid, len(prepared.ids), settings
        self.policy, self.eos = _spec(prepared.policy), set(prepared.eos)
        stops = gen.default_stop_ids if settings.stop_ids is None else settings.stop_ids
        self.stop_ids, self.sink = set(stops), sink
        self.answer: list[int] = []  # the answer canvas after the last forward
        self.mask_id = gen.mask_id
        self.t0 = time.perf_counter()
        self.first_delta: float | None = None
        self.emitted = ""
        self.committed = 0  # length of the committed prefix of the answer (it only grows)
        self.steps = [0] * settings.max_tokens
        self.done = False
        self.nfe = 0
        self.per_step: list[int] = []
        self.before_stop = 0
        self.revisions = 0

    def feed(self, u: Update, canvas: bool) -> Completion | None:
        """Process one update; returns the Completion when the request is finished."""
        mask = self.mask_id = u.mask_id
        self.nfe = u.nfe
        if u.done and u.result is not None and u.result.error is not None:
            return self.fail(u.result.error, u.result)
        if u.positions or not u.done:
            self.per_step.append(len(u.positions) - len(u.revised))
        for p in u.positions:
            if 0 <= p < len(self.steps) and self.steps[p] == 0:
                self.steps[p] = u.nfe
        self.revisions += len(u.revised)
        answer = u.result.answer if (u.done and u.result is not None and u.result.answer) else u.answer
        self.answer = answer
        k = self.committed
        # a revising policy's open block may still change: its tokens are not final text yet
        settled = len(answer) if u.done or u.mutable_from is None else min(len(answer), u.mutable_from)
        while k < settled and answer[k] != mask:
            k += 1
        final = u.done or k == len(answer)
        if k == self.committed and not final and not canvas:
            return None  # nothing new is final: no detokenisation
        self.committed = k
        prefix = [int(t) for t in answer[:k]]
        text, ids, reason, stop, self.before_stop = self.gen._final_text(prefix, self.settings, self.stop_ids)
        if canvas and self.sink is not None and not (u.done and u.result is not None and u.result.cancelled):
            self.sink(self._canvas(u, answer, mask, text if reason else self._safe(text)))
        if reason is None and not final:
            self._emit(self._safe(text))
            return None
        if not u.done and (isinstance(stop, int) or not self.settings.cancel_at_stop):
            # the engine ends the row itself (early_stop, or the full length), so NFE is what it gets alone
            self._emit(text if reason else self._safe(text))
            return None
        if reason is None:
            reason = "cancelled" if (u.result is not None and u.result.cancelled) else "length"
        self._emit(text)
        return self._finish(text, ids, reason, stop, u.result if u.done else None)

    def _safe(self, text: str) -> str:
        text = text.rstrip("\ufffd")
        return text[: len(text) - _holdback(text, self.settings.stop)]

    def _emit(self, text: str) -> None:
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            piece, self.emitted = text[len(self.emitted) :], text
            if self.first_delta is None:
                self.first_delta = time.perf_counter() - self.t0
            if self.sink is not None:
                self.sink(Delta(self.id, piece))

    def _canvas(self, u: Update, answer: list[int], mask: int, text: str) -> Canvas:
        tokens = [None if t == mask else int(t) for t in answer]
        pieces = [None if t is None else self.gen.piece(t) for t in tokens]
        return Canvas(
            self.id, u.nfe, u.block, tokens, pieces, list(self.steps), list(u.positions), text, list(u.revised)
        )

    def fail(self, error: str, row: RowResult | None = None) -> Completion:
        """The request's Completion when it failed: finish_reason "error", the text final so far."""
        return self._finish(self.emitted, [], "error", None, row, error)

    def _finish(
        self, text: str, ids: list[int], reason: str, stop, row: RowResult | None, error: str | None = None
    ) -> Completion:
        self.done = True
        per_step = row.tokens_per_step if row is not None and row.tokens_per_step else self.per_step
        committed = sum(per_step) if per_step else sum(1 for s in self.steps if s)
        nfe = row.nfe if row is not None and not row.cancelled else self.nfe
        answer = row.answer if row is not None and row.answer else self.answer
        return Completion(
            text=text,
            token_ids=ids,
            finish_reason=reason,
            prompt_tokens=self.prompt_len,
            completion_tokens=len(ids),
            nfe=nfe,
            tokens_per_forward=metrics.tokens_per_forward(answer, self.eos, nfe, mask_id=self.mask_id),
            positions_per_forward=committed / nfe if nfe else 0.0,
            latency_s=time.perf_counter() - self.t0,
            first_delta_s=self.first_delta,
            stop=stop,
            error=error,
            policy=self.policy,
            id=self.id,
            row=row,
            answer_tokens=self.before_stop,
            tokens_per_step=list(per_step),
            decode_step=list(row.decode_step) if row is not None and row.decode_step else list(self.steps),
            revisions=row.revisions if row is not None else self.revisions,
            revised=row.revised if row is not None else 0,
        )


class TextGenerator:
    """Text prompts -> engine -> answers, synchronous (:meth:`generate`) or streaming (:meth:`start`/:meth:`submit`)."""

    def __init__(self, model: Any, tokenizer: Any, *, engine: Engine | None = None, max_batch: int = 32):
        from fewstep.decoding.pipeline import stop_ids

        self.model, self.tokenizer = model, tokenizer
        self.engine = engine or Engine(model, max_batch=max_batch, tokenizer=tokenizer)
        self.default_stop_ids = stop_ids(model, tokenizer)
        self.mask_id = int(model.config.mask_token_id)
        self.context = getattr(model.config, "max_sequence_length", None)
        self._lock = threading.Lock()
        self._live: dict[Any, tuple[_Tracker, bool]] = {}
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pieces: dict[int, str] = {}

    # ---- prompts and requests -------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat: bool | None = None, **options: Any) -> list[int]:
        """:func:`encode` with this generator's tokenizer (``options``: ``prefix``, ``special_tokens``)."""
        return encode(self.tokenizer, prompt, chat, **options)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (the ids themselves, space-separated, without a tokenizer)."""
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def piece(self, token: int) -> str:
        """The text of one token (for the canvas view)."""
        if token not in self._pieces:
            self._pieces[token] = self.decode([token], skip_special_tokens=False)
        return self._pieces[token]

    def request(self, prompt_ids: Sequence[int], settings: GenerationSettings) -> Prepared:
        """Build the engine Request and validate it with the engine's own checks (:meth:`Engine.validate`).

        A mistake raises :class:`RequestError` (a ValueError) in the engine's words (the words of the
        ``--gen-length`` flags of the commands); ``err.renamed(TEXT_NAMES)`` states it in the text layer's
        names, which are the API's (the server does)."""
        policy = resolve_policy(settings)
        settings = settings.replace(stop=check_stops(settings.stop))
        fields = {engine: getattr(settings, name) for name, engine in ENGINE_FIELDS.items()}
        eos = self.default_stop_ids if settings.stop_ids is None else settings.stop_ids
        fields["eos_ids"] = None if isinstance(eos, (list, tuple)) and not eos else eos  # none: the model's EOS
        req = Request(prompt=list(prompt_ids), policy=policy, **fields)
        try:
            resolved, _ = self.engine.validate(req)
        except RequestError as exc:  # an option these settings set is at fault: name that setting
            overridden = [k for k in POLICY_OPTIONS if getattr(settings, k) is not None]
            if exc.request_field == "policy" and exc.option in overridden:
                raise RequestError("{detail}", exc.option, option=exc.option, detail=str(exc)) from None
            raise
        return Prepared(list(prompt_ids), req, policy, resolved.eos, settings)

    def _final_text(self, prefix: list[int], settings: GenerationSettings, stop_ids: set):
        """(text, ids, finish reason or None, stop, tokens before the first stop id) of a committed prefix."""
        cut = next((i for i, t in enumerate(prefix) if t in stop_ids), None)
        ids = prefix if cut is None else prefix[:cut]
        before = len(ids)
        text = self.decode(ids, skip_special_tokens=not settings.stop_in_raw)
        hit = first_stop(text, settings.stop)
        if hit is not None:
            idx, s = hit
            text = self._drop_specials(text[:idx]) if settings.stop_in_raw else text[:idx]
            return text, self._ids_for(ids, len(text)), "stop", s, before
        if settings.stop_in_raw:
            text = self._drop_specials(text)
        if cut is not None:
            return text, ids, "stop", int(prefix[cut]), before
        return text, ids, None, None, before

    def _drop_specials(self, text: str) -> str:
        """``text`` without the special tokens written in it (re-tokenised; unchanged when there are none)."""
        specials = [t for t in getattr(self.tokenizer, "all_special_tokens", []) if t]
        if not any(t in text for t in specials):
            return text
        return self.decode(self.tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True)

    def _ids_for(self, ids: list[int], n_chars: int) -> list[int]:
        """The shortest prefix of ``ids`` whose text covers the first ``n_chars`` characters."""
        for k in range(len(ids) + 1):
            if len(self.decode(ids[:k])) >= n_chars:
                return ids[:k]
        return ids

    # ---- submitting ------------------------------------------------------------------------------------
    def prepare(self, prompt: Prompt, settings: GenerationSettings) -> Prepared:
        """Encode and validate one request without submitting it (:class:`RequestError` for a user mistake)."""
        ids = self.encode(prompt, settings.chat, prefix=settings.prefix, special_tokens=settings.special_tokens)
        return self.request(ids, settings)

    def submit(
        self,
        prompt: Prompt,
        settings: GenerationSettings,
        on_event: Callable[[Event], None] | None = None,
        *,
        canvas: bool = False,
        prepared: Prepared | None = None,
    ) -> Any:
        """Validate and enqueue one request; ``on_event`` gets its events (from the thread that steps).

        ``canvas=True`` also sends a :class:`Canvas` after every forward. Returns the request id (for
        :meth:`cancel`). Raises ValueError for a user mistake.
        """
        prepared = prepared or self.prepare(prompt, settings)
        with self._lock:
            rid = self.engine.submit(prepared.request)
            tracker = _Tracker(self, rid, prepared, on_event)
            self._live[rid] = (tracker, canvas)
            self._wake.notify_all()
        return rid

    def cancel(self, rid: Any) -> None:
        """Stop a request: its row is freed at the engine's next round; it ends with finish_reason "cancelled"."""
        self.engine.cancel(rid)
        with self._lock:
            self._wake.notify_all()

    def running(self) -> bool:
        """Whether the background thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def active(self) -> int:
        """Requests submitted and not yet finished."""
        with self._lock:
            return len(self._live)

    def step(self) -> list[Completion]:
        """One engine round; routes its updates to the requests' trackers; returns what finished."""
        done: list[Completion] = []
        for u in self.engine.step():
            with self._lock:
                entry = self._live.get(u.id)
            if entry is None:
                continue  # finished by the text layer already (the engine's cancel echo)
            tracker, canvas = entry
            try:
                comp = tracker.feed(u, canvas)
            except Exception as exc:  # this request's text cannot be made: it alone ends
                comp = tracker.fail(f"the text layer failed: {type(exc).__name__}: {exc}", u.result)
            if comp is None:
                continue
            with self._lock:
                self._live.pop(u.id, None)
            if not u.done:
                self.engine.cancel(u.id)  # the text is final; free the row
            if tracker.sink is not None:
                tracker.sink(comp)
            done.append(comp)
        return done

    # ---- synchronous API -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Prompt],
        settings: GenerationSettings | Sequence[GenerationSettings] | None = None,
        *,
        on_event: Callable[[Event], None] | None = None,
        canvas: bool = False,
        **changes: Any,
    ) -> list[Completion]:
        """Decode ``prompts`` (texts, id lists or message lists) and return their completions in order.

        ``settings``: one for all, or one per prompt (per-request stop strings, seeds, policies);
        ``changes`` override fields of every one. ``on_event`` sees every event (progress bars, traces
        with ``canvas=True``). Steps the engine in this thread, or waits for the background thread
        when :meth:`start` ran. Raises :class:`RequestError` (a ValueError) before anything runs if
        any prompt or setting is invalid, and RuntimeError when a request failed.
        """
        per = (
            list(settings) if isinstance(settings, (list, tuple)) else [settings or GenerationSettings()] * len(prompts)
        )
        if len(per) != len(prompts):
            raise ValueError(f"settings: one for all prompts or one per prompt ({len(prompts)}); got {len(per)}")
        per = [s.replace(**changes) if changes else s for s in per]
        prepared = [self.prepare(p, s) for p, s in zip(prompts, per)]  # every prompt is valid before any runs
        results: dict[Any, Completion] = {}
        finished = threading.Event()

        def sink(ev: Event) -> None:
            if on_event is not None:
                on_event(ev)
            if isinstance(ev, Completion):
                results[ev.id] = ev
                if len(results) == len(prepared):
                    finished.set()

        self._sync()
        t0 = time.perf_counter()
        ids = [self.submit(p, s, sink, canvas=canvas, prepared=pre) for p, s, pre in zip(prompts, per, prepared)]
        if not ids:
            return []
        if self._thread is not None:
            finished.wait()
        else:
            while len(results) < len(ids):
                if not self.step() and not self.engine.has_work() and len(results) < len(ids):
                    self._abandon(ids, results)
        self._sync()
        seconds = time.perf_counter() - t0
        failed = next((c for c in results.values() if c.finish_reason == "error"), None)
        if failed is not None:
            raise RuntimeError(f"request {failed.id} failed: {failed.error}")
        for c in results.values():
            c.batch_seconds, c.batch_rows = seconds, len(ids)
        return [results[i] for i in ids]

    def _sync(self) -> None:
        """Wait for the GPU (timings cover the work, not its launch)."""
        device = getattr(self.model, "device", None)
        if device is not None and str(device).startswith("cuda"):
            import torch

            torch.cuda.synchronize(device)

    def _abandon(self, ids: list[Any], results: dict) -> None:
        """The engine has no work but requests are unfinished (an engine that never reported them)."""
        missing = [i for i in ids if i not in results]
        with self._lock:
            for i in missing:
                self._live.pop(i, None)
        raise RuntimeError(f"the engine dropped requests {missing[:5]} without a final update")

    # ---- background thread (the server) ----------------------------------------------------------------
    def start(self) -> None:
        """Start the thread that owns the engine and steps it while there is work."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="fewstep-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the background thread (requests still live are abandoned; used at server shutdown)."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        """Step while the engine has work (rows the text layer already finished included, so a cancelled
        row is freed at the next round); otherwise sleep on the condition that submit/cancel/stop notify."""
        while True:
            with self._lock:
                while not self._stopping and not self.engine.has_work():
                    self._wake.wait(timeout=1.0)  # a safety net; submit, cancel and stop notify
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # a fault outside any one request: fail the live ones, keep serving
                self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        """Every live request ends with ``exc`` and a fresh engine takes over (the engine ends a fault of one
        request itself; this is the last resort for one it cannot attribute)."""
        with self._lock:
            live, self._live = list(self._live.values()), {}
            old = self.engine
            self.engine = Engine(
                self.model, max_batch=old.max_batch, tokenizer=old.tokenizer, max_padding=old.max_padding
            )
        for tracker, _ in live:
            if tracker.sink is not None:
                with contextlib.suppress(Exception):
                    tracker.sink(tracker.fail(f"the engine failed: {type(exc).__name__}: {exc}"))


def _spec(policy: Policy) -> str:
    """A short spec of a policy's non-default options, e.g. ``entropy:threshold=0.45``."""
    if not dataclasses.is_dataclass(policy):
        return policy.describe()
    defaults = type(policy)()
    opts = [
        f"{f.name}={getattr(policy, f.name)}"
        for f in dataclasses.fields(policy)
        if getattr(policy, f.name) != getattr(defaults, f.name)
    ]
    return policy.name + (":" + ",".join(opts) if opts else "")


__all__ = [
    "ENGINE_FIELDS",
    "MAX_STOP_LENGTH",
    "MAX_STOP_STRINGS",
    "TEXT_NAMES",
    "Canvas",
    "Completion",
    "Delta",
    "Event",
    "GenerationSettings",
    "Prepared",
    "Prompt",
    "RequestError",
    "TextGenerator",
    "check_stops",
    "cut_at_stop",
    "encode",
    "first_stop",
    "has_chat_template",
    "render",
    "resolve_policy",
]
