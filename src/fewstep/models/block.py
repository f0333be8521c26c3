"""What the block-diffusion families (LLaDA2-MoE, SDAR) share: block-causal attention.

Block-causal attention, as the official code builds it (dFactory's ``generate``, SDAR's
``block_diff_mask``): the sequence is cut into blocks of ``block_length`` positions counted from
position 0, and a query attends to **every** position of its own block and of all earlier blocks
(bidirectional inside a block, causal across blocks). fewstep counts the positions of a left-padded
row from its first real token (see :func:`fewstep.models.base.resolve_positions`), so the block
boundaries of a padded row are exactly those the row has alone, and padding keys are never attended.

Because a committed block never attends to later blocks, the KV cache of the committed blocks is
**exact** for these models (unlike the approximate cache of full-attention LLaDA/Dream): the
``prefix`` mode of :meth:`~fewstep.models.base.DiffusionLM.denoise` gives the uncached logits.

``block_length`` 0 (or None) means full bidirectional attention, which is what the official forwards
compute with ``attention_mask=None`` (LLaDA2, SDPA) or an all-ones mask (SDAR).
"""

from __future__ import annotations

from typing import Any

import torch

from fewstep.models.base import (
    AttentionInputs,
    DiffusionLM,
    RaggedMask,
    attention_inputs,
    ragged_rows,
    resolve_positions,
)


def block_causal_mask(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    key_valid: torch.Tensor | None,
    block_length: int | None,
) -> torch.Tensor | None:
    """SDPA boolean mask ``[B, 1, Tq, Lk]`` (True = attend): same or earlier block, and not a padding key.

    None when nothing is masked (full attention, no padding), so SDPA takes its unmasked kernel.
    """
    allowed = None
    if block_length:
        qb = torch.div(query_positions, block_length, rounding_mode="floor")
        kb = torch.div(key_positions, block_length, rounding_mode="floor")
        allowed = kb[:, None, :] <= qb[:, :, None]
    if key_valid is not None:
        valid = key_valid[:, None, :].expand(-1, query_positions.shape[1], -1)
        allowed = valid if allowed is None else allowed & valid
    return None if allowed is None else allowed[:, None]


def block_inputs(
    inputs: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_key_values,
    replace_position: torch.Tensor | None,
    block_length: int | None,
) -> AttentionInputs:
    """The attention inputs of one block-diffusion forward (``inputs``: the query ids ``[B, T]`` or
    embeddings ``[B, T, D]``).

    ``attention_mask`` is either the usual 2-D padding mask (the block-causal mask is built from the
    positions) or an explicit 4-D boolean mask ``[B, 1, Tq, Lk]`` (True = attend) with ``position_ids``,
    e.g. the ``[noisy | clean]`` training mask of :func:`fewstep.distill.dparallel.block_diffusion_mask`.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool or position_ids is None:
            raise ValueError("a 4-D attention_mask must be boolean (True = attend) and come with position_ids")
        ctx = attention_inputs(inputs, None, position_ids, past_key_values, replace_position)
        return AttentionInputs(ctx.positions, attention_mask, ctx.past, ctx.columns, explicit_rows(attention_mask))
    ctx = attention_inputs(inputs, attention_mask, position_ids, past_key_values, replace_position)
    return block_attention_inputs(ctx, attention_mask, block_length, inputs.shape[0])


def explicit_rows(mask: torch.Tensor) -> RaggedMask | None:
    """The rows of an explicit mask ``[B, 1, Tq, Lk]`` that attend apart: each over the keys any of its
    queries sees (padding keys, seen by none, left out), with its slice of the mask; None when every row
    sees every key (nothing padded)."""
    keys = mask[:, 0].any(1)
    if bool(keys.all()):
        return None
    return ragged_rows(keys.tolist(), None, mask)


def block_attention_inputs(
    ctx: AttentionInputs, attention_mask: torch.Tensor | None, block_length: int | None, batch: int
) -> AttentionInputs:
    """Replace the key-padding mask of ``ctx`` by the block-causal mask over every key of this forward."""
    if ctx.columns is not None or ctx.past is None:
        key_len = ctx.past.length if ctx.columns is not None else ctx.positions.shape[1]
    else:
        key_len = ctx.past.length + ctx.positions.shape[1]
    device = ctx.positions.device
    key_pos = resolve_positions(batch, key_len, 0, attention_mask, None, None, device)
    valid = None if ctx.mask is None else ctx.mask[:, 0, 0, :]
    mask = block_causal_mask(ctx.positions, key_pos, valid, block_length)
    ragged = None if ctx.ragged is None else RaggedMask(ctx.ragged.groups, mask)
    return AttentionInputs(ctx.positions, mask, ctx.past, ctx.columns, ragged)


class BlockDiffusionLM(DiffusionLM):
    """Base of the block-diffusion models: ``block_length`` is the block size of block-causal attention.

    ``forward(..., block_length=None)`` uses ``self.block_length`` (from the config, settable by the
    decoding loop); ``block_length=0`` forces full bidirectional attention.
    """

    logit_shift = 0
    block_diffusion = True
    block_length: int = 32

    def resolve_block_length(self, block_length: int | None) -> int:
        return self.block_length if block_length is None else int(block_length)


def attention_block(model: Any) -> int | None:
    """The block size of a block-diffusion model's attention (LLaDA2, SDAR); None for full attention."""
    return int(model.block_length) if getattr(model, "block_diffusion", False) else None
