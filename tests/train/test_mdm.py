"""LLaDA's masked-diffusion objective: the batch it builds and the loss it computes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fewstep.train.mdm import MaskedDiffusionObjective, mdm_loss, pad_prompt_response
from fewstep.train.objective import SpecialIds

IDS = SpecialIds(mask=4, eos=2, pad=0)
EXAMPLES = [
    {"prompt_ids": [10, 11, 12], "response_ids": [20, 21]},
    {"prompt_ids": [13], "response_ids": [22, 23, 24, 25]},
]


def test_padding_layout():
    x, att, resp = pad_prompt_response(EXAMPLES, IDS, gen_length=6)
    assert x.tolist() == [[10, 11, 12, 20, 21, 2, 2, 2, 2], [0, 0, 13, 22, 23, 24, 25, 2, 2]]
    assert att.tolist() == [[1] * 9, [0, 0] + [1] * 7]
    assert resp[:, 3:].all() and not resp[:, :3].any()


def test_collate_masks_only_the_response_and_is_reproducible():
    obj = MaskedDiffusionObjective(IDS, max_length=64, gen_length=6)
    many = EXAMPLES * 200
    b1 = obj.collate(many, torch.Generator().manual_seed(0))
    b2 = obj.collate(many, torch.Generator().manual_seed(0))
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    masked = b1["masked"]
    assert not masked[:, :3].any()  # prompt (and left padding) never masked
    assert torch.equal(b1["input_ids"][masked], torch.full((int(masked.sum()),), IDS.mask))
    assert torch.equal(b1["input_ids"][~masked], b1["labels"][~masked])
    assert ((b1["t"] >= 1e-3) & (b1["t"] <= 1)).all()
    assert (b1["answer_len"] == 6).all()
    # the masking rate follows t: E[masked fraction | t] = t
    frac = masked[:, 3:].float().mean(1)
    assert abs(float((frac - b1["t"]).mean())) < 0.03
    # EOS padding is a training target like any token
    assert (b1["labels"][masked] == IDS.eos).any()


def test_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    masked = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    t = torch.tensor([0.5, 0.25])
    answer_len = torch.tensor([4, 2])
    ce = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), reduction="none").reshape(2, 5)
    row0 = (ce[0, 1] + ce[0, 2]) / 0.5 / 4
    row1 = ce[1, 3] / 0.25 / 2
    expect = (row0 + row1) / 2
    got = mdm_loss(logits, labels, masked, t, answer_len)
    assert math.isclose(float(got), float(expect), rel_tol=1e-6)


def test_loss_is_an_unbiased_bound_of_the_full_ce():
    """E_t,mask[loss] equals the mean per-token CE of the whole answer when the logits ignore the mask."""
    torch.manual_seed(1)
    obj = MaskedDiffusionObjective(IDS, max_length=64, gen_length=6)

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.l = logits

        def forward(self, input_ids, attention_mask=None):
            return type("O", (), {"logits": self.l.expand(input_ids.shape[0], -1, -1)})()

    table = torch.randn(1, 9, 30)
    batch = obj.collate([EXAMPLES[0]] * 4000, torch.Generator().manual_seed(2))
    loss, _ = obj.loss(Fixed(table), batch, step=0, max_steps=1)
    labels = batch["labels"][0, 3:]
    full = F.cross_entropy(table[0, 3:], labels).item()
    assert abs(loss.item() - full) / full < 0.05


def test_dream_alignment_shifts_logits_by_one():
    obj = MaskedDiffusionObjective(IDS, max_length=64)
    obj.logit_shift = 1

    class Echo(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return type("O", (), {"logits": torch.arange(input_ids.shape[1]).float()[None, :, None]})()

    out = obj.logits(Echo(), torch.zeros(1, 4, dtype=torch.long))
    assert out[0, :, 0].tolist() == [0.0, 0.0, 1.0, 2.0]
