"""Command implementations of the ``fewstep`` CLI, one module per command (``add_arguments`` and ``run``).

Model arguments go through the one resolver, :func:`fewstep.assets.resolve_model`. What the commands
share (the decoding, device, threads and output-folder flags) is declared once in
:mod:`fewstep.commands.common`.
"""
