"""The building blocks the four native families are assembled from, and the forward driver they share.

Each architecture file (``llada.py``, ``dream.py``, ``llada2.py``, ``sdar.py``) holds only what is special
about its family: its config, its checkpoint names (module attribute names *are* the checkpoint names,
so the modules here take the names from the family) and the parts that really differ (fused qkv,
QK-norm, MoE, logit shift, block-causal attention). What they share lives here:

* :class:`RMSNorm`, :class:`RotaryEmbedding` (full or partial rotate-half RoPE, from a CPU table or per
  call on the device, rotated in fp32 or in the activation dtype), :func:`swiglu` / :class:`SwiGLU`;
* :func:`attend` (GQA attention over the KV cache, see ``base.py``) and :func:`attention` (RoPE,
  :func:`attend`, heads merged), :class:`QKVAttention` (separate q/k/v, optional QK-norm);
* :class:`PreNormLayer` (the Qwen/Bailing decoder layer with its checkpoint names);
* :class:`DecoderLM` (embedding -> layers -> final norm -> LM head, with position ids, masks, caches,
  ``replace_position``, ``logits_range`` and an ``inputs_embeds`` path beside ``input_ids``; the
  embedding API ``input_embeddings()`` / ``embed(ids)`` / ``mask_embedding()``) and :class:`BlockDecoderLM` (the same, block-causal).

Every layer is called ``layer(x, rope, mask, past, columns)``: ``rope`` is this forward's ``(cos, sin)``,
computed once per forward by the model's :class:`RotaryEmbedding`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.models.base import AttentionInputs, DiffusionLM, KVCache, ModelOutput, RaggedMask, attention_inputs
from fewstep.models.block import BlockDiffusionLM, block_inputs

Rope = tuple[torch.Tensor, torch.Tensor]
KV = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """RMSNorm as all four families compute it: fp32 statistics, cast back, then times the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (the rotate-half RoPE convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding:
    """RoPE angles for the first ``rotary_dim`` dims of each head (partial rotary if less than ``head_dim``).

    ``max_len`` given: the sin/cos table is built on the CPU in fp32 (LLaDA's, LLaDA2's and SDAR's official
    way, bit-identical on every device; also under a meta-device context), moved to each device lazily and
    grown when a position exceeds it. ``max_len`` None: the angles are computed per call on the positions'
    device (Qwen2/Dream's way). ``fp32``: :func:`apply_rotary` rotates in fp32; otherwise cos/sin are cast
    to the activation dtype and the rotation runs in it.
    """

    def __init__(self, rotary_dim: int, theta: float, max_len: int | None = None, fp32: bool = True):
        self.rotary_dim, self.theta, self.fp32 = rotary_dim, theta, fp32
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cpu = None if max_len is None else self._build(max_len)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        d = self.rotary_dim
        return 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))

    def _build(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        cpu = torch.device("cpu")
        angles = torch.outer(torch.arange(length, dtype=torch.float, device=cpu), self.inv_freq(cpu))
        table = torch.cat((angles, angles), dim=-1)
        return table.sin(), table.cos()

    def _table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if length > self._cpu[0].shape[0]:
            self._cpu = self._build(max(length, 2 * self._cpu[0].shape[0]))
            self._tables.clear()
        if device not in self._tables:
            self._tables[device] = (self._cpu[0].to(device), self._cpu[1].to(device))
        return self._tables[device]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """``(cos, sin)`` ``[B, 1, T, rotary_dim]`` of per-row ``positions`` [B, T], for :func:`apply_rotary`."""
        if self._cpu is None:
            freqs = positions.float()[:, :, None] * self.inv_freq(positions.device)[None, None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        else:
            sin, cos = self._table(int(positions.max()) + 1, positions.device)
            sin, cos = sin[positions][:, None], cos[positions][:, None]
        return (cos, sin) if self.fp32 else (cos.to(dtype), sin.to(dtype))


def apply_rotary(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of ``x`` [B, H, T, D] in the dtype of ``rope``; the rest pass through."""
    cos, sin = rope
    d = cos.shape[-1]
    rot = x[..., :d].to(cos.dtype)
    rotated = rotate_half(rot)
    out = (rot * cos + rotated * sin).to(x.dtype)
    return out if d == x.shape[-1] else torch.cat((out, x[..., d:]), dim=-1)


#: elements a CPU's vectorised element-wise kernels take per step at most (AVX-512: 2 x 32 bfloat16)
VECTOR_STEP = 64


def silu(g: torch.Tensor) -> torch.Tensor:
    """SiLU that gives every token the result it gets alone, whatever the batch.

    On a CPU torch computes an element-wise function in vector steps and the last ``numel % step`` elements
    in a scalar loop whose ``exp`` rounds differently (one ulp): a row's last values then change with the
    tokens batched after it. The last ``numel % VECTOR_STEP`` values are computed again from a zero-padded
    vector of :data:`VECTOR_STEP` elements, so every value comes from the vector path (one thread per
    process: with more, torch splits the work at other places)."""
    tail = g.numel() % VECTOR_STEP
    if g.device.type != "cpu" or tail == 0:
        return F.silu(g)
    g = g.contiguous()
    out = F.silu(g)
    last = g.reshape(-1)[-tail:]
    out.view(-1)[-tail:] = F.silu(torch.cat([last, last.new_zeros(VECTOR_STEP - tail)]))[:tail]
    return out


def swiglu(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))``, the MLP of every family (whatever its projections are named)."""
    return down(silu(gate(x)) * up(x))


class SwiGLU(nn.Module):
    """A SiLU-gated MLP with the Qwen/Bailing names ``gate_proj``, ``up_proj``, ``down_proj``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


def split_heads(x: torch.Tensor, head_dim: int, norm: nn.Module | None = None) -> torch.Tensor:
    """``[B, T, H * head_dim]`` -> ``[B, H, T, head_dim]``, through ``norm`` (QK-norm) before the transpose."""
    x = x.view(x.shape[0], x.shape[1], -1, head_dim)
    return (x if norm is None else norm(x)).transpose(1, 2)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past: KV | None,
    columns: torch.Tensor | None,
    mask: torch.Tensor | RaggedMask | None,
) -> tuple[torch.Tensor, KV]:
    """Attention of rotated ``q`` [B, H, T, D] over ``k``/``v`` [B, Hkv, T, D] and the cache (``mask`` as given;
    a :class:`~fewstep.models.base.RaggedMask`: each group of padded rows attends alone, :func:`ragged_attention`).

    Prefix mode appends to ``past``; dual mode writes ``k``/``v`` into ``past`` in place at ``columns``.
    Returns the attention output ``[B, H, T, D]`` and this layer's full keys/values (the new cache).
    GQA repeats each key/value head for ``H / Hkv`` consecutive query heads.
    """
    if past is not None and columns is not None:
        past[0][:, :, columns] = k
        past[1][:, :, columns] = v
        k, v = past
    elif past is not None:
        k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
    present = (k, v)
    heads = q.shape[1]
    if k.shape[1] != heads:
        r = heads // k.shape[1]
        k = k.repeat_interleave(r, dim=1, output_size=heads)
        v = v.repeat_interleave(r, dim=1, output_size=heads)
    if isinstance(mask, RaggedMask):
        return ragged_attention(q, k, v, mask), present
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out, present


def _columns(t: torch.Tensor, runs: tuple[tuple[int, int], ...], dim: int) -> torch.Tensor:
    """The ``runs`` of ``t`` along ``dim``, in order (a view for one run)."""
    parts = [t.narrow(dim, a, b - a) for a, b in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: RaggedMask) -> torch.Tensor:
    """SDPA per group of rows over exactly their real queries and keys: each row's output is the one it gets
    alone (same shapes, same key order, no padding mask); pad queries get zeros."""
    out = q.new_zeros(q.shape)
    for (a, b), (q0, q1), keys in mask.groups:
        if q1 <= q0 or not keys:
            continue
        m = None if mask.dense is None else _columns(mask.dense[a:b, :, q0:q1], keys, -1)
        out[a:b, :, q0:q1] = torch.nn.functional.scaled_dot_product_attention(
            q[a:b, :, q0:q1], _columns(k[a:b], keys, 2), _columns(v[a:b], keys, 2), attn_mask=m, dropout_p=0.0
        )
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: Rope,
    mask: torch.Tensor | None,
    past: KV | None,
    columns: torch.Tensor | None,
) -> tuple[torch.Tensor, KV]:
    """``q`` [B, H, T, hd] and ``k``/``v`` [B, Hkv, T, hd] (QK-normed if the family norms them) -> RoPE,
    :func:`attend` over the cache, heads merged back: ``[B, T, H * hd]`` and this layer's keys/values."""
    B, _, T, _ = q.shape
    att, present = attend(apply_rotary(q, rope), apply_rotary(k, rope), v, past, columns, mask)
    return att.transpose(1, 2).reshape(B, T, -1), present


class QKVAttention(nn.Module):
    """Qwen-style attention: ``q_proj``/``k_proj``/``v_proj``, optional ``q_norm``/``k_norm`` (RMSNorm over
    ``head_dim``, before RoPE), :func:`attention`, ``o_proj``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        out_bias: bool,
        qk_norm_eps: float | None = None,
    ):
        super().__init__()
        self.head_dim, self.qk_norm = head_dim, qk_norm_eps is not None
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=out_bias)
        if self.qk_norm:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None, past: KV | None, columns: torch.Tensor | None
    ) -> tuple[torch.Tensor, KV]:
        hd, qk = self.head_dim, self.qk_norm  # q, k, v in this order: the official autograd order
        q = split_heads(self.q_proj(x), hd, self.q_norm if qk else None)
        k = split_heads(self.k_proj(x), hd, self.k_norm if qk else None)
        att, present = attention(q, k, split_heads(self.v_proj(x), hd), rope, mask, past, columns)
        return self.o_proj(att), present


class PreNormLayer(nn.Module):
    """``x + <attention>(input_layernorm(x))`` then ``x + mlp(post_attention_layernorm(x))``.

    ``attention_name`` is the family's checkpoint name of the attention module (``self_attn``, ``attention``).
    """

    def __init__(self, dim: int, eps: float, attention_name: str, attention: nn.Module, mlp: nn.Module):
        super().__init__()
        self.attention_name = attention_name
        self.input_layernorm = RMSNorm(dim, eps)
        self.add_module(attention_name, attention)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = mlp

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None, past: KV | None, columns: torch.Tensor | None
    ) -> tuple[torch.Tensor, KV]:
        attn = getattr(self, self.attention_name)
        att, present = attn(self.input_layernorm(x), rope, mask, past, columns)
        x = x + att
        return x + self.mlp(self.post_attention_layernorm(x)), present


def lm_head(dim: int, vocab: int, tied: bool) -> nn.Linear | None:
    """The untied LM head, or None when the checkpoint ties it to the token embedding."""
    return None if tied else nn.Linear(dim, vocab, bias=False)


class DecoderLM(DiffusionLM):
    """A model that is token embedding -> decoder layers -> final norm -> LM head: the forward driver.

    A family names the four parts as its checkpoint does in ``stack_names`` (dotted names live in plain
    containers, e.g. ``model.layers``) and passes its config (whose ``stack_sizes()`` gives the sizes), its
    :class:`RotaryEmbedding` and its layers to ``__init__``. ``fp32_logits`` casts the logits to float32
    (LLaDA2-MoE's head does).
    """

    #: checkpoint names of the (token embedding, decoder layers, final norm, LM head)
    stack_names: tuple[str, str, str, str]
    fp32_logits: bool = False

    def __init__(self, config: Any, rope: RotaryEmbedding, layers: Iterable[nn.Module]):
        super().__init__()
        self.config, self.rope = config, rope
        self.build_stack(layers, **config.stack_sizes())

    def build_stack(self, layers: Iterable[nn.Module], vocab: int, dim: int, eps: float, tied: bool) -> None:
        """Register the embedding, ``layers``, final RMSNorm and LM head (None if ``tied``) under ``stack_names``."""
        parts = (nn.Embedding(vocab, dim), nn.ModuleList(layers), RMSNorm(dim, eps), lm_head(dim, vocab, tied))
        for name, part in zip(self.stack_names, parts, strict=True):
            *path, leaf = name.split(".")
            owner = self
            for p in path:
                if not hasattr(owner, p):
                    owner.add_module(p, nn.Module())
                owner = getattr(owner, p)
            setattr(owner, leaf, part)

    def stack(self) -> tuple[nn.Embedding, nn.ModuleList, nn.Module, nn.Module | None]:
        """(token embedding, layers, final norm, LM head or None if tied to the embedding)."""
        parts = []
        for name in self.stack_names:
            part = self
            for p in name.split("."):
                part = getattr(part, p)
            parts.append(part)
        return tuple(parts)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | list | None = None,
        use_cache: bool = False,
        replace_position: torch.Tensor | None = None,
        logits_range: tuple[int, int] | None = None,
        block_length: int | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **_: Any,
    ) -> ModelOutput:
        """Run the network on ``input_ids`` [B, T], or on ``inputs_embeds`` [B, T, D] (exactly one is given).

        ``inputs_embeds`` enters where the token embedding's output would (cast to the embedding's dtype);
        ``inputs_embeds=self.embed(input_ids)`` gives the ids' logits bit for bit, with every cache mode.
        ``attention_mask`` ([B, key length], 1 = real token) masks padding keys (a block-diffusion model also
        takes an explicit 4-D boolean mask with ``position_ids``). ``past_key_values`` and
        ``replace_position`` select the cache mode (see ``base.py``). ``block_length`` overrides a
        block-diffusion model's block size (0 = full bidirectional attention; full-attention models ignore
        it). ``logits_range=(a, b)`` computes the LM head only for query positions ``[a, b)`` (saves memory
        with large vocabularies).
        """
        embed, layers, norm, head = self.stack()
        x = self.first_activations(embed, input_ids, inputs_embeds)
        inputs = (x, attention_mask, position_ids, past_key_values, replace_position)
        ctx = self.attention_context(block_length, *inputs)
        x, presents = self.run_layers(layers, x, ctx, self.rope.cos_sin(ctx.positions, x.dtype))
        if logits_range is not None:
            x = x[:, logits_range[0] : logits_range[1]]
        x = norm(x)
        logits = F.linear(x, embed.weight) if head is None else head(x)
        if self.fp32_logits:
            logits = logits.float()
        return ModelOutput(logits=logits, past_key_values=KVCache(presents) if use_cache else None)

    def attention_context(self, block_length: int | None, *inputs: Any) -> AttentionInputs:
        """Cache mode, query positions and key-padding mask of one forward (full attention: ``block_length``
        ignored); ``inputs`` are the arguments of :func:`~fewstep.models.base.attention_inputs`."""
        return attention_inputs(*inputs)

    @staticmethod
    def first_activations(
        embed: nn.Embedding, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """The first layer's input ``[B, T, D]``: the token embedding of ``input_ids``, or ``inputs_embeds``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            return embed(input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != embed.embedding_dim:
            raise ValueError(
                f"inputs_embeds must be [B, T, {embed.embedding_dim}], got shape {tuple(inputs_embeds.shape)}"
            )
        return inputs_embeds.to(embed.weight.dtype)

    # -- the input embedding, for callers that build their own inputs (soft embeddings) ---------------
    def input_embeddings(self) -> torch.Tensor:
        """The input embedding matrix ``[V, D]`` (the parameter itself, not a copy: read it under no_grad)."""
        return self.stack()[0].weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings ``[..., D]`` of token ``ids``: exactly what ``forward`` feeds its first layer."""
        return self.stack()[0](ids)

    def mask_embedding(self) -> torch.Tensor:
        """The input embedding ``[D]`` of the mask token (``config.mask_token_id``)."""
        return self.input_embeddings()[int(self.config.mask_token_id)]


class BlockDecoderLM(DecoderLM, BlockDiffusionLM):
    """A block-diffusion :class:`DecoderLM`: block-causal attention (see ``block.py``), and module names
    that are the checkpoint names (``model.*`` and a top-level ``lm_head``)."""

    def attention_context(self, block_length: int | None, *inputs: Any) -> AttentionInputs:
        """The block-causal mask of ``block_length`` (None: the model's) or an explicit 4-D mask, see
        :func:`~fewstep.models.block.block_inputs`."""
        return block_inputs(*inputs, self.resolve_block_length(block_length))

    @staticmethod
    def checkpoint_key(module_key: str) -> str:
        """Module names are the checkpoint names (``model.layers.0...``, ``lm_head.weight``)."""
        return module_key

    @staticmethod
    def module_key(checkpoint_key: str) -> str | None:
        return checkpoint_key if checkpoint_key.startswith(("model.", "lm_head.")) else None

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random init (benchmarks, tests): normal(0, std) matrices, unit norms, zero biases."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif p.dim() == 1:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
