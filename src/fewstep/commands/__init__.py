"""Command implementations of the ``fewstep`` CLI, one module per command (``add_arguments`` and ``run``).

Model arguments go through the one resolver, :func:`fewstep.assets.resolve_model`.
``EOS_FILL_HELP`` is the help of the ``--eos-fill`` flag every decoding command takes.
"""

from __future__ import annotations

EOS_FILL_HELP = (
    "d3LLM's end-of-text stop: once an EOS is committed, every later position becomes EOS at once and a row "
    "with no mask left stops (no forward spent after the EOS; --no-early-stop does not turn it off)"
)
