"""LLaDA2-MoE (inclusionAI/LLaDA2.0-mini, LLaDA2.1, ``model_type`` ``llada2_moe``): config, names, fused qkv, MoE.

A BailingMoeV2-style block-diffusion transformer: pre-norm RMSNorm layers, one fused
``query_key_value`` projection, RMSNorm on q and k over ``head_dim`` (before RoPE), partial RoPE
(``partial_rotary_factor`` of each head), GQA, and a sparse mixture of experts in every layer from
``first_k_dense_replace`` on (the first layers keep a dense SwiGLU MLP). The order of operations follows
dFactory's ``modeling_llada2_moe.py`` (the parity fixtures' reference; dInfer's and dllm's copies give
the same numbers).

Router (:class:`MoEGate`): fp32 logits, ``score_function`` (sigmoid or softmax) scores; experts are
*chosen* by ``scores + expert_bias``, group-limited: the ``n_group`` contiguous groups are ranked by the sum
of their two best biased scores, the ``topk_group`` best are kept, and the top ``num_experts_per_tok``
experts of those are taken. The weights are the **unbiased** scores of the chosen experts, normalised to
sum 1 (if ``norm_topk_prob`` and top-k > 1), times ``routed_scaling_factor``. A shared SwiGLU expert
(width ``moe_intermediate_size * num_shared_experts``) is added unweighted.

Experts are computed batched (:meth:`SparseMoE.forward`): the token-expert assignments are sorted by
expert (one ``argsort``) and all experts run at once over the experts' weights viewed as one stacked
tensor: a padded batched matmul per projection (the fastest on CPU, measured in
``benchmarks/models_blockdiff.py``), or a grouped matmul (``torch._grouped_mm``) when padding would be
large; no Python loop over tokens or experts. Training (gradients through the experts) and LoRA-wrapped
experts take the per-expert path over the same sorted slices.

Attention is block-causal (:mod:`fewstep.models.block`) with the model's ``block_length``. The checkpoint
keys are the released per-expert ones and equal ``"model." + module name`` (``lm_head`` at the top)::

    model.word_embeddings.weight
    model.layers.{i}.input_layernorm.weight / post_attention_layernorm.weight
    model.layers.{i}.attention.query_key_value.weight   rows [q heads | k heads | v heads]
    model.layers.{i}.attention.{query_layernorm,key_layernorm}.weight  (head_dim)
    model.layers.{i}.attention.dense.weight              attention output
    model.layers.{i}.mlp.{gate,up,down}_proj.weight      dense layers (i < first_k_dense_replace)
    model.layers.{i}.mlp.gate.weight / gate.expert_bias  router (expert_bias: persistent buffer)
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
    model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight
    model.norm.weight, lm_head.weight
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.models.base import HFConfigFields
from fewstep.models.layers import (
    KV,
    BlockDecoderLM,
    PreNormLayer,
    RMSNorm,
    Rope,
    RotaryEmbedding,
    SwiGLU,
    attention,
    silu,
)

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass
class LLaDA2Config(HFConfigFields):
    """The config.json fields of ``LLaDA2MoeConfig`` that define the network (required ones never guessed)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    rope_theta: float
    rms_norm_eps: float
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    partial_rotary_factor: float = 1.0
    first_k_dense_replace: int = 0
    num_shared_experts: int = 0
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    use_qk_norm: bool = True
    use_qkv_bias: bool = False
    use_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    mask_token_id: int = 156895
    eos_token_id: int | None = 156892
    pad_token_id: int | None = None
    block_length: int = 32
    model_type: str = "llada2_moe"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    FAMILY = "LLaDA2-MoE"
    REQUIRED = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "moe_intermediate_size",
        "num_experts",
        "num_experts_per_tok",
        "rope_theta",
        "rms_norm_eps",
    )

    @classmethod
    def unsupported(cls, cfg: dict[str, Any]) -> list[str]:
        bad = super().unsupported(cfg)
        if cfg.get("score_function", "sigmoid") not in ("sigmoid", "softmax"):
            bad.append(f"score_function={cfg['score_function']!r} (fewstep supports sigmoid, softmax)")
        if cfg.get("rope_scaling"):
            bad.append("rope_scaling is set (fewstep supports plain RoPE)")
        if cfg.get("n_group") and cfg["num_experts"] % cfg["n_group"]:
            bad.append(f"num_experts={cfg['num_experts']} is not divisible by n_group={cfg['n_group']}")
        return bad

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.partial_rotary_factor)

    def to_dict(self) -> dict[str, Any]:
        """A config.json in the released layout (loadable by the official code and by fewstep)."""
        out = self.fields_dict()
        if self.block_length == 32:
            out.pop("block_length")  # fewstep's default, not a released key
        out.setdefault("architectures", ["LLaDA2MoeModelLM"])
        out.update(num_key_value_heads=self.kv_heads, head_dim=self.head_size)
        return out


class MoEGate(nn.Module):
    """Group-limited top-k router: returns the chosen experts ``[N, k]`` and their weights ``[N, k]`` (fp32)."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=cfg.moe_router_enable_expert_bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.score_function == "sigmoid" else logits.softmax(-1)
        choice = scores + self.expert_bias.float() if cfg.moe_router_enable_expert_bias else scores
        if cfg.n_group and cfg.topk_group and cfg.n_group > 1:
            grouped = choice.view(choice.shape[0], cfg.n_group, -1)
            top2 = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = top2.topk(cfg.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(top2, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view_as(choice)
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
        weights = scores.gather(1, idx)
        if cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return idx, weights * cfg.routed_scaling_factor


class SparseMoE(nn.Module):
    """Routed experts + shared experts. Tokens are grouped per expert (one sort), never looped over."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.cfg = cfg
        self.gate = MoEGate(cfg)
        self.experts = nn.ModuleList(SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        shared = cfg.moe_intermediate_size * cfg.num_shared_experts
        self.shared_experts = SwiGLU(cfg.hidden_size, shared) if cfg.num_shared_experts else None
        self._stacked: dict[str, torch.Tensor] = {}
        self.batched = True  # False: the per-expert loop (the benchmark's baseline)

    def stacked(self) -> dict[str, torch.Tensor] | None:
        """The experts' weights as ``[E, out, in]`` tensors whose slices *are* the expert parameters.

        Built once (the per-expert storage is replaced by views of one stacked tensor, so no copy stays
        resident); None when the experts are not plain linears (LoRA-wrapped).
        """
        if not all(type(getattr(e, n)) is nn.Linear for e in self.experts for n in _PROJ):
            return None
        first, last = self.experts[0], self.experts[-1]
        st = self._stacked
        if st and all(
            getattr(first, n).weight.data_ptr() == st[n][0].data_ptr()
            and getattr(last, n).weight.data_ptr() == st[n][-1].data_ptr()
            for n in _PROJ
        ):
            return st
        with torch.no_grad():
            for n in _PROJ:
                st[n] = torch.stack([getattr(e, n).weight.data for e in self.experts])
                for i, e in enumerate(self.experts):
                    getattr(e, n).weight.data = st[n][i]
        return st

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, weights = self.gate(flat)
        k = idx.shape[1]
        order = idx.view(-1).argsort(stable=True)
        counts = torch.bincount(idx.view(-1), minlength=self.cfg.num_experts)
        tokens = flat[order // k]
        train = torch.is_grad_enabled() and any(p.requires_grad for p in self.experts.parameters())
        st = None if (train or not self.batched) else self.stacked()
        if st is not None and tokens.dtype == st["gate_proj"].dtype:
            out = self.grouped(tokens, counts, idx.view(-1)[order], st)
        else:
            out = self.per_expert(tokens, counts)
        unsorted = torch.empty_like(out).index_copy_(0, order, out)
        y = (unsorted.view(-1, k, shape[-1]).to(weights.dtype) * weights[..., None]).sum(1).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape)

    def grouped(
        self, tokens: torch.Tensor, counts: torch.Tensor, expert: torch.Tensor, st: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """All experts at once on the expert-sorted ``tokens``: one padded batched matmul per projection
        (``[E, C, D] @ [E, D, I]``, C = the largest group) when the padding stays small, else one grouped
        matmul (``torch._grouped_mm``) over the contiguous groups."""
        E, n = counts.shape[0], tokens.shape[0]
        cap = int(counts.max()) if n else 0
        if E * cap <= 8 * n or E * cap * tokens.shape[1] * tokens.element_size() <= 64 << 20:
            start = counts.cumsum(0) - counts
            slot = torch.arange(n, device=tokens.device) - start[expert]
            padded = tokens.new_zeros(E, cap, tokens.shape[1])
            padded[expert, slot] = tokens
            h = silu(torch.bmm(padded, st["gate_proj"].transpose(1, 2))) * torch.bmm(
                padded, st["up_proj"].transpose(1, 2)
            )
            return torch.bmm(h, st["down_proj"].transpose(1, 2))[expert, slot]
        offs = counts.cumsum(0).to(torch.int32)
        g = _grouped_mm(tokens, st["gate_proj"].transpose(1, 2), offs=offs)
        u = _grouped_mm(tokens, st["up_proj"].transpose(1, 2), offs=offs)
        return _grouped_mm(silu(g) * u, st["down_proj"].transpose(1, 2), offs=offs)

    def per_expert(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The same sorted slices, one expert module call each (training, LoRA, and the benchmark's baseline)."""
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                outs.append(self.experts[e](tokens[start : start + n]))
            start += n
        return torch.cat(outs) if outs else tokens.new_zeros(tokens.shape)


_PROJ = ("gate_proj", "up_proj", "down_proj")


class Attention(nn.Module):
    """Fused ``query_key_value``, ``query_layernorm``/``key_layernorm`` over ``head_dim`` before partial RoPE,
    :func:`~fewstep.models.layers.attention`, output ``dense``."""

    def __init__(self, cfg: LLaDA2Config):
        super().__init__()
        self.cfg = cfg
        hd, h, hkv = cfg.head_size, cfg.num_attention_heads, cfg.kv_heads
        self.query_key_value = nn.Linear(cfg.hidden_size, (h + 2 * hkv) * hd, bias=cfg.use_qkv_bias)
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(hd, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(hd, cfg.rms_norm_eps)
        self.dense = nn.Linear(h * hd, cfg.hidden_size, bias=cfg.use_bias)

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None, past: KV | None, columns: torch.Tensor | None
    ) -> tuple[torch.Tensor, KV]:
        cfg = self.cfg
        h, hkv = cfg.num_attention_heads, cfg.kv_heads
        q, k, v = self.query_key_value(x).view(*x.shape[:2], h + 2 * hkv, cfg.head_size).split((h, hkv, hkv), dim=2)
        if cfg.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        att, present = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), rope, mask, past, columns)
        return self.dense(att), present


class DecoderLayer(PreNormLayer):
    """A Bailing-MoE layer: :class:`Attention`, then a dense SwiGLU (``layer < first_k_dense_replace``) or MoE."""

    def __init__(self, cfg: LLaDA2Config, layer: int):
        dense = layer < cfg.first_k_dense_replace
        mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size) if dense else SparseMoE(cfg)
        super().__init__(cfg.hidden_size, cfg.rms_norm_eps, "attention", Attention(cfg), mlp)


class LLaDA2Model(BlockDecoderLM):
    """LLaDA2-MoE block-diffusion LM. ``forward`` returns raw float32 logits ``[B, T, vocab]`` (no shift)."""

    stack_names = ("model.word_embeddings", "model.layers", "model.norm", "lm_head")
    architecture = "llada2"
    config_class = LLaDA2Config
    model_types = ("llada2_moe", "LLaDA2MoeModelLM")
    family_order = 2
    # q, k and v share one fused ``query_key_value`` (any of them adapts it); the MLP roles cover the dense
    # layers' MLP, every routed expert and the shared experts; the router (``mlp.gate``, not a linear) never
    lora_roles: ClassVar[dict[str, str]] = {
        "q": r"model\.layers\.\d+\.attention\.query_key_value",
        "k": r"model\.layers\.\d+\.attention\.query_key_value",
        "v": r"model\.layers\.\d+\.attention\.query_key_value",
        "o": r"model\.layers\.\d+\.attention\.dense",
        "gate": r"model\.layers\.\d+\.mlp\.(experts\.\d+\.|shared_experts\.)?gate_proj",
        "up": r"model\.layers\.\d+\.mlp\.(experts\.\d+\.|shared_experts\.)?up_proj",
        "down": r"model\.layers\.\d+\.mlp\.(experts\.\d+\.|shared_experts\.)?down_proj",
    }
    recipes_from = ("llada2",)
    fp32_logits = True

    def __init__(self, config: LLaDA2Config):
        rope = RotaryEmbedding(config.rotary_dim, config.rope_theta, min(config.max_position_embeddings, 4096))
        layers = (DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        super().__init__(config, rope, layers)
        self.block_length = config.block_length

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random init (benchmarks, tests): normal(0, std) matrices, unit norms, zero biases and expert bias."""
        super().init_weights(seed, std)
        with torch.no_grad():
            for name, b in self.named_buffers():
                if name.endswith("expert_bias"):
                    b.zero_()
