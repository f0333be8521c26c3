"""What every fewstep model shares: its output, its KV cache, and the logit alignment.

A fewstep model is a plain ``torch.nn.Module`` (the native ones are assembled in ``llada.py``, ``dream.py``,
``llada2.py`` and ``sdar.py`` from the building blocks of ``layers.py``) with

* ``forward(input_ids, attention_mask=None, position_ids=None, past_key_values=None,
  use_cache=False, replace_position=None, logits_range=None, inputs_embeds=None) -> ModelOutput``
  returning the checkpoint's **raw** logits (Dream's are not shifted), so they can be compared with the
  official code; ``inputs_embeds`` ``[B, T, D]`` replaces ``input_ids`` (one of the two is given);
* the input embedding API (:class:`~fewstep.models.layers.DecoderLM`): ``input_embeddings()`` (the
  ``[V, D]`` matrix), ``embed(ids)`` (exactly what ``forward`` feeds its first layer for ``ids``) and
  ``mask_embedding()``, so that a caller (the engine, and through it a policy such as DMax's soft
  parallel decoding) builds its own inputs without reaching into the model's attributes;
* ``config`` with ``vocab_size``, ``mask_token_id``, ``eos_token_id``, ``pad_token_id`` and
  ``max_sequence_length``;
* ``logit_shift``: 0 if position ``i``'s token is predicted by the logits at ``i`` (LLaDA), 1 if it is
  predicted by the logits at ``i - 1`` (Dream keeps its autoregressive parent's alignment).

The decoding engine never looks at the architecture: it calls :meth:`DiffusionLM.denoise`, which
returns logits already aligned with the positions they predict, for the whole canvas or for a window.

KV cache semantics (Fast-dLLM's, generalised to batches): keys are cached **after** RoPE (rotating a
key depends only on its own position, so this equals the reference, which re-rotates the whole cache
every call), per layer as ``[B, n_kv_heads, L, head_dim]``.

* prefix mode (``past_key_values`` given, ``replace_position`` None): the new keys/values are appended
  after the cached ones and the queries take the positions that follow the cache;
* dual mode (``replace_position`` given): the new keys/values are written **in place** into the cached
  tensors at the marked columns, the queries take those columns' positions, and attention runs over
  the whole (updated) cache.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import nn


@dataclass
class KVCache:
    """Per-layer cached keys and values, each ``[B, n_kv_heads, L, head_dim]`` (keys after RoPE)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def length(self) -> int:
        """Number of cached positions."""
        return 0 if not self.layers else self.layers[0][0].shape[-2]

    def truncate(self, length: int) -> KVCache:
        """A cache holding only the first ``length`` positions (views, no copy)."""
        return KVCache([(k[:, :, :length], v[:, :, :length]) for k, v in self.layers])

    def select_rows(self, rows: torch.Tensor) -> KVCache:
        """A cache for a subset of the batch rows (used when finished rows leave the batch)."""
        return KVCache([(k[rows], v[rows]) for k, v in self.layers])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)


@dataclass
class ModelOutput:
    """What a fewstep model returns: ``logits`` [B, L, V] and, with ``use_cache``, the new cache."""

    logits: torch.Tensor
    past_key_values: KVCache | None = None


def replace_columns(replace_position: torch.Tensor | None) -> torch.Tensor | None:
    """The column indices marked by a dual-cache ``replace_position`` mask ([L] or [B, L], same in all rows)."""
    if replace_position is None:
        return None
    if replace_position.dim() == 2:
        if replace_position.shape[0] > 1 and not bool((replace_position == replace_position[:1]).all()):
            raise ValueError("replace_position must mark the same columns in every row of the batch")
        replace_position = replace_position[0]
    return replace_position.nonzero(as_tuple=True)[0]


def resolve_positions(
    batch: int,
    query_len: int,
    past_len: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    columns: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """RoPE positions ``[B, Tq]`` of the query tokens.

    Without an attention mask, positions are the column indices (the reference behaviour). With one
    (left padding), a row's positions are counted from its first real token, so a padded row sees
    exactly the positions it would see alone; RoPE being relative, this only changes rounding.
    """
    if position_ids is not None:
        return position_ids.to(device)
    if columns is not None:
        cols = columns.to(device)
    else:
        cols = torch.arange(past_len, past_len + query_len, device=device)
    if attention_mask is None:
        return cols.unsqueeze(0).expand(batch, -1)
    offset = (attention_mask == 0).long().cumsum(-1)  # pads before (and at) each column
    # Left padding: every pad precedes the real tokens, so the offset of a real column is the pad count.
    pads = offset.gather(1, cols.unsqueeze(0).expand(batch, -1))
    return (cols.unsqueeze(0) - pads).clamp_min(0)


def key_padding_mask(attention_mask: torch.Tensor | None, key_len: int) -> torch.Tensor | None:
    """SDPA boolean mask ``[B, 1, 1, Lk]`` (True = attend) from a 2-D padding mask; None if nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] != key_len:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the keys span {key_len} "
            "(with a KV cache, pass the mask of the whole canvas)"
        )
    if bool(attention_mask.all()):
        return None  # the reference treats an all-ones mask as no mask
    return attention_mask.bool()[:, None, None, :]


_Config = TypeVar("_Config", bound="ConfigFields")


class ConfigFields:
    """Shared config.json plumbing of the architecture configs (dataclasses with an ``extra`` dict).

    A family names itself in ``FAMILY`` (for the error messages), lists the ``REQUIRED`` keys (never
    guessed) and may override the hooks :meth:`missing`, :meth:`unsupported` and :meth:`complete`.
    """

    FAMILY = ""
    REQUIRED: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls: type[_Config], cfg: dict[str, Any]) -> _Config:
        """Validate a config.json dict: required keys present, unsupported variants rejected with the reason."""
        missing = cls.missing(cfg)
        if missing:
            raise ValueError(f"{cls.FAMILY} config.json is missing required keys: {', '.join(missing)}")
        bad = cls.unsupported(cfg)
        if bad:
            raise ValueError(f"unsupported {cls.FAMILY} variant: " + "; ".join(bad))
        kwargs, extra = cls.split_known(cfg)
        return cls(**cls.complete(kwargs, cfg), extra=extra)

    @classmethod
    def missing(cls, cfg: dict[str, Any]) -> list[str]:
        """The required keys ``cfg`` lacks."""
        return [k for k in cls.REQUIRED if cfg.get(k) is None]

    @classmethod
    def unsupported(cls, cfg: dict[str, Any]) -> list[str]:
        """One ``"key=value (fewstep supports ...)"`` reason per variant fewstep does not implement."""
        return []

    @classmethod
    def complete(cls, kwargs: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
        """The constructor arguments with the values a family derives from other keys."""
        return kwargs

    def stack_sizes(self) -> dict[str, Any]:
        """``vocab`` (embedding rows), ``dim``, ``eps`` (RMSNorm) and ``tied`` (LM head = embedding) of the model."""
        raise NotImplementedError

    @classmethod
    def split_known(cls, cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(values of the dataclass fields present in ``cfg``, every other key) of a config.json dict."""
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        return known, {k: v for k, v in cfg.items() if k not in names}

    def fields_dict(self) -> dict[str, Any]:
        """``extra`` updated with every dataclass field: the base of a config.json."""
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        return out


class HFConfigFields(ConfigFields):
    """The config plumbing of the families with Hugging Face (Qwen/Bailing) names: Dream, LLaDA2, SDAR."""

    @classmethod
    def unsupported(cls, cfg: dict[str, Any]) -> list[str]:
        """SiLU only (each family adds its own RoPE-scaling and sliding-window rules)."""
        if cfg.get("hidden_act", "silu") != "silu":
            return [f"hidden_act={cfg['hidden_act']!r} (fewstep supports 'silu')"]
        return []

    @property
    def head_size(self) -> int:
        """``head_dim`` if the config sets it, else ``hidden_size / num_attention_heads``."""
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    def stack_sizes(self) -> dict[str, Any]:
        return {
            "vocab": self.vocab_size,
            "dim": self.hidden_size,
            "eps": self.rms_norm_eps,
            "tied": self.tie_word_embeddings,
        }


class RowGroup(NamedTuple):
    """Consecutive batch rows ``[a, b)`` with one layout: their real queries ``[q0, q1)`` and key runs."""

    rows: tuple[int, int]
    queries: tuple[int, int]
    keys: tuple[tuple[int, int], ...]  # [start, end) key columns, in order


@dataclass
class RaggedMask:
    """A padded batch whose rows attend apart (:func:`~fewstep.models.layers.attend`).

    Each group of rows runs its own attention call over exactly its real queries and its real keys (the
    key runs concatenated: the columns the row has alone, in order), with no padding mask: so a row's
    attention is the call it makes alone, bit for bit, whatever pads the batch adds. (A masked call over
    the padded keys is not: the kernels sum a row's keys in blocks aligned to the padded layout, so its
    rounding depends on its padding; in bfloat16 enough to change tokens.) ``dense``: an explicit
    ``[B, 1, Tq, Lk]`` boolean mask (block-causal models), sliced per group like the keys. Pad queries
    get zeros."""

    groups: list[RowGroup]
    dense: torch.Tensor | None = None


@dataclass
class AttentionInputs:
    """What every layer of one forward needs besides its activations."""

    positions: torch.Tensor  # [B, T] RoPE positions of the query tokens
    mask: torch.Tensor | None  # SDPA key-padding mask [B, 1, 1, Lk] or None
    past: KVCache | None  # cache to extend (prefix) or to write into (dual)
    columns: torch.Tensor | None  # dual mode: the cache columns the queries replace
    ragged: RaggedMask | None = None  # the padded rows' own attention (used instead of ``mask``)

    @property
    def attention_mask(self) -> torch.Tensor | RaggedMask | None:
        """What the layers attend with: the ragged rows when the batch is padded, else the dense mask."""
        return self.mask if self.ragged is None else self.ragged


def _runs(flags: list) -> tuple[tuple[int, int], ...]:
    """The ``[start, end)`` runs of true values in ``flags``."""
    out, start = [], None
    for i, f in enumerate(flags):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(flags)))
    return tuple(out)


def ragged_rows(keys: list[list], queries: list[list] | None, dense: torch.Tensor | None = None) -> RaggedMask | None:
    """A :class:`RaggedMask` from each row's real keys and real queries (per-row lists of flags; ``queries``
    None: every query is real); None when a row's real queries are not one run (the dense mask then)."""
    groups: list[RowGroup] = []
    for i, row in enumerate(keys):
        if queries is None:
            q = (0, dense.shape[2])
        else:
            runs = _runs(queries[i])
            if len(runs) > 1:
                return None
            q = runs[0] if runs else (0, 0)
        k = _runs(row)
        last = groups[-1] if groups else None
        if last is not None and last.queries == q and last.keys == k and last.rows[1] == i:
            groups[-1] = RowGroup((last.rows[0], i + 1), q, k)
        else:
            groups.append(RowGroup((i, i + 1), q, k))
    return RaggedMask(groups, dense)


def padding_rows(
    attention_mask: torch.Tensor | None, query_columns: torch.Tensor, dense: torch.Tensor | None = None
) -> RaggedMask | None:
    """The :class:`RaggedMask` of a padded batch from its 2-D mask ``[B, Lk]`` (1 = real) and the key columns
    of its queries; None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    flags = attention_mask.bool()
    return ragged_rows(flags.tolist(), flags[:, query_columns].tolist(), dense)


def attention_inputs(
    inputs: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_key_values: KVCache | list | None,
    replace_position: torch.Tensor | None,
) -> AttentionInputs:
    """Resolve the cache mode, the query positions and the padding mask of one forward (``inputs``: the
    ids ``[B, T]`` or the embeddings ``[B, T, D]`` of the queries; only their batch, length and device count)."""
    B, T = inputs.shape[:2]
    if past_key_values is not None and not isinstance(past_key_values, KVCache):
        past_key_values = KVCache(list(past_key_values))
    columns = replace_columns(replace_position)
    past_len = 0 if past_key_values is None or columns is not None else past_key_values.length
    key_len = past_key_values.length if columns is not None else past_len + T
    positions = resolve_positions(B, T, past_len, attention_mask, position_ids, columns, inputs.device)
    mask = key_padding_mask(attention_mask, key_len)
    ragged = None
    if mask is not None:
        cols = columns if columns is not None else torch.arange(past_len, past_len + T, device=inputs.device)
        ragged = padding_rows(attention_mask, cols.to(attention_mask.device))
    return AttentionInputs(positions, mask, past_key_values, columns, ragged)


class DiffusionLM(nn.Module):
    """Base class of fewstep's native models: shared logit alignment and device/dtype helpers.

    A family's model class declares, at class level, everything the rest of fewstep needs to know about
    it (``fewstep.models.families`` finds the classes; loading, LoRA and the recipe tables read them):
    ``architecture`` (the family's name), ``config_class``, ``model_types`` (the config.json
    ``model_type`` / ``architectures`` names that select it), ``family_order`` (its place in listings),
    ``lora_roles`` (role -> regex of the module names it adapts), ``reference_lora_roles`` (the roles a
    reference recipe's Llama-named LoRA targets reach here; None: all), ``recipes_from`` (the recipe rows
    of a paper's ``RECIPES`` it takes, most specific first) and ``pretrainable`` (``fewstep pretrain``
    builds it from scratch).
    """

    architecture: str = ""
    config_class: type | None = None
    model_types: tuple[str, ...] = ()
    family_order: int = 100
    lora_roles: ClassVar[dict[str, str]] = {}
    reference_lora_roles: tuple[str, ...] | None = None
    recipes_from: tuple[str, ...] = ()
    pretrainable: bool = False

    logit_shift: int = 0

    gradient_checkpointing: bool = False

    def run_layers(
        self, layers: nn.ModuleList, x: torch.Tensor, ctx: AttentionInputs, *args: Any
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run ``layer(x, *args, mask, past_i, columns)`` for each layer, with gradient checkpointing when
        training with it enabled; returns the output and every layer's keys/values."""
        presents = []
        for i, layer in enumerate(layers):
            past = None if ctx.past is None else ctx.past[i]
            call_args = (x, *args, ctx.attention_mask, past, ctx.columns)
            if self.gradient_checkpointing and self.training:
                x, present = torch.utils.checkpoint.checkpoint(layer, *call_args, use_reentrant=False)
            else:
                x, present = layer(*call_args)
            presents.append(present)
        return x, presents

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def denoise(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        cache: KVCache | None = None,
        cache_mode: str = "none",
        use_cache: bool = False,
        logits_start: int | None = None,
        logits_end: int | None = None,
    ) -> ModelOutput:
        """Logits aligned with the positions they predict, for the canvas columns ``[logits_start, logits_end)``.

        ``input_ids`` is always the **whole** canvas ``[B, N]`` and ``attention_mask`` its padding mask;
        ``inputs_embeds`` (the whole canvas too, ``[B, N, D]``, ``input_ids`` None) runs the same columns from
        embeddings instead of ids (e.g. soft embeddings; ``embed(ids)`` gives the ids' exact logits).
        ``cache_mode`` says which columns are run through the network:

        * ``"none"``: all of them (``cache`` ignored); with ``use_cache`` the full cache is returned;
        * ``"prefix"``: ``cache`` holds columns ``[0, start)``; columns ``[start, N)`` are run;
        * ``"dual"``: ``cache`` holds all ``N`` columns; columns ``[start, end)`` are run and their
          keys/values are written into ``cache`` in place.

        For a model with ``logit_shift = 1`` (Dream) the window is silently extended one column to the
        left so that every requested column has its predicting logits; column 0 reuses its own logits,
        as the reference samplers do.
        """
        canvas = input_ids if inputs_embeds is None else inputs_embeds
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("denoise takes exactly one of input_ids and inputs_embeds")
        n = canvas.shape[1]
        end = n if end is None else end
        logits_start = start if logits_start is None else logits_start
        logits_end = (end if cache_mode == "dual" else n) if logits_end is None else logits_end
        s = self.logit_shift
        if cache_mode == "none":
            run_start, run_end, past, replace = 0, n, None, None
        elif cache_mode == "prefix":
            run_start = max(start - s, 0)
            if cache is None or cache.length < run_start:
                raise ValueError("prefix mode needs a cache covering the columns before the window")
            past = cache.truncate(run_start)
            run_end, replace = n, None
        elif cache_mode == "dual":
            run_start, run_end = max(start - s, 0), end
            if cache is None or cache.length != n:
                raise ValueError("dual mode needs a cache covering the whole canvas")
            past = cache
            replace = torch.zeros(n, dtype=torch.bool, device=canvas.device)
            replace[run_start:run_end] = True
        else:
            raise ValueError(f"cache_mode must be 'none', 'prefix' or 'dual', got {cache_mode!r}")
        # raw logits needed: [logits_start - s, logits_end - s), clipped at column 0
        need_lo = max(logits_start - s, 0)
        need_hi = logits_end - s
        ids = None if input_ids is None else input_ids[:, run_start:run_end]
        embeds = None if inputs_embeds is None else inputs_embeds[:, run_start:run_end]
        out = self(
            ids,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            past_key_values=past,
            use_cache=use_cache,
            replace_position=replace,
            logits_range=(need_lo - run_start, max(need_hi, need_lo + 1) - run_start),
        )
        logits = out.logits
        if s and logits_start == 0:
            logits = torch.cat([logits[:, :1], logits], dim=1)
        return ModelOutput(logits=logits[:, : logits_end - logits_start], past_key_values=out.past_key_values)
