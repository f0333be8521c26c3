"""LLaDA (GSAI-ML/LLaDA-8B-Instruct and kin), written top to bottom in one file.

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.models.base import ConfigFields, DiffusionLM, KVCache, ModelOutput, RMSNorm, attend, attention_inputs

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

    REQUIRED = ("d_model", "n_heads", "n_layers", "vocab_size", "rope_theta", "rms_norm_eps", "mask_token_id")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> LLaDAConfig:
        """Validate a config.json dict: required keys present, unsupported variants rejected with the reason."""
        missing = [k for k in cls.REQUIRED if cfg.get(k) is None]
        if cfg.get("mlp_hidden_size") is None and cfg.get("mlp_ratio") is None:
            missing.append("mlp_hidden_size")
        if missing:
            raise ValueError(f"LLaDA config.json is missing required keys: {', '.join(missing)}")
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
        if bad:
            raise ValueError("unsupported LLaDA variant: " + "; ".join(bad))
        kwargs, extra = cls.split_known(cfg)
        if "mlp_hidden_size" not in kwargs:
            kwargs["mlp_hidden_size"] = int(cfg["mlp_ratio"] * cfg["d_model"])
        if cfg.get("multi_query_attention"):
            kwargs["n_kv_heads"] = 1
        return cls(**kwargs, extra=extra)

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


class RotaryEmbedding:
    """RoPE, rotate-half convention over the whole head. The sin/cos table is built once on the CPU in
    fp32 (as the official code does, for bit-identical GPU results) and moved to each device lazily."""

    def __init__(self, head_dim: int, theta: float, max_len: int):
        self.head_dim, self.theta = head_dim, theta
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cpu = self._build(max_len)

    def _build(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        cpu = torch.device("cpu")  # also when the model is built under a meta-device context
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float, device=cpu) / self.head_dim)
        )
        angles = torch.einsum("i,j->ij", torch.arange(length, dtype=torch.float, device=cpu), inv_freq)
        table = torch.cat((angles, angles), dim=-1)
        return table.sin(), table.cos()

    def table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if length > self._cpu[0].shape[0]:
            self._cpu = self._build(length)
            self._tables.clear()
        if device not in self._tables or self._tables[device][0].shape[0] < length:
            self._tables[device] = (self._cpu[0].to(device), self._cpu[1].to(device))
        return self._tables[device]

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def apply(self, x: torch.Tensor, positions: torch.Tensor, full_precision: bool = True) -> torch.Tensor:
        """Rotate ``x`` [B, H, T, D] by per-row ``positions`` [B, T]."""
        sin, cos = self.table(int(positions.max()) + 1, x.device)
        sin, cos = sin[positions][:, None], cos[positions][:, None]  # [B, 1, T, D]
        xf = x.float() if full_precision else x
        out = (xf * cos.type_as(xf)) + (self.rotate_half(xf) * sin.type_as(xf))
        return out.to(x.dtype)


class LLaDABlock(nn.Module):
    """One pre-norm block: ``x + attn_out(attn(attn_norm(x)))`` then ``x + ff_out(silu(ff_proj(h)) * up_proj(h))``."""

    def __init__(self, cfg: LLaDAConfig, rope: RotaryEmbedding):
        super().__init__()
        self.cfg, self.rope = cfg, rope
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
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        columns: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.cfg
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        q = self.rope.apply(q, positions, cfg.rope_full_precision)
        k = self.rope.apply(k, positions, cfg.rope_full_precision)
        att, present = attend(q, k, v, past, columns, attn_mask)  # GQA, prefix/dual cache, padding
        att = att.transpose(1, 2).contiguous().view(B, T, cfg.d_model)
        x = x + self.attn_out(att)
        h = self.ff_norm(x)
        x = x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        return x, present


class LLaDAModel(DiffusionLM):
    """LLaDA masked-diffusion LM. ``forward`` returns raw logits ``[B, T, padded_vocab]``."""

    logit_shift = 0
    architecture = "llada"

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_sequence_length)
        self.wte = nn.Embedding(config.padded_vocab, config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config, self.rope) for _ in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_out = None if config.weight_tying else nn.Linear(config.d_model, config.padded_vocab, bias=False)

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
        """Run the network on ``input_ids`` [B, T].

        ``attention_mask`` ([B, key length], 1 = real token) masks padding keys. ``past_key_values`` and
        ``replace_position`` select the cache mode (see ``base.py``). ``logits_range=(a, b)`` computes
        the LM head only for query positions ``[a, b)`` (saves memory with large vocabularies).
        """
        ctx = attention_inputs(input_ids, attention_mask, position_ids, past_key_values, replace_position)
        x, presents = self.run_layers(self.blocks, self.wte(input_ids), ctx, ctx.positions)
        if logits_range is not None:
            x = x[:, logits_range[0] : logits_range[1]]
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight) if self.ff_out is None else self.ff_out(x)
        return ModelOutput(logits=logits, past_key_values=KVCache(presents) if use_cache else None)

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
