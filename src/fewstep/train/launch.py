"""What ``fewstep pretrain`` and ``fewstep distill`` do around the trainer: open the run, resume it, say so."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fewstep.distributed import close_process_group_at_exit


def open_run(out: str | Path, *, bf16: bool, cpu: bool, overwrite: bool) -> Any:
    """The ``accelerate`` Accelerator of a run writing to ``out`` (bf16 autocast or not; the CPU when asked
    or when there is no GPU, so that ``torchrun`` processes form a gloo group), its process group closed at
    exit; with ``overwrite`` the main process deletes ``out`` first and every process waits for it."""
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=cpu or not torch.cuda.is_available())
    close_process_group_at_exit()
    if overwrite and Path(out).exists() and accelerator.is_main_process:
        shutil.rmtree(out)
    accelerator.wait_for_everyone()
    return accelerator


def resume(trainer: Any, command: str) -> None:
    """Resume ``trainer`` from its run folder when it holds a compatible run (ValueError otherwise) and, on
    the main process, print ``fewstep <command>: resuming ...`` with the schedule settings that changed."""
    changes = trainer.resume_checked()
    if changes is None or not trainer.accelerator.is_main_process:
        return
    print(f"fewstep {command}: resuming {trainer.out} from step {trainer.step}")
    if changes:
        print(f"fewstep {command}: continuing with changed settings: " + "; ".join(changes))
