"""What counts as a user mistake, and how the command line states one.

The library reports a mistake of its caller (a bad argument, a missing or malformed input file, an
output folder it must not touch) as :class:`UsageError` or as one of the standard exceptions listed in
:data:`USER_ERRORS`; the ``fewstep`` command line catches exactly these, in one place
(:func:`fewstep.cli.main`), prints :func:`one_line` of the message and exits with status 2. Anything
else is a bug and keeps its traceback. A low-layer module: it imports nothing of fewstep.
"""

from __future__ import annotations

#: Exit status of a command stopped by a user mistake (argparse's own).
USAGE_EXIT = 2
#: The longest message :func:`one_line` prints before cutting it.
MAX_MESSAGE = 600


class UsageError(ValueError):
    """A mistake of the caller, stated so that the user can fix it (one sentence, naming the flag or file)."""


#: The exceptions a command stops on with one line and exit status 2. ``ValueError`` is the library's
#: convention for a bad argument or file content (:class:`UsageError` and the engine's ``RequestError`` are
#: ValueErrors); ``OSError`` covers missing, unreadable and unwritable paths (``FileNotFoundError``,
#: ``PermissionError``, ``IsADirectoryError``, a full disk, a port in use).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (whitespace runs folded), at most :data:`MAX_MESSAGE` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."
