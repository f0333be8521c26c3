"""A row's logits and tokens are the ones it gets alone in any ragged (padded) batch: bfloat16 and float32.

The batched forwards pad rows of different lengths (full: left padding; prefix/dual: cached columns left-
and run columns right-padded; block models: an explicit block-causal mask). A masked attention call over
the padded keys sums each row's keys in blocks aligned to the padded layout, so its rounding depends on
the padding (in bfloat16 most rows' logits changed, enough to change tokens); the models run each row
layout's attention apart instead (:class:`fewstep.models.base.RaggedMask`). Checked bit for bit on the
first-forward logits of every cache mode and family, and on decoded tokens and NFE through the engine.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch

from fewstep.decoding.engine import Engine, Request
from fewstep.decoding.forward import BlockRun, Seqs, block_forward, dual_forward, full_forward, prefix_forward
from fewstep.models.base import RaggedMask, RowGroup
from fewstep.models.layers import ragged_attention, silu
from fewstep.models.loading import load_model
from tests.parity.fixtures import BLOCK_DIRS, DEFAULT_DIRS, model

SHIPPED = Path(__file__).resolve().parents[2] / "src" / "fewstep" / "assets" / "models" / "dparallel"
DTYPES = [torch.bfloat16, torch.float32]


def student(dtype: torch.dtype):
    return load_model(SHIPPED, dtype=dtype)


def own(shared, dtype: torch.dtype):
    """A copy of a cached fixture model in ``dtype`` (``Module.to`` would convert the shared one in place)."""
    return copy.deepcopy(shared).to(dtype)


def ragged_prompts(vocab: int, n: int, seed: int, lo: int = 3, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def first_blocks(prompts, gen: int, block: int, mask: int) -> list[Seqs]:
    return [Seqs(torch.tensor(p + [mask] * gen)[None], None, len(p), len(p) + block) for p in prompts]


def assert_rows_equal(alone: list[torch.Tensor], together: list[torch.Tensor], what: str) -> None:
    differ = [i for i, (a, t) in enumerate(zip(alone, together)) if not torch.equal(a, t)]
    worst = max((float((a.float() - t.float()).abs().max()) for a, t in zip(alone, together)), default=0.0)
    assert not differ, f"{what}: rows {differ} of {len(alone)} differ alone vs batched (max |diff| {worst:.3g})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", ["student", "llada", "dream"])
@torch.no_grad()
def test_full_prefix_dual_logits_equal_alone(which, dtype):
    """Every row of a ragged batch: the same logits, bit for bit, as alone (full forward, then prefix and dual
    cached forwards against its own cache)."""
    m = student(dtype) if which == "student" else own(model(DEFAULT_DIRS[which == "dream"]), dtype)
    mask, vocab = int(m.config.mask_token_id), min(int(m.config.vocab_size), 30)
    for seed, (gen, block) in enumerate([(32, 16), (16, 8), (8, 4)]):
        seqs = first_blocks(ragged_prompts(vocab, 12, seed), gen, block, mask)
        together, caches = full_forward(m, seqs, 0, True)
        alone = [full_forward(m, [s], 0, True) for s in seqs]
        assert_rows_equal([a[0][0] for a in alone], together, f"{which} full forward, seed {seed}")
        for a, c in zip(alone, caches):  # the caches the batched forward returns are each row's own
            assert all(torch.equal(x, y) for kv, kv2 in zip(a[1][0].layers, c.layers) for x, y in zip(kv, kv2))
        cached = [Seqs(s.x, a[1][0], s.start, s.end) for s, a in zip(seqs, alone)]
        for fn in (prefix_forward, dual_forward):
            assert_rows_equal([fn(m, [s], 0)[0] for s in cached], fn(m, cached, 0), f"{which} {fn.__name__}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fixture", [d.name for d in BLOCK_DIRS])
@torch.no_grad()
def test_block_models_logits_equal_alone(fixture, dtype):
    """Block-causal rows of different lengths and block sizes, uncached and against their own caches."""
    m = own(model(next(d for d in BLOCK_DIRS if d.name == fixture)), dtype)
    mask, vocab = int(m.config.mask_token_id), int(m.config.vocab_size) - 10
    rng = random.Random(3)
    runs = []
    for p in ragged_prompts(vocab, 8, 3):
        block = rng.choice([4, 8])
        n, s = -(-(len(p) + 16) // block) * block, len(p) // block * block
        runs.append(
            BlockRun(torch.tensor(p + [mask] * (n - len(p)))[None, : s + block], None, 0, block, (s, s + block), True)
        )
    together, _ = block_forward(m, runs, 0)
    alone = [block_forward(m, [r], 0) for r in runs]
    assert_rows_equal([a[0][0] for a in alone], together, f"{fixture} uncached")
    nxt = [BlockRun(torch.full((1, r.block_length), mask), a[1][0], r.x.shape[1], r.block_length,
                    (0, r.block_length), False) for r, a in zip(runs, alone)]  # fmt: skip
    assert_rows_equal([block_forward(m, [r], 0)[0][0] for r in nxt], block_forward(m, nxt, 0)[0], f"{fixture} cached")


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_bf16_ragged_batch_decodes_as_alone(cache):
    """Through the engine in bfloat16: ragged prompts in one padded call per round give every request the
    tokens and NFE it gets alone (sampled rows with their own seeds too)."""
    m = student(torch.bfloat16)
    prompts = ragged_prompts(30, 10, 7)
    specs = ["threshold:0.9", "llada:steps=16", "entropy:0.5", "threshold:threshold=0.8,temperature=0.7"]

    def requests():
        return [Request(p, policy=specs[i % len(specs)], gen_length=32, block_length=16, cache=cache, seed=i, id=i)
                for i, p in enumerate(prompts)]  # fmt: skip

    alone = Engine(m, max_batch=1).run(requests())
    engine = Engine(m, max_batch=len(prompts), max_padding=float("inf"))  # every length in one padded call
    together = engine.run(requests())
    for a, t in zip(alone, together):
        assert (t.answer, t.nfe, t.decode_step) == (a.answer, a.nfe, a.decode_step), f"request {a.id} ({cache})"
    assert engine.forward_calls < sum(r.nfe for r in alone) / 2  # the rows really shared calls


def test_ragged_attention_groups_rows_and_leaves_pads_zero():
    """Rows of one layout share one call; each row's real queries get the attention over its real keys (the key
    runs joined in order), pad queries zeros."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 6, 4, generator=g) for _ in range(3))
    groups = [RowGroup((0, 2), (1, 6), ((1, 6),)), RowGroup((2, 3), (0, 3), ((0, 2), (4, 6)))]
    out = ragged_attention(q, k, v, RaggedMask(groups))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert torch.equal(out[:2, :, 1:], sdpa(q[:2, :, 1:], k[:2, :, 1:], v[:2, :, 1:]))
    kk, vv = (torch.cat([t[2:, :, 0:2], t[2:, :, 4:6]], 2) for t in (k, v))
    assert torch.equal(out[2:, :, :3], sdpa(q[2:, :, :3], kk, vv))
    assert not out[:2, :, :1].any() and not out[2:, :, 3:].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_of_a_row_does_not_depend_on_the_rows_after_it(dtype):
    """An odd number of 336-wide rows leaves a scalar tail in torch's vectorised SiLU (one ulp off); the
    padded SiLU gives each row the same values alone and in any batch."""
    x = torch.randn(9, 336, generator=torch.Generator().manual_seed(1)).to(dtype)
    full = silu(x)
    for n in (1, 3, 5):
        assert torch.equal(silu(x[:n].clone()), full[:n])
    assert torch.allclose(full.float(), torch.nn.functional.silu(x).float(), rtol=1e-2, atol=1e-6)
