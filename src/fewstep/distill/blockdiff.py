"""Training views of block-diffusion models (LLaDA2-MoE, SDAR), shared by every paper's objective on them.

dFactory (``train_llada2_bd_with_dparallel.py``) trains a block-diffusion model on ``[noisy | clean]``:
the two halves take the same positions ``0..n-1`` and the training mask (:func:`block_diffusion_mask`)
lets noisy block b see its own noisy block and the clean blocks before it, exactly the state block b is
decoded in (committed blocks in the exact cache). :func:`block_diffusion_logits` is the one builder of
those views; :func:`mdm_noise` is dFactory's masker (``process_mdm_tokenized_example``).
"""

from __future__ import annotations

import torch
from torch import nn

from fewstep.train.objective import unwrap


def mdm_noise(
    input_ids: torch.Tensor,
    prompt_lengths: list[int] | torch.Tensor,
    mask_id: int,
    generator: torch.Generator,
    noise_range: tuple[float, float] = (0.3, 0.8),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noisy_input_ids, labels)`` as ``process_mdm_tokenized_example`` draws them, row by row.

    Per row: ``t = U·(hi − lo) + lo`` from one ``torch.rand(1)``, then ``torch.rand(L) < t`` masks the
    positions ``≥ prompt_length``; labels are the clean ids at masked positions and -100 elsewhere.
    """
    lo, hi = noise_range
    noisy, labels = input_ids.clone(), torch.full_like(input_ids, -100)
    for i in range(input_ids.shape[0]):
        t = torch.rand(1, generator=generator) * (hi - lo) + lo
        draw = torch.rand(input_ids.shape[1], generator=generator) < t
        draw[: int(prompt_lengths[i])] = False
        noisy[i, draw] = mask_id
        labels[i, draw] = input_ids[i, draw]
    return noisy, labels


def block_diffusion_mask(length: int, block_size: int, device: torch.device | None = None) -> torch.Tensor:
    """The ``[2n, 2n]`` boolean training mask over ``[noisy | clean]`` (True = attend), dFactory's layout.

    Noisy block b sees its own noisy block and the clean blocks before b; clean block b sees the clean
    blocks up to b (block-causal); clean never sees noisy.
    """
    blk = torch.arange(length, device=device) // block_size
    same = blk[:, None] == blk[None, :]
    earlier = blk[None, :] < blk[:, None]
    causal = blk[None, :] <= blk[:, None]
    top = torch.cat((same, earlier), dim=1)
    bottom = torch.cat((torch.zeros_like(same), causal), dim=1)
    return torch.cat((top, bottom), dim=0)


def block_size_of(model: nn.Module, block_size: int | None = None) -> int:
    """``block_size``, else the block length of the block-diffusion ``model`` (through peft/DDP wrappers);
    ValueError for a model without block-causal attention (LLaDA, Dream)."""
    inner = unwrap(model)
    if not getattr(inner, "block_diffusion", False):
        name = getattr(inner, "architecture", type(inner).__name__)
        raise ValueError(f"the block-diffusion objectives need a block-causal model (llada2, sdar), not {name}")
    return int(block_size or inner.block_length)


def block_diffusion_logits(
    model: nn.Module,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    block_size: int,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The noisy half's logits of one ``[noisy | clean]`` forward under :func:`block_diffusion_mask`.

    Both halves take positions ``0..n-1``, so noisy block b is computed exactly as when block b is decoded
    against the exact cache of the clean blocks before it. ``key_valid`` ``[B, n]`` (True = a real token)
    also hides the right padding of each row, in both halves, as keys.
    """
    b, n = noisy.shape
    mask = block_diffusion_mask(n, block_size, noisy.device)[None, None].expand(b, 1, 2 * n, 2 * n)
    if key_valid is not None:
        mask = mask & torch.cat((key_valid, key_valid), dim=1).bool()[:, None, None, :]
    pos = torch.arange(n, device=noisy.device).repeat(2)[None].expand(b, -1)
    out = model(input_ids=torch.cat((noisy, clean), dim=1), attention_mask=mask, position_ids=pos)
    return out.logits[:, :n]
