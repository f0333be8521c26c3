"""Command implementations of the ``fewstep`` CLI, one module per command.

``resolve_model`` and ``SHIPPED_HELP`` are re-exported from :mod:`fewstep.assets` (the one
resolver of model arguments that the library, the CLI and lm-eval share).
"""

from __future__ import annotations

from fewstep.assets import SHIPPED_HELP, resolve_model, shipped_models

__all__ = ["SHIPPED_HELP", "resolve_model", "shipped_models"]
