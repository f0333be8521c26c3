"""The embeddings input path of all four families: ``inputs_embeds=model.embed(ids)`` gives the ids' logits
bit for bit (``torch.equal``), without a cache and with each cache the family has, in float32 and bfloat16,
for batches with left padding; and the embedding API policies use (``input_embeddings``, ``embed``,
``mask_embedding``)."""

from __future__ import annotations

import pytest
import torch

from fewstep.models import load_model
from fewstep.models.block import block_causal_mask
from tests.parity.fixtures import BLOCK_DIRS, DEFAULT_DIRS

FIXTURES = {d.name: d for d in DEFAULT_DIRS + BLOCK_DIRS}
DTYPES = ["float32", "bfloat16"]


@pytest.fixture(scope="module", params=[(name, dt) for name in sorted(FIXTURES) for dt in DTYPES], ids=str)
def model(request):
    name, dtype = request.param
    return load_model(FIXTURES[name], dtype=dtype).eval()


def _batch(model, lengths=(23, 31, 40), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded canvases with masks in their second half, and their padding mask."""
    g = torch.Generator().manual_seed(seed)
    width, cfg = max(lengths), model.config
    ids = torch.full((len(lengths), width), cfg.pad_token_id, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        row = torch.randint(0, 100, (n,), generator=g)
        row[n // 2 :: 3] = cfg.mask_token_id
        ids[i, width - n :], am[i, width - n :] = row, 1
    return ids, am


def _same(a, b) -> None:
    """Logits (or caches) equal bit for bit; the message names the largest difference if they are not."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"max |diff| {(a.float() - b.float()).abs().max().item():.3g}"
        return
    for (ka, va), (kb, vb) in zip(a, b, strict=True):
        _same(ka, kb)
        _same(va, vb)


def _clone(cache):
    return type(cache)([(k.clone(), v.clone()) for k, v in cache.layers])


@torch.no_grad()
def test_no_cache_and_the_returned_cache(model):
    ids, am = _batch(model)
    a = model(ids, attention_mask=am, use_cache=True)
    b = model(inputs_embeds=model.embed(ids), attention_mask=am, use_cache=True)
    _same(a.logits, b.logits)
    _same(a.past_key_values, b.past_key_values)
    unpadded = ids[2:]  # the longest row: no padding, no mask passed at all
    _same(model(unpadded).logits, model(inputs_embeds=model.embed(unpadded)).logits)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["none", "prefix", "dual"])
def test_denoise_every_cache_mode(model, mode):
    """``denoise`` with a prefix or dual cache (LLaDA, Dream: Fast-dLLM's caches; LLaDA2, SDAR: the exact
    cache of committed blocks in prefix mode; dual runs the window against the whole canvas's cache)."""
    ids, am = _batch(model, seed=1)
    start, end = 24, 32
    cache = model(ids, attention_mask=am, use_cache=True).past_key_values if mode != "none" else None
    kw = dict(start=start, end=end, cache_mode=mode, logits_start=start, logits_end=end)
    a = model.denoise(ids, am, cache=None if cache is None else _clone(cache), **kw)
    b = model.denoise(None, am, inputs_embeds=model.embed(ids), cache=None if cache is None else _clone(cache), **kw)
    _same(a.logits, b.logits)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_forward_with_cache(model, mode):
    ids, am = _batch(model, seed=2)
    start, end = 16, 24
    cache = model(ids, attention_mask=am, use_cache=True).past_key_values
    if mode == "prefix":
        run, kw = slice(start, None), dict(past_key_values=cache.truncate(start), use_cache=True)
    else:
        replace = torch.zeros(ids.shape, dtype=torch.bool)
        replace[:, start:end] = True
        run, kw = slice(start, end), dict(replace_position=replace)
    fresh = (lambda: {**kw, "past_key_values": _clone(cache)}) if mode == "dual" else (lambda: kw)
    a = model(ids[:, run], attention_mask=am, **fresh())
    b = model(inputs_embeds=model.embed(ids[:, run]), attention_mask=am, **fresh())
    _same(a.logits, b.logits)
    if mode == "prefix":
        _same(a.past_key_values, b.past_key_values)


@pytest.fixture(scope="module", params=[(d.name, dt) for d in BLOCK_DIRS for dt in DTYPES], ids=str)
def block_model(request):
    name, dtype = request.param
    return load_model(FIXTURES[name], dtype=dtype).eval()


@torch.no_grad()
def test_block_cache_with_explicit_mask(block_model):
    """The engine's block-diffusion call (``decoding.forward.block_forward``, LLaDA2 and SDAR): cached
    committed blocks, the current block run with explicit positions and an explicit block-causal mask."""
    model = block_model
    B = model.block_length
    ids, _ = _batch(model, lengths=(3 * B, 3 * B), seed=3)
    done, block = ids[:, : 2 * B], ids[:, 2 * B :]
    cache_a = model(done, use_cache=True).past_key_values
    cache_b = model(inputs_embeds=model.embed(done), use_cache=True).past_key_values
    _same(cache_a, cache_b)
    pos = torch.arange(2 * B, 3 * B)[None].expand(2, -1)
    keys = torch.arange(3 * B)[None].expand(2, -1)
    mask = block_causal_mask(pos, keys, None, B)
    kw = dict(attention_mask=mask, position_ids=pos, use_cache=True)
    a = model(block, past_key_values=cache_a, **kw)
    b = model(inputs_embeds=model.embed(block), past_key_values=cache_b, **kw)
    _same(a.logits, b.logits)
    _same(a.past_key_values, b.past_key_values)


@torch.no_grad()
def test_embedding_api(model):
    ids, _ = _batch(model)
    table = model.input_embeddings()
    assert table is model.stack()[0].weight  # the parameter itself, no copy
    assert table.shape[1] == model.embed(ids).shape[-1] and table.dtype == model.dtype
    _same(model.embed(ids), table[ids])
    _same(model.mask_embedding(), table[model.config.mask_token_id])


@torch.no_grad()
def test_embeddings_are_the_input(model):
    """The path really feeds the network: a row whose position 5 holds the mask embedding gives the logits
    of the ids with the mask there, and a mix of two embeddings gives neither's logits."""
    ids, _ = _batch(model, lengths=(20,), seed=4)
    emb = model.embed(ids)
    masked_ids = ids.clone()
    masked_ids[0, 5] = model.config.mask_token_id
    emb[0, 5] = model.mask_embedding()
    _same(model(inputs_embeds=emb).logits, model(masked_ids).logits)
    emb[0, 5] = 0.5 * model.mask_embedding() + 0.5 * model.embed(ids[0, 5])
    soft = model(inputs_embeds=emb).logits
    assert not torch.equal(soft, model(ids).logits) and not torch.equal(soft, model(masked_ids).logits)


def test_exactly_one_input(model):
    ids, _ = _batch(model, lengths=(8,))
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.embed(ids))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="exactly one"):
        model.denoise(None)
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[B, T"):
        model(inputs_embeds=torch.zeros(1, 8, 3))


def test_fixtures_cover_all_four_families():
    assert {load_model(d).architecture for d in FIXTURES.values()} == {"llada", "dream", "llada2", "sdar"}
