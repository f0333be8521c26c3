"""The policy interface and the scoring helpers every unmasking rule shares.

A policy decides, at each denoising step, which still-masked positions of the current block to
commit and with which tokens. It never calls the model: the generation loop
(:mod:`fewstep.decoding.engine`) hands it the logits of the block and a :class:`StepState`, and
gets back a :class:`Selection`. Everything is batched: ``R`` rows (the rows still working on the
block; finished rows are not in the batch), ``L`` block positions, ``V`` vocabulary entries.

Hooks, all with defaults:

* :meth:`Policy.validate` checks the policy's own arguments against ``gen_length``/``block_length``;
* :meth:`Policy.blocks` may replace the block length (CD4LM's global mode decodes one block);
* :meth:`Policy.start_block` sets up per-row memory for a block (for example the per-step quota);
* :meth:`Policy.select` is the rule itself (pure; new memory values are returned, not written);
* :meth:`Policy.block_done` says which rows are done with the block (default: no mask left).

Capabilities (class flags the engine reads; all off by default, so a rule that sets none of them gets
the plain loop):

* ``revises``: the window stays mutable until the block closes: ``commit`` may overwrite decoded tokens
  of the block (the engine writes them, counts each replacement as a revision and marks it in the trace);
* ``uses_embeddings``: the engine fills :attr:`StepState.embed` and :attr:`StepState.mask_embedding`,
  and runs a row's next forward on ``Selection.embeds`` (its window's input embeddings) when given;
* ``folds_store``: with the exact block cache of a block-diffusion model, a finished block is not
  stored by a forward of its own: the next block's first forward also runs it (hard ids) and stores it;
* ``spans_blocks`` (multi-block decoding, :mod:`fewstep.decoding.policies.d3llm`): several blocks at once.
  The window runs from the row's current block (the first one that still holds a mask) to the answer's end
  (``L`` in the shapes below is then the window's width, ``block_length`` still the block size),
  ``start_block`` is called once per row and its memory lives from block to block, and ``block_done`` says
  whether the window's *first* block is done (the engine then moves to the next block that holds a mask).
  With ``cache="prefix"`` it plans its own prefix cache through two memory entries read before every
  forward, ``prefix_reuse`` (the blocks the forward takes from the cache) and ``prefix_keep`` (the blocks
  the cache holds after it), counted as 0 (nothing), 1 (the prompt), ``k + 1`` (the prompt and the first
  ``k`` answer blocks); reuse 0 is a full forward.

The helpers below compute scores only for the candidate positions (``logits[mask]``, ``[K, V]``),
in bounded chunks (:data:`CHUNK_BYTES`), so no float64 softmax is ever taken over the whole canvas of a 126k-152k
vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

# Upper bound on the bytes of one [chunk, V] temporary in the scoring helpers. Small chunks stay in the
# CPU's caches (2-4x faster than 256 MiB ones at a 126k vocabulary, measured); on a GPU fewer, larger
# chunks mean fewer kernel launches.
CHUNK_BYTES = {"cpu": 16 * 2**20, "default": 512 * 2**20}

PROBS_DTYPES = {"logits": None, "float32": torch.float32, "float64": torch.float64}

#: the largest sampling temperature a policy takes (OpenAI's bound: above it sampling is close to uniform)
MAX_TEMPERATURE = 2.0
#: the largest value of a count option (steps, tokens per step, top-k): the longest canvas the engine takes
MAX_OPTION_COUNT = 1 << 17
#: the most token ids a token-id option (``eos_ids``) holds, and the bound of each (ids outside a model's
#: vocabulary are allowed: a reference's list of EOS ids names ids the tiny fixtures do not have)
MAX_OPTION_IDS = 256
MAX_TOKEN_ID = 2**31 - 1


class OptionError(ValueError):
    """A policy option out of its type or range; ``option`` names it (e.g. ``temperature``)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class RowRNG:
    """Random numbers for a batch whose rows may each have their own stream.

    With ``seeds`` None every draw uses torch's global RNG (one draw per call for the batch). With one
    seed per batch row, row ``i`` draws from its own generator, so a row's samples do not depend on
    which other rows share the batch (batch == single also holds at temperature > 0).
    """

    def __init__(self, seeds: list[int] | None, device: torch.device):
        self.generators = None
        if seeds is not None:
            self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.device = device

    def uniform(self, rows: torch.Tensor, counts: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        """``U(0, 1)`` of shape ``[sum(counts), width]``: ``counts[j]`` lines for batch row ``rows[j]``."""
        total = int(counts.sum())
        if self.generators is None:
            return torch.rand((total, width), dtype=dtype, device=self.device)
        parts = [
            torch.rand((int(c), width), dtype=dtype, device=self.device, generator=self.generators[int(r)])
            for r, c in zip(rows.tolist(), counts.tolist())
        ]
        return torch.cat(parts) if parts else torch.empty((0, width), dtype=dtype, device=self.device)


@dataclass
class StepState:
    """What a policy sees at one step of one block, for the ``R`` rows in this step's batch."""

    tokens: torch.Tensor  # [R, L] current tokens of the block
    mask: torch.Tensor  # [R, L] True where the position is still masked: the candidates
    step: torch.Tensor  # [R] steps this row has already spent in the block (0 at its first)
    rows: torch.Tensor  # [R] indices of these rows in the caller's batch
    block: int  # index of the block
    num_blocks: int
    block_length: int
    gen_length: int
    gen_masked: torch.Tensor  # [R] masks left in the whole generation region (before this step)
    mask_id: int
    eos_ids: tuple[int, ...]  # end-of-sequence / end-of-turn ids of this model and tokenizer
    rng: RowRNG
    memory: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row memory from start_block
    # the model's input embedding (``uses_embeddings`` policies only): ``embed(ids) -> [..., D]`` is exactly
    # what the model's forward feeds its first layer; ``mask_embedding`` ``[D]`` is ``embed(mask_id)``
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None
    mask_embedding: torch.Tensor | None = None

    @property
    def counts(self) -> torch.Tensor:
        """Candidates per row, ``[R]``."""
        return self.mask.sum(-1)


class Selection(NamedTuple):
    """A policy's decision: ``tokens`` [R, L] to write where ``commit`` [R, L] is True.

    ``memory`` optionally gives new values (for these R rows) of the policy's per-row memory. ``embeds``
    ``[R, L, D]`` (``uses_embeddings`` policies) are the window's input embeddings for each row's next
    forward in the block (None: the token ids).
    """

    tokens: torch.Tensor
    commit: torch.Tensor
    memory: dict[str, torch.Tensor] | None = None
    embeds: torch.Tensor | None = None


class Policy:
    """Base class of the unmasking rules. Subclasses are dataclasses whose fields are the rule's options."""

    name: ClassVar[str] = ""
    #: one line for ``--help`` and docs
    summary: ClassVar[str] = ""
    #: the paper (or official code) the rule comes from, for the README's policy table
    paper: ClassVar[str] = ""
    #: the option a bare value sets in the ``"name:value"`` form (e.g. ``threshold:0.9``)
    positional: ClassVar[str | None] = None
    #: whether the rule reads the batch-wide block scalars of :class:`StepState` (``block``,
    #: ``num_blocks``, ``block_length``, ``gen_length``). A rule that does not (it looks only at the
    #: logits, the mask and per-row tensors) lets the engine decide rows at different blocks and of
    #: different answer lengths in one ``select`` call.
    uses_block_scalars: ClassVar[bool] = True
    #: capabilities (see the module docstring): a mutable window, embeddings input, a folded cache store
    revises: ClassVar[bool] = False
    uses_embeddings: ClassVar[bool] = False
    folds_store: ClassVar[bool] = False
    #: the decode window spans the blocks from the current one to the answer's end, and the policy's memory
    #: (and, with ``cache="prefix"``, the cache it plans) lives from block to block (see the module docstring)
    spans_blocks: ClassVar[bool] = False

    def validate(self, gen_length: int, block_length: int) -> None:
        """Raise ``ValueError`` if the policy cannot run with these lengths."""

    def blocks(self, gen_length: int, block_length: int) -> int:
        """The block length to decode with (a policy may impose a single block)."""
        return block_length

    def start_block(self, state: StepState) -> dict[str, torch.Tensor]:
        """Per-row memory for the block, each tensor with first dimension ``R``."""
        return {}

    def select(self, logits: torch.Tensor, state: StepState) -> Selection:
        """Choose tokens and the positions to commit from the block's logits ``[R, L, V]``."""
        raise NotImplementedError

    def block_done(self, state: StepState) -> torch.Tensor:
        """``[R]`` True for rows that are done with the block (state after this step's writes)."""
        return ~state.mask.any(-1)

    def iteration_cap(self) -> int | None:
        """Iterations the official loop allows per block, its store forward included (None: no cap).

        Only read with the loop option ``quirk_unstored_blocks``: a block that spent them all on denoising
        forwards is never stored in the cache (SDAR)."""
        return None

    def describe(self) -> str:
        """``name:key=value,...`` with every option that differs from its default."""
        if not is_dataclass(self):
            return self.name or type(self).__name__
        args = []
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value != f.default:
                args.append(f"{f.name}={value}")
        return self.name + (":" + ",".join(args) if args else "")


# --------------------------------------------------------------------------------------------------
# Scoring helpers (pure functions over the candidate logits z [K, V])
# --------------------------------------------------------------------------------------------------


def shown(value: Any) -> str:
    """``value`` for an error message: at most 60 characters (a huge integer by its size, never its digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 192:
        return f"an integer of {value.bit_length()} bits"
    text = str(value) if isinstance(value, (int, float)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _option(name: str) -> str:
    """``temperature`` of ``entropy.temperature``."""
    return name.rpartition(".")[2]


def check_choice(name: str, value: Any, choices) -> None:
    """:class:`OptionError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise OptionError(f"{name} must be one of {', '.join(map(str, choices))}; got {shown(value)}", _option(name))


def check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    """:class:`OptionError` naming the argument and its valid range (NaN is never in range)."""
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise OptionError(f"{name} must be in {lb}{lo}, {hi}{rb}; got {shown(value)}", _option(name))


def check_temperature(policy: Any, option: str = "temperature") -> None:
    """A sampling temperature in ``[0, MAX_TEMPERATURE]`` (0: greedy)."""
    check_range(f"{policy.name}.{option}", getattr(policy, option), 0.0, MAX_TEMPERATURE)


def check_options(policy: Any) -> None:
    """The type and bounds of every option of a dataclass policy, read from its annotations: booleans are
    bools, strings strings, counts integers in ``[0, MAX_OPTION_COUNT]``, real options numbers other than
    NaN, token-id tuples at most ``MAX_OPTION_IDS`` ids in ``[0, MAX_TOKEN_ID]``; then the policy's own
    range checks (its ``__post_init__``) run again, for an instance changed after it was built. The engine
    runs it on every request's policy; :class:`OptionError`."""
    if not is_dataclass(policy):
        return
    for f in fields(policy):
        value, annotation = getattr(policy, f.name), str(f.type)
        if value is None and "None" in annotation:
            continue
        kind, where = annotation.replace(" | None", "").strip(), f"{policy.name}.{f.name}"
        if kind == "bool" and not isinstance(value, bool):
            raise OptionError(f"{where} must be true or false; got {shown(value)}", f.name)
        if kind == "str" and not isinstance(value, str):
            raise OptionError(f"{where} must be a string; got {shown(value)}", f.name)
        if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            raise OptionError(f"{where} must be an integer; got {shown(value)}", f.name)
        if kind == "int" and not 0 <= value <= MAX_OPTION_COUNT:
            raise OptionError(f"{where} must be in [0, {MAX_OPTION_COUNT}]; got {shown(value)}", f.name)
        if kind == "float" and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise OptionError(f"{where} must be a number; got {shown(value)}", f.name)
        if kind == "float" and math.isnan(value):
            raise OptionError(f"{where} must be a number; got nan", f.name)
        if kind.startswith("tuple[int"):
            _check_ids(where, f.name, value)
    recheck = getattr(policy, "__post_init__", None)
    if recheck is not None:
        recheck()


def _check_ids(where: str, option: str, value: Any) -> None:
    ok = isinstance(value, (tuple, list)) and len(value) <= MAX_OPTION_IDS
    if not ok or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= MAX_TOKEN_ID for i in value):
        msg = f"{where} must be at most {MAX_OPTION_IDS} token ids in [0, {MAX_TOKEN_ID}]; got {shown(value)}"
        raise OptionError(msg, option)


def check_confidence_options(policy: Any) -> None:
    """Validate the options the confidence rules share: ``temperature`` in ``[0, MAX_TEMPERATURE]``,
    ``remasking`` and ``probs_dtype`` (each only where the policy has it)."""
    check_temperature(policy)
    if hasattr(policy, "remasking"):
        check_choice(f"{policy.name}.remasking", policy.remasking, ("low_confidence", "random"))
    if hasattr(policy, "probs_dtype"):
        check_choice(f"{policy.name}.probs_dtype", policy.probs_dtype, tuple(PROBS_DTYPES))


def chunks(z: torch.Tensor, itemsize: int = 8):
    """Row slices of ``z`` whose float64 copy (``itemsize`` bytes per value) stays under :data:`CHUNK_BYTES`:
    policies score ``[K, V]`` candidate logits chunk by chunk to bound their temporaries."""
    budget = CHUNK_BYTES.get(z.device.type, CHUNK_BYTES["default"])
    step = max(1, budget // max(1, z.shape[-1] * itemsize))
    for i in range(0, z.shape[0], step):
        yield z[i : i + step]


def softmax(z: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``softmax(z.to(dtype))`` over the last dim (one chunk: use only on ``[K, V]`` candidate logits)."""
    return F.softmax(z if dtype is None else z.to(dtype), dim=-1)


def token_probs(z: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``softmax(z)[token]`` per row, computed in ``dtype`` (None: the logits' dtype), chunked."""
    out, i = [], 0
    for c in chunks(z):
        p = softmax(c, dtype)
        out.append(p.gather(-1, tokens[i : i + c.shape[0], None]).squeeze(-1))
        i += c.shape[0]
    return torch.cat(out) if out else z.new_empty(0, dtype=dtype or z.dtype)


def entropy(z: torch.Tensor, dtype: torch.dtype | None, eps: float) -> torch.Tensor:
    """``-sum p log(p + eps)`` per row (natural log), in ``dtype``, chunked."""
    out = []
    for c in chunks(z):
        p = softmax(c, dtype)
        out.append(-torch.sum(p * torch.log(p + eps), dim=-1))
    return torch.cat(out) if out else z.new_empty(0, dtype=dtype or z.dtype)


def gumbel_argmax(z: torch.Tensor, temperature: float, noise: torch.Tensor | None) -> torch.Tensor:
    """Greedy argmax at ``temperature`` 0, else Gumbel-max sampling from ``softmax(z / T)``.

    ``noise`` is ``U(0, 1)`` of ``z``'s shape. In float64, ``argmax(z / T - log(-log u))`` is the same
    draw as the reference's ``argmax(exp(z) / (-log u) ** T)`` without its overflow for large logits.
    """
    if temperature == 0:
        return z.argmax(-1)
    g = -torch.log(-torch.log(noise.clamp_min(torch.finfo(noise.dtype).tiny)))
    return (z.to(noise.dtype) / temperature + g).argmax(-1)


def sample_candidates(
    z: torch.Tensor, state: StepState, temperature: float, noise_dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Tokens for the candidate rows ``z`` [K, V] (row order of ``state.mask``), drawing noise per batch row."""
    if temperature == 0:
        return z.argmax(-1)
    noise = state.rng.uniform(state.rows, state.counts, z.shape[-1], noise_dtype)
    return gumbel_argmax(z, temperature, noise)


def random_scores(state: StepState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``U(0, 1)`` per candidate (random remasking), ``[K]``."""
    return state.rng.uniform(state.rows, state.counts, 1, dtype).squeeze(-1)


def scatter(values: torch.Tensor, mask: torch.Tensor, fill: float | int) -> torch.Tensor:
    """Put the per-candidate ``values`` [K] back into a ``[R, L]`` tensor, ``fill`` elsewhere."""
    out = torch.full(mask.shape, fill, dtype=values.dtype, device=mask.device)
    out[mask] = values
    return out


def ranks(scores: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """0-based rank of every entry in its row (ties: lower position first)."""
    order = torch.sort(scores, dim=-1, descending=descending, stable=True).indices
    r = torch.empty_like(order)
    r.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return r


def top_k_mask(scores: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """The ``k[r]`` best candidates of each row (``scores`` [R, L], ``mask`` the candidates)."""
    worst = float("-inf") if descending else float("inf")
    s = scores.masked_fill(~mask, worst)
    return (ranks(s, descending) < k[:, None]) & mask


def first_best(scores: torch.Tensor, mask: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Mask of each row's single best candidate (ties: lower position; rows without candidates: none)."""
    worst = float("-inf") if descending else float("inf")
    s = scores.masked_fill(~mask, worst)
    best = s.argmax(-1) if descending else s.argmin(-1)
    out = torch.zeros_like(mask)
    out[torch.arange(mask.shape[0], device=mask.device), best] = True
    return out & mask.any(-1, keepdim=True)


def even_quota(counts: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's per-step quota ``[R, steps]``: ``counts`` split evenly, the remainder on the first steps."""
    base = counts // steps
    rem = counts % steps
    k = torch.arange(steps, device=counts.device)
    return base[:, None] + (k[None, :] < rem[:, None]).long()


def quota_at(quota: torch.Tensor, step: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The quota of each row's current step; past the end of the schedule, everything left."""
    s = quota.shape[1]
    q = quota.gather(1, step.clamp(max=s - 1)[:, None]).squeeze(1)
    return torch.where(step < s, q, counts)


def steps_per_block(name: str, steps: int, gen_length: int, block_length: int) -> int:
    """``steps / number of blocks``, with a ValueError naming the constraint."""
    nb = gen_length // block_length
    if steps < 1:
        raise OptionError(f"{name}.steps must be >= 1; got {steps}", "steps")
    if steps % nb:
        raise OptionError(
            f"{name}.steps ({steps}) must be divisible by the number of blocks ({nb} = gen_length {gen_length} "
            f"/ block_length {block_length}); valid values: multiples of {nb}",
            "steps",
        )
    return steps // nb


class FixedSteps:
    """Mixin of the policies with a fixed step budget: ``steps`` forwards per generation (None: one per
    token), the same number in every block (LLaDA's low-confidence rule, Dream's samplers)."""

    name: str
    steps: int | None

    def _steps(self, gen_length: int, block_length: int) -> int:
        return steps_per_block(self.name, gen_length if self.steps is None else self.steps, gen_length, block_length)

    def validate(self, gen_length: int, block_length: int) -> None:
        self._steps(gen_length, block_length)
