"""fewstep: few-step decoding and distillation for diffusion language models (LLaDA, Dream).

Public API::

    model = fewstep.load_model("path/to/LLaDA-8B-Instruct", dtype="bfloat16", device="cuda")
    tok = fewstep.load_tokenizer("path/to/LLaDA-8B-Instruct")
    out = fewstep.generate(model, input_ids, policy="threshold:0.9", gen_length=256, block_length=32, cache="dual")

A shipped model's name works wherever a folder does (``fewstep.load_model("teacher")``): see
:func:`fewstep.assets.resolve_model`. The package's layers are in docs/architecture.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "generate", "load_model", "load_tokenizer"]


def __getattr__(name: str):
    # Lazy imports keep `import fewstep` (and `fewstep --help`) free of torch.
    if name in ("load_model", "load_tokenizer"):
        from fewstep.models import loading

        return getattr(loading, name)
    if name == "generate":
        from fewstep.decoding import pipeline

        return pipeline.generate
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
