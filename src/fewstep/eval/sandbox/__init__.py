"""A sandbox for generated code: one program per isolated process tree, with limits and a hard timeout.

>>> from fewstep.eval.sandbox import Sandbox, Limits
>>> box = Sandbox(Limits(timeout=5))
>>> box.run("print(sum(range(10)))").stdout
'45\\n'

Whatever the program does (loops forever, forks without end, allocates without end, prints
gigabytes, kills its parent, calls ``setsid`` and double-forks, writes outside its folder, opens
sockets), :meth:`Sandbox.run` returns a :class:`RunResult` in bounded time and leaves no process
behind. Isolation layers, chosen by ``isolation`` (see ``docs/evaluation.md`` for what each one
guarantees and what was measured):

* ``"namespaces"``: mount/PID/network/IPC/UTS namespaces set up by fewstep's launcher (directly as
  root, inside a user namespace otherwise): read-only file system except a size-capped tmpfs working
  directory, no network, and the kernel kills the whole tree when PID 1 of the namespace ends.
* ``"bwrap"``: the same isolation through bubblewrap, when installed.
* ``"process"``: no namespaces: session + subreaper sweep; no network or file-system isolation beyond
  what the unprivileged uid gives (root only).
* ``"auto"`` (default): the first of those that passes a start-up probe.

On top of any of them: rlimits (address space, processes, file size, open files, CPU), an empty
capability set with ``no_new_privs``, a fresh unprivileged uid when the harness is root, a per-program
cgroup (memory for the whole tree, process count) where cgroups can be created, a scrubbed
environment, and output capture cut at ``Limits.output`` bytes per stream.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fewstep.eval.sandbox import _cgroups, _launcher

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ISOLATIONS = ("auto", "namespaces", "bwrap", "process")
LAUNCHER = str(Path(__file__).with_name("_launcher.py"))
PROGRAM_NAME = "main.py"
# Sandbox uids/gids are drawn from [UID_BASE, UID_BASE + 2**24): far above any real account.
UID_BASE = 0x50000000


@dataclass(frozen=True)
class Limits:
    """Per-program limits. Sizes in bytes, times in seconds."""

    timeout: float = 10.0  # wall clock, from fork to exit
    memory: int = 2 * GiB  # address space per process; also the cgroup memory cap of the whole tree
    processes: int = 64  # RLIMIT_NPROC (unprivileged uid) and the cgroup's pids.max
    file_size: int = 16 * MiB  # largest file the program may write (RLIMIT_FSIZE)
    output: int = 1 * MiB  # captured stdout and stderr are each cut at this size
    open_files: int = 256  # RLIMIT_NOFILE
    workdir_size: int = 64 * MiB  # size of the tmpfs working directory (namespaces mode)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"sandbox limit {name} must be positive, got {value}")


@dataclass
class RunResult:
    """How one program ended."""

    exit_code: int | None  # None when killed by a signal, timed out or never started
    signal: int | None = None  # the signal that ended it, if any
    timed_out: bool = False
    oom_killed: bool = False  # the cgroup's OOM killer acted
    error: str | None = None  # the sandbox itself failed (the program did not run or was not observed)
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: float = 0.0
    isolation: str = ""

    @property
    def passed(self) -> bool:
        """The program ran to completion and exited with status 0."""
        return self.error is None and not self.timed_out and self.exit_code == 0

    @property
    def reason(self) -> str:
        """One line saying why the run passed or failed."""
        if self.timed_out:
            return f"timeout after {self.duration:.3g} s"
        if self.oom_killed:
            return "memory limit exceeded (killed by the cgroup OOM killer)"
        if self.error is not None:
            return f"sandbox error: {self.error}"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        last = _last_error_line(self.stderr)
        if self.exit_code == 0:
            return "passed" + (" (output cut)" if self.stdout_truncated or self.stderr_truncated else "")
        return f"exit code {self.exit_code}" + (f": {last}" if last else "")


def _last_error_line(stderr: str) -> str:
    for line in reversed(stderr.strip().splitlines()):
        if line.strip():
            return line.strip()[:300]
    return ""


@dataclass
class _Probe:
    ok: bool
    detail: str


_PROBES: dict[tuple[Any, ...], _Probe] = {}
_PROBE_LOCK = threading.Lock()


@dataclass
class Sandbox:
    """Runs Python programs in isolation. Thread-safe: :meth:`run_many` runs several at once.

    ``isolation``: one of :data:`ISOLATIONS`. ``cgroups``: ``None`` uses them where they can be
    created, ``False`` never. ``python``: the interpreter that runs programs; ``None`` (default) means
    this one (same packages importable) or, when the unprivileged sandbox uid cannot start it under the
    chosen isolation (e.g. a virtual environment under a 0700 ``/root`` without namespaces), the
    system's ``python3`` (the benchmarks' programs need only the standard library).
    """

    limits: Limits = field(default_factory=Limits)
    isolation: str = "auto"
    python: str | None = None
    cgroups: bool | None = None
    force_remount: bool = False  # test hook: use bind-remounts instead of mount_setattr

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"unknown sandbox isolation {self.isolation!r} (choose one of {', '.join(ISOLATIONS)})")
        self._resolved: str | None = None
        self._python: str = self.python or sys.executable
        self._cgroup_layout: _cgroups.CgroupLayout | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ setup

    @property
    def is_root(self) -> bool:
        return os.geteuid() == 0

    def resolve(self) -> str:
        """The isolation actually used (probing once per process for ``"auto"``). Raises if unusable."""
        with self._lock:
            if self._resolved is None:
                if self.cgroups is not False:
                    self._cgroup_layout = _cgroups.probe()
                    if self._cgroup_layout is not None:
                        _cgroups.prune_stale(self._cgroup_layout)
                    elif self.cgroups:
                        raise RuntimeError("cgroups were requested but no writable memory+pids cgroup was found")
                isolations = ["namespaces", "bwrap", "process"] if self.isolation == "auto" else [self.isolation]
                pythons = [self.python] if self.python else _default_interpreters()
                failures = []
                for name in isolations:
                    for python in pythons:
                        probe = self._probe(name, python)
                        if probe.ok:
                            self._resolved, self._python = name, python
                            return name
                        failures.append(f"{name} with {python}: {probe.detail}")
                raise RuntimeError("no usable sandbox isolation: " + "; ".join(failures))
            return self._resolved

    @property
    def interpreter(self) -> str:
        """The interpreter programs run with (after :meth:`resolve`)."""
        self.resolve()
        return self._python

    def _probe(self, name: str, python: str) -> _Probe:
        key = (name, python, os.geteuid(), self.force_remount)
        with _PROBE_LOCK:
            if key not in _PROBES:
                if name == "bwrap" and shutil.which("bwrap") is None:
                    _PROBES[key] = _Probe(False, "bubblewrap (bwrap) is not installed")
                else:
                    res = self._run(
                        name, "print('fewstep-sandbox-ok')", Limits(timeout=30), cgroup=False, python=python
                    )
                    ok = res.passed and res.stdout.strip() == "fewstep-sandbox-ok"
                    _PROBES[key] = _Probe(ok, "ok" if ok else res.reason + " " + res.stderr.strip()[-300:])
            return _PROBES[key]

    def describe(self) -> dict[str, str]:
        """The isolation layers in force, in words (for logs, summaries and the docs)."""
        iso = self.resolve()
        layers = {
            "isolation": iso,
            "interpreter": self._python,
            "user": (
                "fresh unprivileged uid/gid per program (harness is root)"
                if self.is_root
                else ("user namespace (uid 0 inside, no capabilities)" if iso == "namespaces" else "the harness's uid")
            ),
            "cgroup": self._cgroup_layout.describe() if self._cgroup_layout else "none (rlimits only)",
            "network": "none (empty network namespace)" if iso in ("namespaces", "bwrap") else "NOT isolated",
            "filesystem": {
                "namespaces": "read-only everything; tmpfs working directory capped at workdir_size",
                "bwrap": "read-only everything; working directory bind-mounted read-write",
                "process": "unprivileged uid: only world-writable places besides the working directory"
                if self.is_root
                else "NOT isolated beyond the harness user's permissions",
            }[iso],
            "kill": {
                "namespaces": "PID namespace: the kernel kills every process when its PID 1 ends",
                "bwrap": "PID namespace (bwrap) + subreaper sweep",
                "process": "subreaper sweep" + (" + kill by uid" if self.is_root else "") + " + process group",
            }[iso],
        }
        return layers

    # ------------------------------------------------------------------ running

    def run(
        self,
        program: str,
        *,
        files: dict[str, str | bytes] | None = None,
        stdin: str | bytes | None = None,
        limits: Limits | None = None,
    ) -> RunResult:
        """Run ``program`` (Python source) as ``main.py`` in a fresh working directory; never raises for what the program does."""
        return self._run(self.resolve(), program, limits or self.limits, files=files, stdin=stdin)

    def run_many(
        self,
        programs: Sequence[str],
        *,
        workers: int = 2,
        on_result: Callable[[int, RunResult], None] | None = None,
    ) -> list[RunResult]:
        """Run many programs, ``workers`` at a time; ``on_result(index, result)`` is called as each finishes."""
        self.resolve()
        results: list[RunResult | None] = [None] * len(programs)

        def job(i: int) -> None:
            results[i] = self.run(programs[i])
            if on_result is not None:
                on_result(i, results[i])

        if workers <= 1 or len(programs) <= 1:
            for i in range(len(programs)):
                job(i)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fewstep-sandbox") as pool:
                for fut in [pool.submit(job, i) for i in range(len(programs))]:
                    fut.result()
        return [r for r in results if r is not None]

    def _run(
        self,
        mode: str,
        program: str,
        limits: Limits,
        *,
        files: dict[str, str | bytes] | None = None,
        stdin: str | bytes | None = None,
        cgroup: bool = True,
        python: str | None = None,
    ) -> RunResult:
        python = python or self._python
        workdir = tempfile.mkdtemp(prefix="fewstep-sandbox-")
        uid = UID_BASE + secrets.randbelow(1 << 24) if self.is_root else None
        group: _cgroups.ProgramCgroup | None = None
        proc: subprocess.Popen | None = None
        fds: list[int] = []
        try:
            all_files: dict[str, str | bytes] = {**(files or {}), PROGRAM_NAME: program}
            if stdin is not None:
                all_files[".stdin"] = stdin
            for name, content in all_files.items():
                if "/" in name or name in ("", ".", ".."):
                    raise ValueError(f"sandbox file names must be plain names, got {name!r}")
                data = content.encode() if isinstance(content, str) else content
                Path(workdir, name).write_bytes(data)
            if uid is not None and mode != "namespaces":
                for p in [workdir, *(os.path.join(workdir, n) for n in all_files)]:
                    os.chown(p, uid, uid)
            if cgroup and self._cgroup_layout is not None:
                # headroom for the launcher and PID 1 (two small Python processes)
                try:
                    group = _cgroups.ProgramCgroup.create(
                        self._cgroup_layout, limits.memory + 64 * MiB, limits.processes + 4
                    )
                except OSError as exc:  # never run without a layer that the probe found
                    return RunResult(None, error=f"could not create the program's cgroup: {exc}", isolation=mode)
            env = {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": workdir,
                "TMPDIR": workdir,
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
                "PYTHONHASHSEED": "0",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONIOENCODING": "utf-8",
                "OMP_NUM_THREADS": "1",
                "OPENBLAS_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
            }
            status_r, status_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            fds += [status_r, status_w, out_r, out_w, err_r, err_w]
            cfg = {
                "mode": mode,
                "userns": mode == "namespaces" and not self.is_root,
                "workdir": workdir,
                "argv": [python, "-s", "-B", PROGRAM_NAME],
                "env": env,
                "timeout": limits.timeout,
                "limits": {
                    "memory": limits.memory,
                    "processes": limits.processes,
                    "file_size": limits.file_size,
                    "open_files": limits.open_files,
                    "cpu": int(limits.timeout) + 1,
                    "workdir_size": limits.workdir_size,
                },
                "uid": uid,
                "gid": uid,
                "cgroups": [str(d) for d in group.dirs] if group else [],
                "status_fd": status_w,
                "parent_pid": os.getpid(),
                "stdin": os.path.join(workdir, ".stdin") if stdin is not None else None,
                "force_remount": self.force_remount,
                "bwrap_argv": _bwrap_argv(workdir, python, uid is not None) if mode == "bwrap" else None,
                "expose": _interpreter_paths(python) if mode == "namespaces" and uid is not None else [],
            }
            if not os.access(python, os.X_OK):
                return RunResult(None, error=f"interpreter not found or not executable: {python}", isolation=mode)
            proc = subprocess.Popen(
                [python, "-I", "-S", "-B", LAUNCHER, json.dumps(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                pass_fds=(status_w,),
                start_new_session=True,
                close_fds=True,
                env={"PATH": env["PATH"], "LANG": "C.UTF-8"},
            )
            for fd in (status_w, out_w, err_w):
                os.close(fd)
                fds.remove(fd)
            out, err, status_raw = _collect(proc, out_r, err_r, status_r, limits)
            status = _parse_status(status_raw, proc)
            oom = group.oom_killed() if group else False
            return RunResult(
                exit_code=status.get("exit"),
                signal=status.get("signal"),
                timed_out=bool(status.get("timed_out")),
                oom_killed=oom
                and not status.get("timed_out")
                and status.get("exit") != 0,  # an OOM kill the program survived is no failure
                error=status.get("error"),
                stdout=out[0].decode("utf-8", "replace"),
                stderr=err[0].decode("utf-8", "replace"),
                stdout_truncated=out[1],
                stderr_truncated=err[1],
                duration=float(status.get("duration") or 0.0),
                isolation=mode,
            )
        finally:
            if proc is not None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
            if group is not None:
                group.kill_all()
            if uid is not None:
                _kill_uid(uid)
                if mode != "namespaces":
                    _remove_files_of(uid)
            if proc is not None:
                proc.wait()
            if group is not None:
                group.remove()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            _remove_tree(workdir)


def _default_interpreters() -> list[str]:
    """This interpreter first, then the system's python3 (readable by any uid on standard installs)."""
    found = [sys.executable]
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK) and os.path.realpath(candidate) != os.path.realpath(sys.executable):
            found.append(candidate)
    return found


_INTERPRETER_PATHS: dict[str, list[str]] = {}


def _interpreter_paths(python: str) -> list[str]:
    """Directories the interpreter needs at start-up: every symlink hop of the executable and its prefixes."""
    if python not in _INTERPRETER_PATHS:
        paths = []
        hop = os.path.abspath(python)
        for _ in range(40):
            paths.append(os.path.dirname(hop))
            if not os.path.islink(hop):
                break
            hop = os.path.join(os.path.dirname(hop), os.readlink(hop))
        paths.append(os.path.dirname(os.path.realpath(python)))
        code = (
            "import sys, json; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))"
        )
        try:
            out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True)
            paths += json.loads(out.stdout)
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        _INTERPRETER_PATHS[python] = sorted({os.path.realpath(p) for p in paths} | {os.path.normpath(p) for p in paths})
    return _INTERPRETER_PATHS[python]


def _bwrap_argv(workdir: str, python: str, drop_uid: bool) -> list[str]:
    argv = [shutil.which("bwrap") or "bwrap"]
    if os.geteuid() == 0:  # no user namespace: the launcher inside drops to the sandbox uid itself
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    else:
        argv += ["--unshare-all"]
    argv += ["--die-with-parent", "--new-session"]
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/dev/shm"]
    if drop_uid:  # hide folders the sandbox uid may not traverse, except the interpreter's own
        plan = _launcher._blocked_ancestors(_interpreter_paths(python), workdir)
        for parent in dict.fromkeys(p for p, _ in plan):
            argv += ["--tmpfs", parent]
            for child in (c for p, c in plan if p == parent):
                argv += ["--ro-bind", os.path.join(parent, child), os.path.join(parent, child)]
            argv += ["--remount-ro", parent]
    argv += ["--bind", workdir, workdir, "--hostname", "sandbox", "--"]
    return argv


def _collect(
    proc: subprocess.Popen, out_r: int, err_r: int, status_r: int, limits: Limits
) -> tuple[tuple[bytes, bool], tuple[bytes, bool], bytes]:
    """Read stdout/stderr (each cut at ``limits.output``) and the status line until the launcher is done."""
    bufs = {out_r: bytearray(), err_r: bytearray(), status_r: bytearray()}
    cut = {out_r: False, err_r: False, status_r: False}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    # The launcher enforces the timeout itself; this is the backstop if it cannot.
    hard_deadline = time.monotonic() + limits.timeout + 10.0
    exited_at: float | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if proc.poll() is not None and exited_at is None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # something outside the launcher still holds a pipe open: stop listening
            if now > hard_deadline:
                break
            for key, _ in sel.select(timeout=0.05):
                fd = key.fd
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    continue
                room = limits.output - len(bufs[fd]) if fd != status_r else 1 << 16
                if room > 0:
                    bufs[fd] += chunk[:room]
                if len(chunk) > room:
                    cut[fd] = True
    finally:
        sel.close()
    return (bytes(bufs[out_r]), cut[out_r]), (bytes(bufs[err_r]), cut[err_r]), bytes(bufs[status_r])


def _parse_status(raw: bytes, proc: subprocess.Popen) -> dict[str, Any]:
    try:
        return json.loads(raw.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        code = proc.poll()
        return {"error": f"the sandbox launcher ended without a status (return code {code})", "exit": None}


def _kill_uid(uid: int) -> None:
    """SIGKILL every process owned by ``uid`` (a sandbox-only uid) until none is left."""
    for _ in range(1000):
        victims = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{name}").st_uid == uid:
                        victims.append(int(name))
        if not victims:
            return
        for pid in victims:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.002)


SHARED_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def _remove_files_of(uid: int) -> None:
    """Without a mount namespace a program may write to world-writable folders: remove what its uid left there."""
    for d in SHARED_WRITABLE_DIRS:
        with contextlib.suppress(OSError):
            for entry in os.scandir(d):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid == uid:
                        if entry.is_dir(follow_symlinks=False):
                            _remove_tree(entry.path)
                        else:
                            os.unlink(entry.path)


def _remove_tree(path: str) -> None:
    """Delete a folder tree; permissions are only ever relaxed inside it, never on its parents."""
    root = os.path.abspath(path)
    if not os.path.lexists(root):
        return

    def fix(func: Callable[..., Any], p: str, _exc: Any) -> None:
        parent = os.path.dirname(os.path.abspath(p))
        if parent == root or parent.startswith(root + os.sep):
            with contextlib.suppress(OSError):
                os.chmod(parent, 0o700)
                func(p)

    if os.path.isdir(root) and not os.path.islink(root):
        shutil.rmtree(root, onerror=fix)
    else:
        with contextlib.suppress(OSError):
            os.unlink(root)


__all__ = ["ISOLATIONS", "GiB", "KiB", "Limits", "MiB", "RunResult", "Sandbox"]
