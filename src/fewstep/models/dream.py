"""Dream (Dream-org/Dream-v0-Instruct-7B and kin): its config, its checkpoint names and its logit shift.

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
from typing import Any, ClassVar

from fewstep.models.base import HFConfigFields
from fewstep.models.layers import DecoderLM, PreNormLayer, QKVAttention, RotaryEmbedding, SwiGLU


@dataclass
class DreamConfig(HFConfigFields):
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

    FAMILY = "Dream"
    REQUIRED = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "mask_token_id",
    )

    @classmethod
    def unsupported(cls, cfg: dict[str, Any]) -> list[str]:
        """Rejects RoPE scaling and sliding windows, which Dream never uses."""
        bad = super().unsupported(cfg)
        scaling = cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            bad.append(f"rope_scaling={scaling!r} (fewstep supports none)")
        if cfg.get("use_sliding_window"):
            bad.append("use_sliding_window=true (fewstep supports false)")
        return bad

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        out = self.fields_dict()
        out.setdefault("architectures", ["DreamModel"])
        out.update(hidden_act="silu", num_key_value_heads=self.kv_heads)
        return out


class DreamLayer(PreNormLayer):
    """A Qwen2 decoder layer: q/k/v with biases, ``o_proj`` without, RoPE in the activation dtype, SwiGLU."""

    def __init__(self, cfg: DreamConfig):
        d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        attn = QKVAttention(d, h, cfg.kv_heads, hd, qkv_bias=True, out_bias=False)
        super().__init__(d, cfg.rms_norm_eps, "self_attn", attn, SwiGLU(d, cfg.intermediate_size))


class DreamModel(DecoderLM):
    """Dream masked-diffusion LM. ``forward`` returns raw (unshifted) logits ``[B, T, vocab_size]``."""

    logit_shift = 1
    stack_names = ("embed_tokens", "layers", "norm", "lm_head")
    architecture = "dream"
    config_class = DreamConfig
    model_types = ("Dream", "DreamModel")
    family_order = 1
    lora_roles: ClassVar[dict[str, str]] = {
        "q": r"layers\.\d+\.self_attn\.q_proj",
        "k": r"layers\.\d+\.self_attn\.k_proj",
        "v": r"layers\.\d+\.self_attn\.v_proj",
        "o": r"layers\.\d+\.self_attn\.o_proj",
        "gate": r"layers\.\d+\.mlp\.gate_proj",
        "up": r"layers\.\d+\.mlp\.up_proj",
        "down": r"layers\.\d+\.mlp\.down_proj",
    }
    recipes_from = ("dream", "llada")  # a paper without a Dream recipe: its LLaDA one
    pretrainable = True

    def __init__(self, config: DreamConfig):
        rope = RotaryEmbedding(config.head_dim, config.rope_theta, max_len=None, fp32=False)  # per call, in dtype
        layers = (DreamLayer(config) for _ in range(config.num_hidden_layers))
        super().__init__(config, rope, layers)

    @staticmethod
    def checkpoint_key(module_key: str) -> str:
        """``layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj.weight``; ``lm_head`` stays top level."""
        return module_key if module_key.startswith("lm_head.") else "model." + module_key

    @staticmethod
    def module_key(checkpoint_key: str) -> str | None:
        if checkpoint_key.startswith("lm_head."):
            return checkpoint_key
        return checkpoint_key[len("model.") :] if checkpoint_key.startswith("model.") else None
