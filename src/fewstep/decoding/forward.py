"""Batched forwards over rows that sit at different places: one model call per kind of forward.

The engine's rows each have their own canvas length ``N`` (prompt + answer), their own current block
``[s, e)`` and their own KV cache (``[n_seq, H, N, D]`` per layer, ``n_seq`` = 2 with CFG). A round
runs at most three calls, one per kind:

* **full** (cache ``none``, and the first forward of a block in ``prefix``/``dual``, which also
  returns the row's cache): canvases **left-padded** to the longest, so every real column keeps the
  position it has alone; logits for the union of the rows' block windows, sliced per row;
* **prefix** (cached forward, Fast-dLLM prefix cache): the cached columns ``[0, s)`` are left-padded
  to the longest cache and the run columns ``[s, N)`` right-padded to the longest suffix, so every
  row's block starts at the same column of the padded layout;
* **dual** (cached forward, dual cache): cached prefix left-padded, the block window right-padded to
  the longest block, then the row's cached suffix, right-padded: the window (the columns replaced in
  the cache) is the same for every row, as the model's dual mode requires. The model writes the
  window's fresh keys/values into the padded copy before attending, exactly what it does in the
  row's own cache alone; since every dual forward rewrites the whole window, the row's cache (from the
  block's first, full forward) is never modified.

Block-diffusion models (``model.block_diffusion``) take a fourth kind, **block** (:func:`block_forward`):
every row runs a span of its canvas (the whole canvas up to its block without a cache; with the exact
cache of committed blocks, the prompt prefill, its current block, or the store forward of a completed
block) against its cache; cached columns left-padded, run columns right-padded, explicit positions and an
explicit block-causal mask built per row (each row with its own block length), so prefill, denoising and
store forwards of rows at any block share one call.

A row may run its window on input embeddings instead of its ids (``Seqs.embeds`` / ``BlockRun.embeds``:
a policy's soft embeddings): the call then runs on ``model.embed(ids)`` with those rows' window columns
replaced, which gives every other row its ids' logits bit for bit (``docs/models.md``, "Embeddings input").

Every pad is a zero of the attention mask (keys never seen) and sits either before all of a row's real
columns or after its queries, so the RoPE positions of every query equal the row's own, alone. When no
row is padded no mask is passed at all: a batch of equal rows runs exactly the call a row runs alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.models.base import KVCache


@dataclass
class Seqs:
    """The sequences one row contributes to a call: its canvas, and with CFG its unconditional copy."""

    x: torch.Tensor  # [n_seq, N]
    kv: KVCache | None  # [n_seq, H, N, D] per layer (cached kinds)
    start: int  # block start column s
    end: int  # block end column e
    embeds: torch.Tensor | None = None  # [L, D] the window's input embeddings (None: its ids)
    # prefix kind: the cached columns the row's run starts after (None: s - logit_shift, the block's own cut);
    # a spanning policy's cache may stop before its window
    cut: int | None = None
    # prefix kind, logit_shift 1 (quirk): the run starts at ``cut`` itself and a window starting there takes
    # that column's own output as its prediction (d3LLM's Dream cached sampler)
    own_first: bool = False


def _place(parts: list[tuple[torch.Tensor, int]], width: int, n: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids ``[n, width]`` and mask from ``(tensor [n, w], column)`` parts (pad elsewhere)."""
    device = parts[0][0].device
    ids = torch.full((n, width), pad, dtype=torch.long, device=device)
    am = torch.zeros((n, width), dtype=torch.long, device=device)
    for t, col in parts:
        ids[:, col : col + t.shape[1]] = t
        am[:, col : col + t.shape[1]] = 1
    return ids, am


def _stack(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.cat([r[0] for r in rows])
    am = torch.cat([r[1] for r in rows])
    return ids, (None if bool(am.all()) else am)


def _padded_cache(seqs: list[Seqs], layout: list[list[tuple[int, int, int]]], width: int) -> KVCache:
    """A batched cache ``[sum n_seq, H, width, D]`` with each row's cached columns ``(src, dst, len)`` copied in."""
    layers = []
    for li in range(len(seqs[0].kv)):
        k0, v0 = seqs[0].kv[li]
        n = sum(s.x.shape[0] for s in seqs)
        k = k0.new_zeros((n, k0.shape[1], width, k0.shape[3]))
        v = v0.new_zeros((n, v0.shape[1], width, v0.shape[3]))
        j = 0
        for s, spans in zip(seqs, layout):
            rk, rv = s.kv[li]
            m = rk.shape[0]
            for src, dst, length in spans:
                k[j : j + m, :, dst : dst + length] = rk[:, :, src : src + length]
                v[j : j + m, :, dst : dst + length] = rv[:, :, src : src + length]
            j += m
        layers.append((k, v))
    return KVCache(layers)


def _same_geometry(seqs: list[Seqs]) -> bool:
    """Whether every row has the same canvas length, block and cut (then nothing needs padding)."""
    return len({(s.x.shape[1], s.start, s.end, s.cut, s.own_first) for s in seqs}) == 1


def _joined_cache(seqs: list[Seqs], width: int) -> KVCache:
    """The rows' caches (first ``width`` columns) stacked on the batch dimension; one row's cache is used as is."""
    if len(seqs) == 1:
        return seqs[0].kv.truncate(width)
    layers = zip(*(s.kv.layers for s in seqs))
    return KVCache(
        [(torch.cat([k[:, :, :width] for k, _ in kv]), torch.cat([v[:, :, :width] for _, v in kv])) for kv in layers]
    )


def _inputs(model, ids: torch.Tensor, places: list[tuple[tuple[int, int], int, torch.Tensor | None]]):
    """The model's input for ``ids``: ``(ids, {})``, or ``(None, {"inputs_embeds": ...})`` when a row has its own
    embeddings; ``places`` holds per row ``((first, end) batch rows, column of its window, [l, D] or None)``."""
    if all(e is None for _, _, e in places):
        return ids, {}
    x = model.embed(ids)
    for (a, b), col, e in places:
        if e is not None:
            x[a:b, col : col + e.shape[0]] = e.to(x.dtype)
    return None, {"inputs_embeds": x}


def _rows(seqs: list[Seqs] | list[BlockRun]) -> list[tuple[int, int]]:
    """The batch rows ``[a, b)`` of each row's sequences in a call."""
    out, j = [], 0
    for s in seqs:
        out.append((j, j + s.x.shape[0]))
        j += s.x.shape[0]
    return out


def _split_logits(logits: torch.Tensor, seqs: list[Seqs], offsets: list[int]) -> list[torch.Tensor]:
    """Per row: its ``[n_seq, L, V]`` block logits, the row's window starting at ``offsets[i]``."""
    out, j = [], 0
    for s, off in zip(seqs, offsets):
        m, L = s.x.shape[0], s.end - s.start
        out.append(logits[j : j + m, off : off + L])
        j += m
    return out


def full_forward(model, seqs: list[Seqs], pad: int, want_cache: bool) -> tuple[list[torch.Tensor], list]:
    """Whole-canvas forward (left padding). Returns per-row logits and, with ``want_cache``, per-row caches."""
    n_max = max(s.x.shape[1] for s in seqs)
    if len({s.x.shape[1] for s in seqs}) == 1:
        ids, am = torch.cat([s.x for s in seqs]), None
    else:
        ids, am = _stack([_place([(s.x, n_max - s.x.shape[1])], n_max, s.x.shape[0], pad) for s in seqs])
    offs = [n_max - s.x.shape[1] for s in seqs]
    lo = min(o + s.start for o, s in zip(offs, seqs))
    hi = max(o + s.end for o, s in zip(offs, seqs))
    ids, emb = _inputs(model, ids, [(j, o + s.start, s.embeds) for j, o, s in zip(_rows(seqs), offs, seqs)])
    out = model.denoise(ids, am, start=lo, end=hi, use_cache=want_cache, logits_start=lo, logits_end=hi, **emb)
    logits = _split_logits(out.logits, seqs, [o + s.start - lo for o, s in zip(offs, seqs)])
    caches: list = [None] * len(seqs)
    if want_cache:
        j = 0
        for i, (s, o) in enumerate(zip(seqs, offs)):
            m = s.x.shape[0]
            caches[i] = KVCache(
                [(k[j : j + m, :, o:].clone(), v[j : j + m, :, o:].clone()) for k, v in out.past_key_values]
            )
            j += m
    return logits, caches


def prefix_forward(model, seqs: list[Seqs], pad: int) -> list[torch.Tensor]:
    """Prefix-cached forward: each row's cached columns ``[0, cut)`` left-padded, its columns from there on
    right-padded (cut: ``s - shift``, or the row's own ``Seqs.cut``). Returns per-row window logits."""
    return _prefix(model, seqs, pad, False)[0]


def prefix_store_forward(model, seqs: list[Seqs], pad: int) -> tuple[list[torch.Tensor], list[KVCache]]:
    """:func:`prefix_forward` that also returns each row's cache after it: its cached columns followed by the
    keys/values of its run (a spanning policy keeps the prefix it plans from them)."""
    return _prefix(model, seqs, pad, True)


def _prefix(model, seqs: list[Seqs], pad: int, want_cache: bool) -> tuple[list[torch.Tensor], list]:
    sh = model.logit_shift
    cut = [s.start - sh if s.cut is None else (s.cut if s.own_first and sh else s.cut - sh) for s in seqs]
    C = max(cut)
    Q = max(s.x.shape[1] - c for s, c in zip(seqs, cut))
    placed = [_place([(s.x[:, :c], C - c), (s.x[:, c:], C)], C + Q, s.x.shape[0], pad) for s, c in zip(seqs, cut)]
    ids, am = _stack(placed)
    if _same_geometry(seqs):
        cache = _joined_cache(seqs, C)
    else:
        cache = _padded_cache(seqs, [[(0, C - c, c)] for c in cut], C)
    # a quirk row whose window starts at its cut takes the logits of the next column for that column too
    dup = [int(s.own_first and sh > 0 and s.start == c) for s, c in zip(seqs, cut)]
    first = [C + s.start - c + d for s, c, d in zip(seqs, cut, dup)]
    lo, hi = min(first), max(C + s.end - c for s, c in zip(seqs, cut))
    ids, emb = _inputs(model, ids, [(j, C + s.start - c, s.embeds) for j, s, c in zip(_rows(seqs), seqs, cut)])
    out = model.denoise(
        ids,
        am,
        start=C + sh,
        cache=cache,
        cache_mode="prefix",
        use_cache=want_cache,
        logits_start=lo,
        logits_end=hi,
        **emb,
    )
    logits, caches, j = [], [], 0
    for s, c, d, f in zip(seqs, cut, dup, first):
        m, L = s.x.shape[0], s.end - s.start
        z = out.logits[j : j + m, f - lo : f - lo + L - d]
        logits.append(torch.cat([z[:, :1], z], 1) if d else z)
        if want_cache:
            n = s.x.shape[1]
            caches.append(
                KVCache(
                    [
                        (k[j : j + m, :, C - c : C - c + n], v[j : j + m, :, C - c : C - c + n])
                        for k, v in out.past_key_values
                    ]
                )
            )
        else:
            caches.append(None)
        j += m
    return logits, caches


def dual_forward(model, seqs: list[Seqs], pad: int) -> list[torch.Tensor]:
    """Dual-cached forward over aligned block windows (the row's own cache is only read: every dual forward
    rewrites the whole window before attending, so the refreshed window never has to outlive the call)."""
    sh = model.logit_shift
    a = [s.start - sh for s in seqs]
    w = [s.end - s.start + sh for s in seqs]
    r = [s.x.shape[1] - s.end for s in seqs]
    A, W, R = max(a), max(w), max(r)
    placed = [
        _place([(s.x[:, :ai], A - ai), (s.x[:, ai : s.end], A), (s.x[:, s.end :], A + W)], A + W + R, s.x.shape[0], pad)
        for s, ai in zip(seqs, a)
    ]
    ids, am = _stack(placed)
    if _same_geometry(seqs):
        cache = _joined_cache(seqs, A + W + R)
    else:  # the window's columns need no copy: the model overwrites them before attending
        cache = _padded_cache(seqs, [[(0, A - ai, ai), (s.end, A + W, ri)] for s, ai, ri in zip(seqs, a, r)], A + W + R)
    L = max(s.end - s.start for s in seqs)
    ids, emb = _inputs(model, ids, [(j, A + sh, s.embeds) for j, s in zip(_rows(seqs), seqs)])
    out = model.denoise(
        ids,
        am,
        start=A + sh,
        end=A + W,
        cache=cache,
        cache_mode="dual",
        logits_start=A + sh,
        logits_end=A + sh + L,
        **emb,
    )
    return _split_logits(out.logits, seqs, [0] * len(seqs))


@dataclass
class BlockRun:
    """One row's part of a block-diffusion call (:func:`block_forward`)."""

    x: torch.Tensor  # [n_seq, T] the canvas columns run through the network
    kv: KVCache | None  # the cache of the committed blocks before them (None: nothing cached)
    start: int  # the absolute position of x's first column (from the row's first real token)
    block_length: int
    logits: tuple[int, int] | None  # columns of x whose logits are wanted (None: none)
    store: bool  # return the row's cache after the call (its kv followed by x's keys/values)
    keep: int | None = None  # with store: keep only x's first ``keep`` columns in the returned cache
    embeds: tuple[int, torch.Tensor] | None = None  # (column of x, [l, D]): run those columns on embeddings


def _block_mask(runs: list[BlockRun], C: int, Q: int) -> torch.Tensor:
    """``[n, 1, Q, C + Q]`` bool: each row's cached columns, and its run columns in the same or an earlier block."""
    n = sum(r.x.shape[0] for r in runs)
    device = runs[0].x.device
    mask = torch.zeros((n, 1, Q, C + Q), dtype=torch.bool, device=device)
    j = 0
    for r in runs:
        m, T = r.x.shape
        c = 0 if r.kv is None else r.kv.length
        blk = torch.div(torch.arange(r.start, r.start + T, device=device), r.block_length, rounding_mode="floor")
        mask[j : j + m, :, :, C - c : C] = True  # the cache holds committed earlier blocks only
        mask[j : j + m, :, :T, C : C + T] = blk[None, :] <= blk[:, None]
        mask[j : j + m, :, T:, C : C + T] = True  # pad queries (discarded) attend to real keys: no empty rows
        j += m
    return mask


def block_forward(model, runs: list[BlockRun], pad: int) -> tuple[list[torch.Tensor | None], list[KVCache | None]]:
    """One block-causal call over ``runs``; per row its ``[n_seq, l, V]`` logits and (``store``) its new cache.

    A row's queries see exactly what they see alone: its own cached keys and the keys of its run columns
    allowed by block-causal attention, at its own positions (explicit, so a cache with a gap, SDAR's
    unstored blocks, keeps the positions it has alone)."""
    C = max(0 if r.kv is None else r.kv.length for r in runs)
    Q = max(r.x.shape[1] for r in runs)
    n = sum(r.x.shape[0] for r in runs)
    device = runs[0].x.device
    ids = torch.full((n, Q), pad, dtype=torch.long, device=device)
    pos = torch.empty((n, Q), dtype=torch.long, device=device)
    j = 0
    for r in runs:
        m, T = r.x.shape
        ids[j : j + m, :T] = r.x
        pos[j : j + m] = (torch.arange(Q, device=device).clamp(max=T - 1) + r.start)[None]
        j += m
    cache = None
    if C:
        lens = [0 if r.kv is None else r.kv.length for r in runs]
        if len(runs) == 1:
            cache = runs[0].kv
        else:
            seqs = [Seqs(r.x, r.kv if r.kv is not None else _empty_like(runs, r.x.shape[0]), 0, 0) for r in runs]
            cache = _padded_cache(seqs, [[(0, C - c, c)] if c else [] for c in lens], C)
    want = [r.logits for r in runs if r.logits is not None]
    lo, hi = (min(a for a, _ in want), max(b for _, b in want)) if want else (0, 1)
    store = any(r.store for r in runs)
    ids, emb = _inputs(model, ids, [(j, *(r.embeds or (0, None))) for j, r in zip(_rows(runs), runs)])
    out = model(
        ids,
        **emb,
        attention_mask=_block_mask(runs, C, Q),
        position_ids=pos,
        past_key_values=cache,
        use_cache=store,
        logits_range=(lo, hi),
    )
    logits: list[torch.Tensor | None] = []
    caches: list[KVCache | None] = []
    j = 0
    for r in runs:
        m, T = r.x.shape
        c = 0 if r.kv is None else r.kv.length
        logits.append(None if r.logits is None else out.logits[j : j + m, r.logits[0] - lo : r.logits[1] - lo])
        if r.store:
            t = T if r.keep is None else r.keep
            kv = [
                (k[j : j + m, :, C - c : C + t].clone(), v[j : j + m, :, C - c : C + t].clone())
                for k, v in out.past_key_values
            ]
            caches.append(KVCache(kv))
        else:
            caches.append(None)
        j += m
    return logits, caches


def _empty_like(runs: list[BlockRun], m: int) -> KVCache:
    """An empty cache shaped like the others (a row with nothing cached in a call that has a cache)."""
    ref = next(r.kv for r in runs if r.kv is not None)
    return KVCache([(k[:1, :, :0].expand(m, -1, -1, -1), v[:1, :, :0].expand(m, -1, -1, -1)) for k, v in ref.layers])
