"""``python -m fewstep.eval.lm_eval ARGS``: lm-eval's own command line with the ``fewstep`` model registered.

lm-eval finds external models only if they were imported before it looks the name up (it has no
entry-point discovery), so this launcher imports the adapter and then hands ``ARGS`` to lm-eval's CLI
unchanged. ``--model fewstep`` is added when no ``--model`` is given, and ``--include_path`` with
fewstep's own task files (``gsm8k_fewstep``, ``gsm8k_dparallel``) when none is given. Under ``accelerate launch -m
fewstep.eval.lm_eval ...`` every process does the same and lm-eval shards the documents.
"""

from __future__ import annotations

import sys

LM_EVAL_SUBCOMMANDS = ("run", "ls", "validate")


def _given(args: list[str], *flags: str) -> bool:
    return any(a in flags or a.startswith(tuple(f + "=" for f in flags if f.startswith("--"))) for a in args)


def lm_eval_argv(args: list[str], tasks_dir: str | None = None) -> list[str]:
    """lm-eval's argv for ``args``: ``--model fewstep`` added to a run that names no model, and
    ``--include_path tasks_dir`` (fewstep's task files) when no include path is named."""
    args = list(args)
    if not args or any(a in ("-h", "--help") for a in args):
        return ["lm-eval", *args]
    is_run = args[0] not in LM_EVAL_SUBCOMMANDS[1:]
    if is_run and not _given(args, "--model", "-M", "-m"):
        args += ["--model", "fewstep"]
    if tasks_dir and not _given(args, "--include_path"):
        args += ["--include_path", tasks_dir]
    return ["lm-eval", *args]


def main(args: list[str] | None = None) -> int:
    """Register the ``fewstep`` model, then run lm-eval's CLI on ``args`` (default: ``sys.argv[1:]``)."""
    from lm_eval.__main__ import cli_evaluate

    from fewstep.eval.lm_eval import TASKS_DIR  # registers "fewstep"

    saved = sys.argv
    sys.argv = lm_eval_argv(sys.argv[1:] if args is None else args, str(TASKS_DIR))
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse --help / usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
