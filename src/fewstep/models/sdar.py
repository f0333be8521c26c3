"""SDAR (JetAstra/SDAR-*-Chat, ``model_type`` ``sdar``): Qwen3 layers with block-causal attention.

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
from typing import Any, ClassVar

from fewstep.models.base import HFConfigFields
from fewstep.models.layers import BlockDecoderLM, PreNormLayer, QKVAttention, RotaryEmbedding, SwiGLU


@dataclass
class SDARConfig(HFConfigFields):
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

    FAMILY = "SDAR"
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
    def unsupported(cls, cfg: dict[str, Any]) -> list[str]:
        bad = super().unsupported(cfg)
        if cfg.get("rope_scaling"):
            bad.append("rope_scaling is set (fewstep supports plain RoPE)")
        if cfg.get("use_sliding_window"):
            bad.append("use_sliding_window=true (fewstep supports full attention within the block structure)")
        return bad

    @classmethod
    def complete(cls, kwargs: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
        kwargs.setdefault("pad_token_id", kwargs.get("eos_token_id"))  # SDAR names no pad: pad with EOS
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        """A config.json in the released layout."""
        out = self.fields_dict()
        out.setdefault("architectures", ["SDARForCausalLM"])
        out.update(num_key_value_heads=self.kv_heads, head_dim=self.head_size)
        return out


class SDARLayer(PreNormLayer):
    """A Qwen3 decoder layer: q/k/v (``head_dim`` may differ from ``hidden/heads``), q_norm/k_norm, SwiGLU."""

    def __init__(self, cfg: SDARConfig):
        d, bias = cfg.hidden_size, cfg.attention_bias
        attn = QKVAttention(d, cfg.num_attention_heads, cfg.kv_heads, cfg.head_size, bias, bias, cfg.rms_norm_eps)
        super().__init__(d, cfg.rms_norm_eps, "self_attn", attn, SwiGLU(d, cfg.intermediate_size))


class SDARModel(BlockDecoderLM):
    """SDAR block-diffusion LM. ``forward`` returns raw logits ``[B, T, vocab]`` (no shift)."""

    stack_names = ("model.embed_tokens", "model.layers", "model.norm", "lm_head")
    architecture = "sdar"
    config_class = SDARConfig
    model_types = ("sdar", "SDARForCausalLM")
    family_order = 3
    lora_roles: ClassVar[dict[str, str]] = {
        "q": r"model\.layers\.\d+\.self_attn\.q_proj",
        "k": r"model\.layers\.\d+\.self_attn\.k_proj",
        "v": r"model\.layers\.\d+\.self_attn\.v_proj",
        "o": r"model\.layers\.\d+\.self_attn\.o_proj",
        "gate": r"model\.layers\.\d+\.mlp\.gate_proj",
        "up": r"model\.layers\.\d+\.mlp\.up_proj",
        "down": r"model\.layers\.\d+\.mlp\.down_proj",
    }
    recipes_from = ("sdar", "llada2")  # the papers' block-diffusion recipes, with SDAR's own block length

    def __init__(self, config: SDARConfig):
        rope = RotaryEmbedding(config.head_size, config.rope_theta, min(config.max_position_embeddings, 4096))
        layers = (SDARLayer(config) for _ in range(config.num_hidden_layers))
        super().__init__(config, rope, layers)
        self.block_length = config.block_size
