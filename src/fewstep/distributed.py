"""Process-group hygiene for runs under ``torchrun`` / ``accelerate launch``: training, rollouts and lm-eval.

A low-layer utility (it imports nothing of fewstep), so that evaluation need not import the trainer.
"""

from __future__ import annotations

import atexit

_registered = False


def close_process_group() -> None:
    """Destroy the default process group if one is open (accelerate opens it and never closes it). Left to
    the interpreter's teardown, gloo's threads can be destroyed while still running and abort a rank that
    finished first (``terminate called without an active exception``, seen once on a loaded machine)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def close_process_group_at_exit() -> None:
    """Register :func:`close_process_group` to run at interpreter exit (once per process)."""
    global _registered
    if not _registered:
        atexit.register(close_process_group)
        _registered = True
