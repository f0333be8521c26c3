"""A request to the engine and the one place it is validated.

:class:`Request` is one prompt and how to decode it. :func:`resolve_settings` checks the type and range
of every field against the model and resolves the defaults (:class:`ResolvedSettings`);
:func:`check_prompt` checks the prompt against the vocabulary and the context. :meth:`Engine.validate
<fewstep.decoding.engine.Engine.validate>` runs both, and every caller goes through it: ``fewstep.generate``,
the text layer and the server only check their own types and map their field names (the API's
``max_tokens`` is the engine's ``gen_length``) before it. A mistake raises :class:`RequestError`, which
names the field at fault and states its message in the caller's own names (:meth:`RequestError.renamed`).

Bounds (besides the model's vocabulary and context):

==========================  ============================================================================
field                       accepted
==========================  ============================================================================
``prompt``                  1 or more token ids of the vocabulary; prompt + ``gen_length`` within the
                            context (``MAX_LENGTH`` tokens when the model states none)
``gen_length``              integer in ``[1, context]``
``block_length``            None, or an integer: ``[1, gen_length]`` dividing it (full attention);
                            ``[1, context]`` (block diffusion)
``policy``                  a :class:`Policy` or a spec of at most ``MAX_POLICY_SPEC`` characters; every
                            option within its range (:func:`~fewstep.decoding.policies.base.check_options`)
``cache``                   ``none``, ``prefix`` or ``dual``
``seed``                    None, or an integer in ``[0, MAX_SEED]`` (what a torch generator takes)
``cfg_scale``               a number in ``[0, MAX_CFG_SCALE]``
``max_nfe``                 None, or an integer in ``[1, MAX_COUNT]``
``max_steps_per_block``     None, or an integer in ``[1, MAX_COUNT]``
``mask_id``, ``eos_ids``    None, or token ids of the vocabulary (at most ``MAX_EOS_IDS`` EOS ids)
``early_stop``, ...         booleans (``eos_early_stop``, ``eos_fill`` and every field of :class:`Quirks` too)
``id``                      None, or any hashable value
==========================  ============================================================================
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from fewstep.decoding.policies import Policy, parse_policy
from fewstep.decoding.policies.base import OptionError, check_options, shown
from fewstep.models.block import attention_block

CACHE_MODES = ("none", "prefix", "dual")
# token strings that end a turn in the chat formats fewstep knows (looked up in the tokenizer's vocab)
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot|>")

MAX_LENGTH = 1 << 17  # prompt + answer tokens, for a model that states no context (max_sequence_length)
MAX_COUNT = 2**31 - 1  # max_nfe, max_steps_per_block: counts of forwards
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes
MAX_CFG_SCALE = 100.0
MAX_EOS_IDS = 256
MAX_POLICY_SPEC = 1000  # characters of a policy spec string


class RequestError(ValueError):
    """A bad request (a user mistake): ``field`` names the field at fault, ``option`` the policy option
    when the fault is one (``field`` is then ``"policy"``).

    The message is a template whose ``{gen_length}``-style placeholders name request fields (``{field}``:
    the field at fault), so a caller with other names for them states it in its own words with
    :meth:`renamed`, never by editing the text.
    """

    def __init__(
        self,
        template: str,
        field: str | None = None,
        *,
        option: str | None = None,
        names: Mapping[str, str] | None = None,
        **values: Any,
    ):
        self.template, self.values, self.option, self.request_field = template, values, option, field
        self.names = dict(names or {})
        self.field = self.names.get(field, field) if field is not None else None
        super().__init__(template.format_map(_Words(self.names, values, field)))

    def renamed(self, names: Mapping[str, str]) -> RequestError:
        """This error in a caller's vocabulary: ``names`` maps request fields to the caller's names for them
        (``field`` and the message follow; fields it does not name keep their names)."""
        return RequestError(self.template, self.request_field, option=self.option, names=names, **self.values)


class _Words(dict):
    """The values of a message template; any other placeholder is a field name, in the caller's words."""

    def __init__(self, names: Mapping[str, str], values: Mapping[str, Any], field: str | None):
        super().__init__(values)
        self.names, self.field = names, field

    def __missing__(self, key: str) -> str:
        key = self.field if key == "field" and self.field is not None else key
        return self.names.get(key, key)


@dataclass(frozen=True)
class Quirks:
    """Loop-level behaviours of the reference samplers, reproduced for parity (all off by default; see
    :func:`fewstep.generate` for each)."""

    cache_extra_nfe: bool = False  # a block finished by its first (full) forward costs one more forward
    mask_prediction: bool = False  # the mask token itself may win the argmax
    early_stop_scans_prompt: bool = False  # eos_early_stop also finds an EOS inside the prompt (LLaDA2)
    unstored_blocks: bool = False  # block models: a block left with masks is never stored (SDAR)
    prefill_short_prompt: bool = False  # block models with a cache: a prompt shorter than a block still costs a
    # prefill forward (over the first block, masks included; nothing of it is kept), as dInfer counts it
    early_stop_keeps_block: bool = False  # early_stop: an EOS anywhere in the finished block (its prompt tail
    # included) stops the row; the block is kept whole and the EOS fill starts after it (dInfer)
    eos_fill_nfe: bool = False  # an eos_fill that ends the row counts one more forward (d3LLM's count)
    prefix_own_logit: bool = False  # logit_shift models, a spanning policy's prefix cache (d3LLM's Dream)


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
    max_steps_per_block: int | None = None  # default 4 * block_length + 64
    eos_early_stop: bool = False  # stop mid-block once the answer up to its first EOS is decoded (LLaDA2)
    eos_fill: bool = False  # d3LLM's: after the first EOS everything is EOS at once; stop when no mask is left
    quirks: Quirks = field(default_factory=Quirks)


@dataclass
class ResolvedSettings:
    """A request's decoding settings, validated, with every default resolved against the model."""

    policy: Policy
    gen_length: int
    block_length: int
    cache: str
    cfg_scale: float
    mask_id: int
    eos: tuple[int, ...]
    fill_id: int | None  # early stop's filler (None: no early stop)
    limit: int  # forwards a block may take before the row fails (max_steps_per_block)
    block_diffusion: bool = False  # the model is block-causal: blocks aligned to absolute positions


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


def default_block_length(model_block: int | None, gen_length: int, block_length: int | None = None) -> int:
    """The decoding block for ``block_length`` (None: the default). A block-diffusion model decodes in the
    blocks of its attention (``model_block``, :func:`fewstep.models.block.attention_block`; any given length,
    never cut to the answer); a full-attention model in blocks of 32, never longer than the answer."""
    if model_block:
        return model_block if block_length is None else block_length
    return min(32 if block_length is None else block_length, gen_length)


def context_length(model) -> int:
    """Tokens of prompt + answer the model takes: its ``max_sequence_length``, else ``MAX_LENGTH``."""
    n = getattr(model.config, "max_sequence_length", None)
    return MAX_LENGTH if n is None else int(n)


# ---- field checks ---------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(value: Any, name: str, lo: int, hi: int, why: str = "") -> int:
    """``value`` if it is an integer in ``[lo, hi]``, else :class:`RequestError` naming field ``name``."""
    if not _is_int(value):
        raise RequestError("{field} must be an integer; got {value}", name, value=shown(value))
    if value < lo:
        raise RequestError("{field} must be an integer >= {lo}; got {value}", name, lo=lo, value=shown(value))
    if value > hi:
        msg = "{field} must be an integer <= {hi}{why}; got {value}"
        raise RequestError(msg, name, hi=hi, why=why, value=shown(value))
    return int(value)


def real(value: Any, name: str, lo: float, hi: float) -> float:
    """``value`` as a float if it is a finite number in ``[lo, hi]``, else :class:`RequestError`."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise RequestError("{field} must be a finite number; got {value}", name, value=shown(value))
    if value < lo:
        raise RequestError("{field} must be >= {lo}; got {value}", name, lo=lo, value=shown(value))
    if value > hi:
        raise RequestError("{field} must be <= {hi}; got {value}", name, hi=hi, value=shown(value))
    return float(value)


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError("{field} must be true or false; got {value}", name, value=shown(value))
    return value


def token_ids(value: Any, name: str, vocab: int, most: int) -> tuple[int, ...]:
    """At most ``most`` token ids of the vocabulary (a sequence of integers)."""
    try:
        ids = tuple(operator.index(t) for t in value if not isinstance(t, bool))
        ok = not isinstance(value, (str, bytes)) and len(ids) == len(value) <= most
    except TypeError:
        ok = False
    if not ok or not all(0 <= t < vocab for t in ids):
        msg = "{field} must be at most {most} token ids in [0, {top}] (the vocabulary); got {value}"
        raise RequestError(msg, name, most=most, top=vocab - 1, value=shown(value))
    return ids


def request_policy(spec: Any) -> Policy:
    """A request's policy: an instance as is, or a parsed spec; :class:`RequestError` (``field`` policy)."""
    if isinstance(spec, str) and len(spec) > MAX_POLICY_SPEC:
        raise RequestError("{policy} spec must be at most {n} characters", "policy", n=MAX_POLICY_SPEC)
    try:
        return parse_policy(spec)
    except OptionError as exc:
        raise RequestError("{detail}", "policy", option=exc.option, detail=str(exc)) from None
    except ValueError as exc:
        raise RequestError("{detail}", "policy", detail=str(exc)) from None


# ---- the request --------------------------------------------------------------------------------------


def resolve_settings(model, req: Request, tokenizer=None, policy: Policy | None = None) -> ResolvedSettings:
    """Validate ``req``'s settings (every field but the prompt) against ``model`` and resolve its defaults;
    :class:`RequestError` with a message fit for a user."""
    cfg = model.config
    policy = request_policy(req.policy) if policy is None else policy
    if req.cache not in CACHE_MODES:
        msg = "{cache} must be one of {modes}; got {value}"
        raise RequestError(msg, "cache", modes=", ".join(CACHE_MODES), value=shown(req.cache))
    vocab, context = int(cfg.vocab_size), context_length(model)
    mask_id = int(cfg.mask_token_id) if req.mask_id is None else req.mask_id
    if not _is_int(mask_id) or not 0 <= mask_id < vocab:
        msg = "{mask_id} must be in [0, {top}] (the vocabulary); got {value}"
        raise RequestError(msg, "mask_id", top=vocab - 1, value=shown(mask_id))
    mask_id = int(mask_id)
    G = integer(req.gen_length, "gen_length", 1, context, f" (the model's context, max_sequence_length {context})")
    bd = bool(getattr(model, "block_diffusion", False))
    L = _block_length(model, req, policy, G, bd, context)
    cfg_scale = real(req.cfg_scale, "cfg_scale", 0, MAX_CFG_SCALE)
    if req.max_nfe is not None:
        integer(req.max_nfe, "max_nfe", 1, MAX_COUNT)
    if req.max_steps_per_block is not None:
        integer(req.max_steps_per_block, "max_steps_per_block", 1, MAX_COUNT)
    if req.seed is not None:
        integer(req.seed, "seed", 0, MAX_SEED, " (the largest seed a torch generator takes)")
    for name in ("early_stop", "eos_early_stop", "eos_fill"):
        flag(getattr(req, name), name)
    _check_quirks(req.quirks)
    if policy.spans_blocks and bd:
        msg = "{detail} decodes several blocks at once: it needs a full-attention model (LLaDA, Dream), not a block-causal one"
        raise RequestError(msg, "policy", detail=policy.name)
    if policy.spans_blocks and req.cache == "dual":
        msg = (
            "{detail} keeps later blocks open: {cache} must be none or prefix (its own delayed prefix cache), not dual"
        )
        raise RequestError(msg, "cache", detail=policy.name)
    try:
        check_options(policy)
        policy.validate(-(-G // L) * L if bd else G, L)
    except OptionError as exc:
        raise RequestError("{detail}", "policy", option=exc.option, detail=str(exc)) from None
    except ValueError as exc:
        raise RequestError("{detail}", "policy", detail=str(exc)) from None
    eos = token_ids(req.eos_ids, "eos_ids", vocab, MAX_EOS_IDS) if req.eos_ids is not None else None
    eos = stop_ids(model, tokenizer) if eos is None else eos
    fill_id = eos[0] if eos else None
    if (req.early_stop or req.eos_early_stop or req.eos_fill) and fill_id is None:
        msg = "{early_stop}, {eos_early_stop} and {eos_fill} need {eos_ids} (the model config has no eos_token_id)"
        raise RequestError(msg, "eos_ids")
    limit = req.max_steps_per_block or 4 * L + 64
    fill = fill_id if req.early_stop else None
    return ResolvedSettings(policy, G, L, req.cache, cfg_scale, mask_id, eos, fill, limit, bd)


def _block_length(model, req: Request, policy: Policy, G: int, bd: bool, context: int) -> int:
    """The request's block length, resolved (the default, then the policy's own choice) and checked."""
    if req.block_length is not None and not _is_int(req.block_length):
        raise RequestError(
            "{block_length} must be an integer; got {value}", "block_length", value=shown(req.block_length)
        )
    L = default_block_length(attention_block(model), G) if req.block_length is None else req.block_length
    L = policy.blocks(G, L)
    if bd:  # blocks of the model's attention, aligned to absolute positions: any length up to the context
        if not _is_int(L) or not 1 <= L <= context:
            msg = "{block_length} must be an integer in [1, {context}] (the model's context); got {value}"
            raise RequestError(msg, "block_length", context=context, value=shown(L))
    elif not _is_int(L) or not 1 <= L <= G:
        raise RequestError(
            "{block_length} must be in [1, {gen_length}={G}]; got {value}", "block_length", G=G, value=shown(L)
        )
    elif G % L:
        msg = "{gen_length} ({G}) must be a multiple of {block_length} ({L}); valid block lengths divide {G}"
        raise RequestError(msg, "block_length", G=G, L=L)
    return L


def _check_quirks(quirks: Any) -> None:
    if not isinstance(quirks, Quirks):
        raise RequestError("{quirks} must be a Quirks instance; got {value}", "quirks", value=shown(quirks))
    for f in fields(quirks):
        if not isinstance(getattr(quirks, f.name), bool):
            raise RequestError("{quirks}.{name} must be true or false", "quirks", name=f.name)


def check_prompt(model, prompt: Any, gen_length: int) -> list[int]:
    """The prompt as a list of ints; :class:`RequestError` if it is not token ids, is empty, out of the
    vocabulary or too long (``field`` "prompt", or "gen_length" when the prompt alone fits the context)."""
    try:
        ids = [operator.index(t) for t in prompt if not isinstance(t, bool)]
        ok = not isinstance(prompt, (str, bytes)) and len(ids) == len(prompt)
    except TypeError:
        ok = False
    if not ok:
        raise RequestError("{prompt} must be a sequence of integer token ids", "prompt")
    vocab = int(model.config.vocab_size)
    if not ids:
        raise RequestError("the {prompt} must hold at least one token", "prompt")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        msg = "input_ids must be token ids in [0, {top}] (the vocabulary); got {value}"
        raise RequestError(msg, "prompt", top=vocab - 1, value=shown(bad[:5]))
    n, max_len = len(ids) + gen_length, context_length(model)
    if len(ids) >= max_len:
        msg = "the {prompt} has {n} tokens; the model's context (max_sequence_length) is {max_len} tokens"
        raise RequestError(msg, "prompt", n=len(ids), max_len=max_len)
    if max_len < n:
        msg = (
            "{prompt} length ({P}) + {gen_length} ({G}) = {n} exceeds the model's context "
            "(max_sequence_length {max_len}); valid {gen_length}: <= {valid}"
        )
        raise RequestError(msg, "gen_length", P=len(ids), G=gen_length, n=n, max_len=max_len, valid=max_len - len(ids))
    return ids


def check_id(request_id: Any) -> None:
    """A request id is any hashable value (it keys the engine's live set)."""
    try:
        hash(request_id)
    except TypeError:
        raise RequestError("request {id} must be hashable; got {value}", "id", value=shown(request_id)) from None
