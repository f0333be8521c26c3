"""Float tolerances that hold on any CPU of the kind, not only on the machine a test was written on.

Two float32 computations of the same function in another order (another kernel, tensor shape, batch
layout, attention mask or KV-cache path) agree to a few units in the last place of the numbers they
sum, so their difference scales with the magnitude of the result, not with each element: a logit of 0.01
next to logits of 20 carries the rounding of 20. :func:`assert_close_to_scale` therefore bounds
``|got - want|`` by ``rel`` times the largest ``|want|`` of the tensor. ``SCALE_RTOL`` = 1e-5 is about 84
float32 ulps of that scale (eps = 1.19e-7): measured differences on the fixtures are 0.7-1.4e-6 of it
(5-12 ulps: a block-diffusion view against the decoding state, 2.67e-5 on logits of magnitude 19.6), and
CPUs with other SIMD widths (AVX2, AVX-512, NEON) reassociate the sums differently, so 7x headroom keeps
the suite green on them; a masking or caching bug moves logits by O(1) of the scale, 1e5 times more.

Loss values are compared as the fixtures README states: relative (``rtol ≈ 1e-4``), never absolute.
"""

from __future__ import annotations

import torch

SCALE_RTOL = 1e-5


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, rel: float = SCALE_RTOL, msg: str = "") -> None:
    """``|got - want| <= rel * max|want|`` everywhere (and the same shape)."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    assert got.shape == want.shape, f"{msg} shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    worst = float((got.detach().double() - want.detach().double()).abs().max()) if want.numel() else 0.0
    assert worst <= rel * scale, (
        f"{msg} max |diff| {worst:.3g} > {rel:g} x scale {scale:.3g} ({worst / max(scale, 1e-30):.2e})"
    )
