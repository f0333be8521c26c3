"""What ``fewstep pretrain`` and ``fewstep distill`` do around the trainer: open the run, resume it, say so."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fewstep.distributed import close_process_group_at_exit
from fewstep.outputs import check_output, claim_output


def open_run(
    out: str | Path,
    *,
    bf16: bool,
    cpu: bool,
    overwrite: bool,
    command: str,
    inputs: Iterable[Any] = (),
    allow_existing: bool = False,
) -> Any:
    """The ``accelerate`` Accelerator of a run writing to ``out`` (bf16 autocast or not; the CPU when asked
    or when there is no GPU, so that ``torchrun`` processes form a gloo group), its process group closed at
    exit. Every process checks the run folder first (:func:`fewstep.outputs.check_output`: ``--overwrite``
    deletes only a folder this command made and never one holding ``inputs``); then the main process
    claims it (deleting it with ``overwrite``) while the others wait."""
    import torch
    from accelerate import Accelerator

    plan = check_output(out, command, overwrite=overwrite, allow_existing=allow_existing, inputs=inputs)
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=cpu or not torch.cuda.is_available())
    close_process_group_at_exit()
    accelerator.wait_for_everyone()  # every process has checked the folder before the main one changes it
    if accelerator.is_main_process:
        claim_output(plan)
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
