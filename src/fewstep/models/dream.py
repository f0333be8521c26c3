"""Dream (Dream-org/Dream-v0-Instruct-7B and kin), written top to bottom in one file.

Dream is Qwen2 with the causal mask removed: pre-norm RMSNorm decoder layers, q/k/v projections with
biases (o_proj without), GQA, RoPE computed per call and applied in the activation dtype, a SiLU-gated
MLP and an untied LM head. Because it was adapted from an autoregressive model it keeps next-token
alignment: **the token at position i is predicted by the logits at position i - 1** (``logit_shift``
= 1). ``forward`` returns raw, unshifted logits (what the official model returns); the shift is applied
in exactly one place, :meth:`fewstep.models.base.DiffusionLM.denoise`.

Padding: with an ``attention_mask`` (left padding) pad keys are masked and positions count from each
row's first real token, as the official Dream sampler does (``cumsum(mask) - 1``).

Checkpoint key map (Qwen2 names)::

    model.embed_tokens.weight                          -> embed_tokens
    model.layers.{i}.input_layernorm.weight            -> layers[i].input_layernorm
    model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias} -> layers[i].self_attn.{q,k,v}_proj
    model.layers.{i}.self_attn.o_proj.weight           -> layers[i].self_attn.o_proj     (no bias)
    model.layers.{i}.post_attention_layernorm.weight   -> layers[i].post_attention_layernorm
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    -> layers[i].mlp.{gate,up,down}_proj
    model.norm.weight                                  -> norm
    lm_head.weight                                     -> lm_head   (absent if tie_word_embeddings)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.models.base import ConfigFields, DiffusionLM, KVCache, ModelOutput, RMSNorm, attend, attention_inputs


@dataclass
class DreamConfig(ConfigFields):
    """The config.json fields that define the network (Qwen2 names plus ``mask_token_id``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    mask_token_id: int
    num_key_value_heads: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    model_type: str = "Dream"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    REQUIRED = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "mask_token_id",
    )

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> DreamConfig:
        """Validate a config.json dict; rejects RoPE scaling and sliding windows, which Dream never uses."""
        missing = [k for k in cls.REQUIRED if cfg.get(k) is None]
        if missing:
            raise ValueError(f"Dream config.json is missing required keys: {', '.join(missing)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported Dream variant: hidden_act={cfg['hidden_act']!r} (fewstep supports 'silu')")
        scaling = cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ValueError(f"unsupported Dream variant: rope_scaling={scaling!r} (fewstep supports none)")
        if cfg.get("use_sliding_window"):
            raise ValueError("unsupported Dream variant: use_sliding_window=true (fewstep supports false)")
        kwargs, extra = cls.split_known(cfg)
        return cls(**kwargs, extra=extra)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        out = self.fields_dict()
        out.setdefault("architectures", ["DreamModel"])
        out.update(hidden_act="silu", num_key_value_heads=self.kv_heads)
        return out


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Per-call cos/sin ``[B, 1, T, D]`` computed in fp32 on the positions' device, cast to the activation dtype."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float().to(positions.device) / head_dim)
    )
    freqs = positions.float()[:, :, None] * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DreamAttention(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, cfg.kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, cfg.kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, attn_mask, past, columns):
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        q = (q * cos) + (rotate_half(q) * sin)
        k = (k * cos) + (rotate_half(k) * sin)
        att, present = attend(q, k, v, past, columns, attn_mask)  # GQA, prefix/dual cache, padding
        att = att.transpose(1, 2).contiguous().view(B, T, cfg.hidden_size)
        return self.o_proj(att), present


class DreamMLP(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamLayer(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DreamAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DreamMLP(cfg)

    def forward(self, x, cos, sin, attn_mask, past, columns):
        att, present = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, past, columns)
        x = x + att
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class DreamModel(DiffusionLM):
    """Dream masked-diffusion LM. ``forward`` returns raw (unshifted) logits ``[B, T, vocab_size]``."""

    logit_shift = 1
    architecture = "dream"

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
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
        **_: Any,
    ) -> ModelOutput:
        """Run the network; arguments as in :meth:`fewstep.models.llada.LLaDAModel.forward`."""
        ctx = attention_inputs(input_ids, attention_mask, position_ids, past_key_values, replace_position)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(ctx.positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        x, presents = self.run_layers(self.layers, x, ctx, cos, sin)
        if logits_range is not None:
            x = x[:, logits_range[0] : logits_range[1]]
        x = self.norm(x)
        logits = F.linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
        return ModelOutput(logits=logits, past_key_values=KVCache(presents) if use_cache else None)

    @staticmethod
    def checkpoint_key(module_key: str) -> str:
        """``layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj.weight``; ``lm_head`` stays top level."""
        return module_key if module_key.startswith("lm_head.") else "model." + module_key

    @staticmethod
    def module_key(checkpoint_key: str) -> str | None:
        if checkpoint_key.startswith("lm_head."):
            return checkpoint_key
        return checkpoint_key[len("model.") :] if checkpoint_key.startswith("model.") else None
