"""Command implementations of the ``fewstep`` CLI, one module per command.

``resolve_model`` and ``SHIPPED_HELP`` are re-exported from :mod:`fewstep.assets` (the one
resolver of model arguments that the library, the CLI and lm-eval share); ``EOS_FILL_HELP`` is the help
of the ``--eos-fill`` flag every decoding command takes.
"""

from __future__ import annotations

from fewstep.assets import SHIPPED_HELP, resolve_model, shipped_models

EOS_FILL_HELP = (
    "d3LLM's end-of-text stop: once an EOS is committed, every later position becomes EOS at once and a row "
    "with no mask left stops (no forward spent after the EOS; --no-early-stop does not turn it off)"
)

__all__ = ["EOS_FILL_HELP", "SHIPPED_HELP", "resolve_model", "shipped_models"]
