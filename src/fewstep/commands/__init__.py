"""Command implementations of the ``fewstep`` CLI, one module per command."""
