"""``python -m fewstep.eval.lm_eval ARGS``: lm-eval's own command line with the ``fewstep`` model registered.

lm-eval finds external models only if they were imported before it looks the name up (it has no
entry-point discovery), so this launcher imports the adapter and then hands ``ARGS`` to lm-eval's CLI
unchanged. ``--model fewstep`` is added when no ``--model`` is given. Under ``accelerate launch -m
fewstep.eval.lm_eval ...`` every process does the same and lm-eval shards the documents.
"""

from __future__ import annotations

import sys

LM_EVAL_SUBCOMMANDS = ("run", "ls", "validate")


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval's argv for ``args``: ``--model fewstep`` added to a run that names no model."""
    args = list(args)
    is_run = not args or args[0] not in LM_EVAL_SUBCOMMANDS[1:]
    named = any(a in ("--model", "-M", "-m") or a.startswith("--model=") for a in args)
    if is_run and args and not named and not any(a in ("-h", "--help") for a in args):
        args += ["--model", "fewstep"]
    return ["lm-eval", *args]


def main(args: list[str] | None = None) -> int:
    """Register the ``fewstep`` model, then run lm-eval's CLI on ``args`` (default: ``sys.argv[1:]``)."""
    from lm_eval.__main__ import cli_evaluate

    import fewstep.eval.lm_eval  # noqa: F401  (registers "fewstep")

    saved = sys.argv
    sys.argv = lm_eval_argv(sys.argv[1:] if args is None else args)
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse --help / usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
