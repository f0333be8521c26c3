"""LLaDA (GSAI-ML/LLaDA-8B-Instruct and kin): its config, its checkpoint names and its flat block.

A bidirectional Llama-style transformer: pre-norm RMSNorm blocks, RoPE (rotate-half, rotated in
fp32), separate q/k/v projections, optional GQA, a SiLU-gated MLP and an untied LM head. The math and
its order of operations follow the official ``modeling_llada.py`` (Fast-dLLM's copy, which the parity
fixtures were made with), so a float32 forward reproduces the official logits.

Two deliberate differences from the official code, both documented in ``checkpoints.md``:

* ``attention_mask`` is **applied** (padding keys are masked, padded rows get positions counted from
  their first real token). The official code builds the bias and then ignores it. With
  ``attention_mask=None`` (or all ones) the logits are the official ones.
* The KV cache (prefix and dual mode, see ``base.py``) works for batches.

Checkpoint key map (``model.safetensors`` / ``model.safetensors.index.json``)::

    model.transformer.wte.weight                 -> LLaDAModel.wte             token embedding
    model.transformer.blocks.{i}.attn_norm.weight -> blocks[i].attn_norm       RMSNorm before attention
    model.transformer.blocks.{i}.q_proj.weight    -> blocks[i].q_proj
    model.transformer.blocks.{i}.k_proj.weight    -> blocks[i].k_proj          [n_kv_heads*head_dim, d]
    model.transformer.blocks.{i}.v_proj.weight    -> blocks[i].v_proj
    model.transformer.blocks.{i}.attn_out.weight  -> blocks[i].attn_out        attention output ("o_proj")
    model.transformer.blocks.{i}.ff_norm.weight   -> blocks[i].ff_norm         RMSNorm before the MLP
    model.transformer.blocks.{i}.ff_proj.weight   -> blocks[i].ff_proj         MLP gate (goes through SiLU)
    model.transformer.blocks.{i}.up_proj.weight   -> blocks[i].up_proj         MLP up branch (linear)
    model.transformer.blocks.{i}.ff_out.weight    -> blocks[i].ff_out          MLP down projection
    model.transformer.ln_f.weight                 -> ln_f                       final RMSNorm
    model.transformer.ff_out.weight               -> ff_out                     LM head (absent if weight_tying)

The module names equal the checkpoint names without the ``model.transformer.`` prefix, so
``state_dict()`` keys map one to one (:func:`checkpoint_key`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fewstep.models.base import ConfigFields
from fewstep.models.layers import (
    KV,
    DecoderLM,
    RMSNorm,
    Rope,
    RotaryEmbedding,
    attention,
    split_heads,
    swiglu,
)

CHECKPOINT_PREFIX = "model.transformer."


@dataclass
class LLaDAConfig(ConfigFields):
    """The config.json fields that define the network. Architectural keys are required, never guessed:
    the official ``ModelConfig`` defaults describe a different (OLMo) model."""

    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    mlp_hidden_size: int
    rope_theta: float
    rms_norm_eps: float
    mask_token_id: int
    n_kv_heads: int | None = None
    embedding_size: int | None = None
    weight_tying: bool = False
    max_sequence_length: int = 4096
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    rope_full_precision: bool = True
    model_type: str = "llada"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    FAMILY = "LLaDA"
    REQUIRED = ("d_model", "n_heads", "n_layers", "vocab_size", "rope_theta", "rms_norm_eps", "mask_token_id")

    @classmethod
    def missing(cls, cfg: dict[str, Any]) -> list[str]:
        missing = super().missing(cfg)
        if cfg.get("mlp_hidden_size") is None and cfg.get("mlp_ratio") is None:
            missing.append("mlp_hidden_size")
        return missing

    @classmethod
    def unsupported(cls, cfg: dict[str, Any]) -> list[str]:
        expect = {
            "block_type": "llama",
            "activation_type": "silu",
            "layer_norm_type": "rms",
            "alibi": False,
            "include_bias": False,
            "scale_logits": False,
            "input_emb_norm": False,
            "attention_layer_norm": False,
            "rope": True,
        }
        bad = [f"{k}={cfg[k]!r} (fewstep supports {v!r})" for k, v in expect.items() if k in cfg and cfg[k] != v]
        if cfg.get("block_group_size", 1) != 1:
            bad.append(f"block_group_size={cfg['block_group_size']} (fewstep supports 1)")
        if cfg.get("include_qkv_bias"):
            bad.append("include_qkv_bias=true (fewstep supports false)")
        return bad

    @classmethod
    def complete(cls, kwargs: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
        if "mlp_hidden_size" not in kwargs:
            kwargs["mlp_hidden_size"] = int(cfg["mlp_ratio"] * cfg["d_model"])
        if cfg.get("multi_query_attention"):
            kwargs["n_kv_heads"] = 1
        return kwargs

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and LM head (``embedding_size`` may exceed ``vocab_size``)."""
        return self.embedding_size or self.vocab_size

    def stack_sizes(self) -> dict[str, Any]:
        return {"vocab": self.padded_vocab, "dim": self.d_model, "eps": self.rms_norm_eps, "tied": self.weight_tying}

    def to_dict(self) -> dict[str, Any]:
        """A config.json in the official layout (loadable by the official code and by fewstep)."""
        out = self.fields_dict()
        out.setdefault("architectures", ["LLaDAModelLM"])
        out.update(
            block_type="llama",
            activation_type="silu",
            layer_norm_type="rms",
            rope=True,
            alibi=False,
            include_bias=False,
            include_qkv_bias=False,
            scale_logits=False,
            input_emb_norm=False,
            attention_layer_norm=False,
            layer_norm_with_affine=True,
            bias_for_layer_norm=False,
            block_group_size=1,
            n_kv_heads=self.kv_heads,
            embedding_size=self.padded_vocab,
        )
        return out


class LLaDABlock(nn.Module):
    """One pre-norm block with LLaDA's flat names: ``x + attn_out(attn(attn_norm(x)))`` then
    ``x + ff_out(silu(ff_proj(h)) * up_proj(h))`` with ``h = ff_norm(x)``."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None, past: KV | None, columns: torch.Tensor | None
    ) -> tuple[torch.Tensor, KV]:
        h = self.attn_norm(x)
        q, k, v = (split_heads(p(h), self.cfg.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        att, present = attention(q, k, v, rope, mask, past, columns)  # RoPE, GQA, prefix/dual cache, padding
        x = x + self.attn_out(att)
        return x + swiglu(self.ff_norm(x), self.ff_proj, self.up_proj, self.ff_out), present


class LLaDAModel(DecoderLM):
    """LLaDA masked-diffusion LM. ``forward`` returns raw logits ``[B, T, padded_vocab]``."""

    logit_shift = 0
    stack_names = ("wte", "blocks", "ln_f", "ff_out")
    architecture = "llada"
    config_class = LLaDAConfig
    model_types = ("llada", "LLaDAModelLM")
    family_order = 0
    lora_roles: ClassVar[dict[str, str]] = {
        "q": r"blocks\.\d+\.q_proj",
        "k": r"blocks\.\d+\.k_proj",
        "v": r"blocks\.\d+\.v_proj",
        "o": r"blocks\.\d+\.attn_out",
        "gate": r"blocks\.\d+\.ff_proj",
        "up": r"blocks\.\d+\.up_proj",
        "down": r"blocks\.\d+\.ff_out",
    }  # anchored to the blocks: a bare ``ff_out`` is also LLaDA's LM head
    # LLaDA names its attention output / MLP gate / MLP down attn_out / ff_proj / ff_out, so a Llama-named
    # target list (q_proj ... down_proj, dParallel's config) adapts q, k, v and up only
    reference_lora_roles = ("q", "k", "v", "up")
    recipes_from = ("llada",)
    pretrainable = True

    def __init__(self, config: LLaDAConfig):
        rope = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.max_sequence_length, fp32=config.rope_full_precision
        )
        layers = (LLaDABlock(config) for _ in range(config.n_layers))
        super().__init__(config, rope, layers)

    # -- checkpoint I/O -----------------------------------------------------------------------------
    @staticmethod
    def checkpoint_key(module_key: str) -> str:
        """``blocks.0.q_proj.weight`` -> ``model.transformer.blocks.0.q_proj.weight``."""
        return CHECKPOINT_PREFIX + module_key

    @staticmethod
    def module_key(checkpoint_key: str) -> str | None:
        """Inverse of :meth:`checkpoint_key`; None for keys that do not belong to LLaDA."""
        return checkpoint_key[len(CHECKPOINT_PREFIX) :] if checkpoint_key.startswith(CHECKPOINT_PREFIX) else None

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random init for training from scratch: normal(0, std) linears, depth-scaled output projections."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name == "ln_f.weight":
                nn.init.ones_(p)
            else:
                scale = (
                    std / math.sqrt(2 * self.config.n_layers)
                    if name.endswith(("attn_out.weight", "ff_out.weight")) and name.startswith("blocks")
                    else std
                )
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
