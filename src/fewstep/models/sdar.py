"""SDAR (JetAstra/SDAR-*-Chat, ``model_type`` ``sdar``): Qwen3 layers with block-causal attention, in one file.

Pre-norm RMSNorm layers, separate q/k/v projections (``head_dim`` may differ from ``hidden/heads``),
RMSNorm on q and k over ``head_dim`` before RoPE (full rotate-half), GQA (consecutive q heads share a
kv head), a SiLU-gated MLP and an (optionally tied) LM head. The order of operations follows the
official ``modeling_sdar.py`` (inference path); logits are not shifted (position i predicts token i).

Attention is block-causal (:mod:`fewstep.models.block`) with ``block_length`` from the config's
``block_size`` (settable). The official inference path uses a 0/1 mask and runs flash attention when the
mask is all ones; fewstep builds the same mask from positions, so a block decoded against the cache of
earlier blocks (SDAR's ``store_kv=False`` call) is fewstep's ``prefix`` cache mode.

Checkpoint keys (standard Qwen3 names, equal to the module names)::

    model.embed_tokens.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (+ .bias with attention_bias)
    model.layers.{i}.self_attn.{q_norm,k_norm}.weight   (head_dim)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.layers.{i}.{input,post_attention}_layernorm.weight
    model.norm.weight, lm_head.weight (absent when tied)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.models.base import ConfigFields, KVCache, ModelOutput, RMSNorm, attend
from fewstep.models.block import BlockDiffusionLM, PartialRotary, block_inputs
from fewstep.models.llada2 import SwiGLU


@dataclass
class SDARConfig(ConfigFields):
    """The config.json fields of ``SDARConfig`` that define the network."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rope_theta: float
    rms_norm_eps: float
    mask_token_id: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    block_size: int = 4
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "sdar"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    REQUIRED = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "rope_theta",
        "rms_norm_eps",
        "mask_token_id",
    )

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> SDARConfig:
        """Validate a config.json dict: required keys present, unsupported variants rejected with the reason."""
        missing = [k for k in cls.REQUIRED if cfg.get(k) is None]
        if missing:
            raise ValueError(f"SDAR config.json is missing required keys: {', '.join(missing)}")
        bad = []
        if cfg.get("hidden_act", "silu") != "silu":
            bad.append(f"hidden_act={cfg['hidden_act']!r} (fewstep supports 'silu')")
        if cfg.get("rope_scaling"):
            bad.append("rope_scaling is set (fewstep supports plain RoPE)")
        if cfg.get("use_sliding_window"):
            bad.append("use_sliding_window=true (fewstep supports full attention within the block structure)")
        if bad:
            raise ValueError("unsupported SDAR variant: " + "; ".join(bad))
        kwargs, extra = cls.split_known(cfg)
        kwargs.setdefault("pad_token_id", kwargs.get("eos_token_id"))  # SDAR names no pad: pad with EOS
        return cls(**kwargs, extra=extra)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        """A config.json in the released layout."""
        out = self.fields_dict()
        out.setdefault("architectures", ["SDARForCausalLM"])
        out.update(num_key_value_heads=self.kv_heads, head_dim=self.head_size)
        return out


class SelfAttention(nn.Module):
    """Qwen3 attention: q/k/v, q_norm/k_norm over ``head_dim`` before RoPE, GQA, block-causal SDPA, o_proj."""

    def __init__(self, cfg: SDARConfig, rope: PartialRotary):
        super().__init__()
        self.cfg, self.rope = cfg, rope
        hd, h, hkv, d = cfg.head_size, cfg.num_attention_heads, cfg.kv_heads, cfg.hidden_size
        self.q_proj = nn.Linear(d, h * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, hkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, hkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * hd, d, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, positions, mask, past, columns):
        cfg = self.cfg
        B, T, _ = x.shape
        hd = cfg.head_size
        q = self.q_norm(self.q_proj(x).view(B, T, -1, hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, hd)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        q, k = self.rope.apply(q, positions), self.rope.apply(k, positions)
        att, present = attend(q, k, v, past, columns, mask)
        return self.o_proj(att.transpose(1, 2).reshape(B, T, -1)), present


class SDARLayer(nn.Module):
    """``x + self_attn(input_layernorm(x))`` then ``x + mlp(post_attention_layernorm(x))``."""

    def __init__(self, cfg: SDARConfig, rope: PartialRotary):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, positions, mask, past, columns):
        att, present = self.self_attn(self.input_layernorm(x), positions, mask, past, columns)
        x = x + att
        return x + self.mlp(self.post_attention_layernorm(x)), present


class SDARBackbone(nn.Module):
    """The ``model.*`` part of the checkpoint."""

    def __init__(self, cfg: SDARConfig, rope: PartialRotary):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(SDARLayer(cfg, rope) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class SDARModel(BlockDiffusionLM):
    """SDAR block-diffusion LM. ``forward`` returns raw logits ``[B, T, vocab]`` (no shift)."""

    architecture = "sdar"

    def __init__(self, config: SDARConfig):
        super().__init__()
        self.config = config
        self.block_length = config.block_size
        self.rope = PartialRotary(config.head_size, config.rope_theta, min(config.max_position_embeddings, 4096))
        self.model = SDARBackbone(config, self.rope)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | list | None = None,
        use_cache: bool = False,
        replace_position: torch.Tensor | None = None,
        logits_range: tuple[int, int] | None = None,
        block_length: int | None = None,
        **_: Any,
    ) -> ModelOutput:
        """Run the network on ``input_ids`` [B, T]; arguments as :meth:`fewstep.models.llada2.LLaDA2Model.forward`."""
        bl = self.resolve_block_length(block_length)
        ctx = block_inputs(input_ids, attention_mask, position_ids, past_key_values, replace_position, bl)
        x, presents = self.run_layers(self.model.layers, self.model.embed_tokens(input_ids), ctx, ctx.positions)
        if logits_range is not None:
            x = x[:, logits_range[0] : logits_range[1]]
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head)
        return ModelOutput(logits=logits, past_key_values=KVCache(presents) if use_cache else None)

    @staticmethod
    def checkpoint_key(module_key: str) -> str:
        return module_key

    @staticmethod
    def module_key(checkpoint_key: str) -> str | None:
        return checkpoint_key if checkpoint_key.startswith(("model.", "lm_head.")) else None

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random init: normal(0, std) matrices, unit norms, zero biases."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif p.dim() == 1:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
