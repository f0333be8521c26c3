"""LLaDA2-MoE and SDAR beyond the oracles: block-causal structure, batched MoE, saving, LoRA roles, policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fewstep.decoding.policies import LLaDA2Policy, SDARPolicy, parse_policy
from fewstep.decoding.policies.base import RowRNG, StepState
from fewstep.models import load_model, save_model
from fewstep.train.lora import LoraSpec, apply_lora, target_modules

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LLADA2, SDAR = FIXTURES / "llada2-tiny-a", FIXTURES / "sdar-tiny-a"


@pytest.fixture(scope="module")
def llada2():
    return load_model(LLADA2, dtype="float32")


@pytest.mark.parametrize("folder", [LLADA2, SDAR], ids=["llada2", "sdar"])
def test_block_causal_structure(folder):
    m = load_model(folder, dtype="float32")
    B = 8
    ids = torch.randint(0, 40, (1, 4 * B), generator=torch.Generator().manual_seed(0))
    later, same = ids.clone(), ids.clone()
    later[0, 2 * B + 1] = 41  # a token of block 2
    same[0, B + 3] = 41  # a token of block 1
    with torch.no_grad():
        base, a, b = (m(x, block_length=B).logits for x in (ids, later, same))
    torch.testing.assert_close(a[:, : 2 * B], base[:, : 2 * B], atol=0, rtol=0)  # earlier blocks never see it
    assert (a[:, 2 * B :] - base[:, 2 * B :]).abs().max() > 1e-3
    assert (b[:, B : 2 * B] - base[:, B : 2 * B]).abs().max() > 1e-3  # its whole block sees it
    with torch.no_grad():
        full = m(ids, block_length=0).logits
    assert (full[:, :B] - base[:, :B]).abs().max() > 1e-3  # full attention differs


def test_batched_moe_equals_per_expert_loop(llada2):
    moe = next(layer.mlp for layer in llada2.model.layers if hasattr(layer.mlp, "experts"))
    x = torch.randn(3, 17, llada2.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = moe(x)
        flat = x.reshape(-1, x.shape[-1])
        idx, w = moe.gate(flat)
        loop = torch.zeros_like(flat)
        for e in range(llada2.config.num_experts):  # the naive per-expert loop over a token mask
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if len(rows):
                loop.index_add_(0, rows, moe.experts[e](flat[rows]) * w[rows, slot, None])
        loop = loop + moe.shared_experts(flat)
    torch.testing.assert_close(batched, loop.view_as(x), atol=1e-5, rtol=1e-5)
    assert moe._stacked, "the inference path should use the stacked grouped-matmul weights"


def test_router_is_group_limited(llada2):
    cfg = llada2.config
    gate = next(layer.mlp.gate for layer in llada2.model.layers if hasattr(layer.mlp, "gate"))
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    idx, w = gate(x)
    groups = idx // (cfg.num_experts // cfg.n_group)
    assert all(len(set(g.tolist())) <= cfg.topk_group for g in groups)
    torch.testing.assert_close(w.sum(-1), torch.full((64,), cfg.routed_scaling_factor), atol=1e-5, rtol=0)


@pytest.mark.parametrize("folder", [LLADA2, SDAR], ids=["llada2", "sdar"])
def test_save_keeps_official_layout(folder, tmp_path):
    m = load_model(folder, dtype="float32")
    save_model(m, tmp_path)
    keys = lambda f: set(safe_open(str(f), "pt").keys())  # noqa: E731
    assert keys(tmp_path / "model.safetensors") == keys(folder / "model.safetensors")
    official, saved = (json.loads((d / "config.json").read_text()) for d in (folder, tmp_path))
    for k in ("model_type", "architectures", "hidden_size", "num_hidden_layers", "head_dim", "num_key_value_heads"):
        assert saved[k] == official[k], k
    assert set(official) - set(saved) <= {"torch_dtype"}


def test_lora_roles_cover_attention_and_experts_not_router(llada2):
    cfg = llada2.config
    names = target_modules(llada2, ("q", "o", "gate", "up", "down"))
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    experts = [n for n in names if ".experts." in n]
    assert len(experts) == 3 * cfg.num_experts * moe_layers
    assert sum(n.endswith("query_key_value") for n in names) == cfg.num_hidden_layers
    assert sum(n.endswith("attention.dense") for n in names) == cfg.num_hidden_layers
    assert sum(".shared_experts." in n for n in names) == 3 * moe_layers
    assert not any(n.endswith("mlp.gate") for n in names)
    sdar = load_model(SDAR, dtype="float32")
    assert len(target_modules(sdar, ("q", "k", "v", "o", "gate", "up", "down"))) == 7 * sdar.config.num_hidden_layers


def test_lora_trains_experts_through_the_per_expert_path():
    m = load_model(LLADA2, dtype="float32")
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = m(ids).logits
    peft_model = apply_lora(m, LoraSpec(r=2, alpha=2, roles=("gate", "up", "down")))
    out = peft_model(input_ids=ids).logits
    torch.testing.assert_close(out, base, atol=1e-5, rtol=0)  # LoRA B starts at zero
    out.float().pow(2).mean().backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if ".experts." in n and "lora_B" in n]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    assert not any("mlp.gate." in n and p.requires_grad for n, p in peft_model.named_parameters() if "lora" in n)


def _state(tokens, mask_id, block_length, gen_length=32, step=0):
    t = torch.tensor([tokens])
    return StepState(
        tokens=t,
        mask=t == mask_id,
        step=torch.tensor([step]),
        rows=torch.tensor([0]),
        block=0,
        num_blocks=1,
        block_length=block_length,
        gen_length=gen_length,
        gen_masked=(t == mask_id).sum(-1),
        mask_id=mask_id,
        eos_ids=(),
        rng=RowRNG(None, torch.device("cpu")),
    )


def _logits(probs_rows, vocab=5):
    out = []
    for token, p in probs_rows:
        row = torch.full((vocab,), (1 - p) / (vocab - 1)).log()
        row[token] = torch.tensor(p).log()
        out.append(row)
    return torch.stack(out)[None]


def test_llada2_rule_threshold_adds_to_the_schedule():
    pol = LLaDA2Policy(threshold=0.9, steps=2)
    st = _state([9, 9, 9, 9], 9, 4)
    st.memory = pol.start_block(st)  # schedule 2, 2
    sel = pol.select(_logits([(1, 0.95), (2, 0.97), (3, 0.99), (0, 0.5)]), st)
    assert sel.commit[0].tolist() == [True, True, True, False]  # 3 above the threshold >= 2: all of them
    sel = pol.select(_logits([(1, 0.95), (2, 0.3), (3, 0.4), (0, 0.5)]), st)
    assert sel.commit[0].tolist() == [True, False, False, True]  # only 1 above: top-2 fallback


def test_sdar_default_never_overwrites_but_quirk_does():
    st = _state([7, 7, 7, 9], 9, 4)  # one mask left, schedule asks for 4 in one step
    logits = _logits([(1, 0.9), (2, 0.9), (3, 0.9), (4, 0.6)])
    for strategy in ("low_confidence_static", "low_confidence_dynamic"):
        pol = SDARPolicy(remasking_strategy=strategy, denoising_steps=1)
        st.memory = pol.start_block(st)
        assert pol.select(logits, st).commit[0].tolist() == [False, False, False, True]
        quirky = SDARPolicy(remasking_strategy=strategy, denoising_steps=1, quirk_uncapped_topk=True)
        sel = quirky.select(logits, st)
        assert sel.commit[0].all() and sel.tokens[0].tolist() == [1, 2, 3, 4]


def test_policy_specs():
    assert parse_policy("llada2:0.9") == LLaDA2Policy(threshold=0.9)
    assert parse_policy("sdar:entropy_bounded") == SDARPolicy(remasking_strategy="entropy_bounded")
    with pytest.raises(ValueError, match="remasking_strategy"):
        SDARPolicy(remasking_strategy="nope")
