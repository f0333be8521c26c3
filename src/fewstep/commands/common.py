"""What the commands share, declared once: the decoding flags, the device/dtype/threads flags, the output
folder flags, and how each is applied.

* :func:`add_decoding_arguments`: ``--policy --cache --gen-length --block-length --no-early-stop
  --eos-fill``; unset
  means the model's recommended decoding, else the library's defaults
  (:mod:`fewstep.decoding.defaults`), resolved by :func:`decoding_settings`.
* :func:`add_device_arguments`: ``--device --dtype --threads``; :func:`device_and_dtype` gives the one
  device/dtype default (:func:`fewstep.models.loading.device_and_dtype`), :func:`apply_threads` the one
  thread default (:func:`default_threads`).
* :func:`add_output_arguments`: ``--out --overwrite --allow-existing``; :func:`prepare_out` applies the
  output-folder rule of :mod:`fewstep.outputs`.

docs/cli.md documents all of them once. This module imports nothing heavy: a command's ``--help`` stays
fast.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterable
from typing import Any

from fewstep.decoding.defaults import CACHE_MODES, SETTINGS, describe_default

#: The help of ``--eos-fill`` (every decoding command takes it, with the early-stop flag).
EOS_FILL_HELP = (
    "d3LLM's end-of-text stop: once an EOS is committed, every later position becomes EOS at once and a row "
    "with no mask left stops (no forward spent after the EOS; --no-early-stop does not turn it off)"
)

#: ``--dtype`` values: the canonical names and their short forms.
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
DTYPES.update(float16="float16", fp16="float16", half="float16")
_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")


# -- argument types (argparse reports a bad value in one line) ------------------------------------------------


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}")
    return value


def device_name(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``xpu`` (whether it is present is checked when a model loads)."""
    name = text.strip().lower()
    if not _DEVICE.match(name):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps")
    return name


def dtype_name(text: str) -> str:
    """``float32``, ``bfloat16`` or ``float16`` (or fp32, bf16, fp16, half)."""
    name = DTYPES.get(text.strip().lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use float32, bfloat16 or float16")
    return name


# -- decoding -------------------------------------------------------------------------------------------------


def add_decoding_arguments(
    parser: Any,
    *,
    policy: bool = True,
    policy_help: str | None = None,
    early_stop: bool = True,
    prefix: str = "",
) -> None:
    """The decoding flags, each unset by default (None: the model's decoding.json, else the library default).

    ``policy=False`` leaves ``--policy`` to the command (``sweep``'s swept policy); ``prefix`` starts
    every help text (``serve``: "default ")."""
    if policy:
        parser.add_argument(
            "--policy",
            default=None,
            metavar="NAME[:ARGS]",
            help=policy_help or f"{prefix}unmasking policy (default: {describe_default('policy')})",
        )
    parser.add_argument(
        "--cache",
        default=None,
        choices=CACHE_MODES,
        help=f"{prefix}KV cache mode; prefix and dual trade accuracy for speed, see docs/decoding.md "
        f"(default: {describe_default('cache')})",
    )
    parser.add_argument(
        "--gen-length",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"{prefix}answer length in tokens (default: {describe_default('gen_length')})",
    )
    parser.add_argument(
        "--block-length",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"{prefix}semi-autoregressive block length (default: {describe_default('block_length')})",
    )
    if early_stop:
        parser.add_argument(
            "--no-early-stop",
            dest="early_stop",
            action="store_false",
            default=None,
            help="decode every block even after the answer's EOS (same answer, more forwards; the reference "
            "samplers' behaviour; default: stop after the block holding the EOS, unless the model's "
            "decoding.json says otherwise)",
        )
        parser.add_argument("--eos-fill", action="store_true", help=EOS_FILL_HELP)


def decoding_settings(args: argparse.Namespace, model: Any = None) -> dict[str, Any]:
    """The decoding settings of a command: each flag given, else ``model``'s (a folder or a loaded model)
    recommended decoding, else the library's defaults (:func:`fewstep.decoding.defaults.resolve_decoding`)."""
    from fewstep.decoding.defaults import resolve_decoding

    return resolve_decoding({k: getattr(args, k, None) for k in SETTINGS}, model)


def given_decoding(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding flags as given (None where unset), for a library call that resolves them per model."""
    return {k: getattr(args, k, None) for k in SETTINGS}


# -- device, dtype, threads -----------------------------------------------------------------------------------


def add_device_arguments(parser: Any, *, device: bool = True, dtype_help: str | None = None) -> None:
    """``--device`` (default: cuda when available, else cpu), ``--dtype`` (default: bfloat16 on a GPU,
    float32 elsewhere) and ``--threads``."""
    if device:
        parser.add_argument(
            "--device",
            type=device_name,
            default=None,
            help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)",
        )
    parser.add_argument(
        "--dtype",
        type=dtype_name,
        default=None,
        help=dtype_help or "float32, bfloat16, float16 (default: bfloat16 on a GPU, float32 on a CPU)",
    )
    add_threads_argument(parser)


def add_threads_argument(parser: Any) -> None:
    """``--threads``: torch's CPU threads (default: :func:`default_threads`)."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: as many as the CPU cores this process may use, divided among the "
        "processes of a multi-process run and capped by the cores left idle by other work; $OMP_NUM_THREADS "
        "when set; see docs/cli.md)",
    )


def default_threads(processes: int | None = None) -> int | None:
    """The CPU threads a computing command uses when ``--threads`` is not given, or None to keep torch's own
    choice (``$OMP_NUM_THREADS`` set: torch already follows it).

    The cores this process may run on are shared among the ``processes`` of the run (default: the local
    processes of ``torchrun`` / ``accelerate launch``, ``$LOCAL_WORLD_SIZE``), and capped by the cores the
    rest of the machine leaves idle (the 1-minute load average), never below 1: on a shared 2-core machine
    running two other CPU-bound jobs a command takes one thread instead of oversubscribing the cores."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    procs = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    try:
        idle = cores - round(os.getloadavg()[0])
    except OSError:
        idle = cores
    return max(1, min(cores // max(procs, 1), idle))


def apply_threads(args: argparse.Namespace, processes: int | None = None) -> int:
    """Set torch's CPU threads to ``--threads`` or :func:`default_threads`; returns the count in use."""
    import torch

    n = getattr(args, "threads", None) or default_threads(processes)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()


def device_and_dtype(args: argparse.Namespace) -> tuple[str, str]:
    """``(device, dtype)`` of a command: the flags, else the one default
    (:func:`fewstep.models.loading.device_and_dtype`)."""
    from fewstep.models.loading import device_and_dtype as pick

    return pick(getattr(args, "device", None), getattr(args, "dtype", None))


# -- output folders -------------------------------------------------------------------------------------------


def add_output_arguments(
    parser: Any, *, help: str, default: str | None = None, required: bool = False, overwrite: bool = True
) -> None:
    """``--out``, ``--overwrite`` (delete a folder this command made and start again) and ``--allow-existing``
    (write into a non-empty folder fewstep did not make); the rule: :mod:`fewstep.outputs`."""
    parser.add_argument("--out", default=default, required=required, metavar="DIR", help=help)
    if overwrite:
        parser.add_argument(
            "--overwrite",
            action="store_true",
            help="delete --out and start again; only a folder this command made (it holds run.json), never one "
            "holding this run's inputs",
        )
    parser.add_argument(
        "--allow-existing",
        action="store_true",
        help="write into a non-empty --out that fewstep did not make (its files are kept; without this the "
        "command refuses such a folder)",
    )


def prepare_out(args: argparse.Namespace, command: str, inputs: Iterable[Any] = (), on_existing: str = "resume") -> Any:
    """Check and claim ``args.out`` for ``command`` (:func:`fewstep.outputs.prepare_output`)."""
    from fewstep.outputs import prepare_output

    return prepare_output(
        args.out,
        command,
        overwrite=getattr(args, "overwrite", False),
        allow_existing=getattr(args, "allow_existing", False),
        inputs=inputs,
        on_existing=on_existing,
    )


def output_plan(args: argparse.Namespace, command: str, inputs: Iterable[Any] = (), on_existing: str = "resume"):
    """Only the check of :func:`prepare_out` (every process of a multi-process run makes it; the main one then
    claims the folder: :func:`fewstep.outputs.claim_output`)."""
    from fewstep.outputs import check_output

    return check_output(
        args.out,
        command,
        overwrite=getattr(args, "overwrite", False),
        allow_existing=getattr(args, "allow_existing", False),
        inputs=inputs,
        on_existing=on_existing,
    )
