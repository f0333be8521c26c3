"""A sandbox for generated code: one program per isolated process tree, with limits and a positive pass signal.

>>> from fewstep.eval.sandbox import Sandbox, Limits
>>> box = Sandbox(Limits(timeout=5))
>>> box.run("print(sum(range(10)))").stdout
'45\\n'

Whatever the program does (loops forever, forks without end, allocates without end, prints
gigabytes, floods its folder with files, kills its parent, calls ``setsid`` and double-forks, writes
outside its folder, connects to host sockets, exits early with status 0), :meth:`Sandbox.run` returns
a :class:`RunResult` in bounded time and leaves no process behind. Isolation layers, chosen by
``isolation`` (see ``docs/evaluation.md`` for what each one guarantees and what was measured):

* ``"namespaces"``: PID/network/IPC/UTS/cgroup/mount namespaces set up by fewstep's launcher (directly
  as root, inside a user namespace otherwise); the program's root is built from an allow-list (the
  interpreter and system libraries read-only, a minimal ``/dev``, a ``/proc`` of its own processes, one
  size- and inode-capped tmpfs for its folder, ``/tmp`` and ``/dev/shm``); the kernel kills the whole
  tree when PID 1 of the namespace ends.
* ``"bwrap"``: the same root and namespaces through bubblewrap, when installed.
* ``"process"``: no namespaces: session + subreaper sweep; no network or file-system isolation beyond
  what the unprivileged uid gives (root only).
* ``"auto"`` (default): the first of those that passes a start-up probe.

On top of any of them: a positive pass signal (the program passes only when a runner that the
harness starts before it reports, on a pipe and with a per-run nonce, that ``main.py`` ran to its
end: exits, ``os._exit`` and atexit tricks fail), a seccomp filter (no UNIX-domain or other non-IP
sockets, no io_uring), rlimits (address space, processes, file size, open files, CPU), CPU time as the
time limit with the wall clock only as a generous backstop, an empty capability set with
``no_new_privs``, a fresh unprivileged uid when the harness is root, a per-program cgroup (memory and
kernel memory of the whole tree, process count, CPU time) where cgroups can be created, a scrubbed
environment, and output capture cut at ``Limits.output`` bytes per stream.

A program that hits a limit fails, every time, with the limit named in :attr:`RunResult.reason`
(``RunResult.limit``): the harness decides from its own observations (cgroup counters, the bytes it
read, the CPU time and wall clock the launcher measured, the state of the scratch file system), not
from which process the kernel chose to kill.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fewstep.eval.sandbox import _cgroups, _launcher, _rootfs

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ISOLATIONS = ("auto", "namespaces", "bwrap", "process")
LAUNCHER = str(Path(__file__).with_name("_launcher.py"))
RUNNER = str(Path(__file__).with_name("_runner.py"))
PROGRAM_NAME = "main.py"
# Sandbox uids/gids are drawn from [UID_BASE, UID_BASE + 2**24): far above any real account.
UID_BASE = 0x50000000
RESULT_BYTES = 4096  # what the harness keeps of the result pipe (the runner writes one short line)


@dataclass(frozen=True)
class Limits:
    """Per-program limits. Sizes in bytes, times in seconds."""

    timeout: float = 10.0  # CPU time of the program (its whole process tree where cgroups account it)
    memory: int = 2 * GiB  # address space per process; also the cgroup memory cap of the whole tree (+ 64 MiB)
    processes: int = 64  # tasks of the program's tree: the cgroup's pids.max, backed by RLIMIT_NPROC
    file_size: int = 16 * MiB  # largest file the program may write (RLIMIT_FSIZE)
    output: int = 1 * MiB  # stdout and stderr each: a program that writes more fails ("output limit exceeded")
    open_files: int = 256  # RLIMIT_NOFILE
    workdir_size: int = 64 * MiB  # bytes of the writable tmpfs (working directory + /tmp + /dev/shm)
    files: int = 10_000  # files and folders the program may create there (the tmpfs's nr_inodes)
    wall_timeout: float | None = None  # wall-clock backstop from start to exit; None: 4 x timeout + 10 s

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and value <= 0:
                raise ValueError(f"sandbox limit {name} must be positive, got {value}")

    @property
    def wall(self) -> float:
        """The wall-clock backstop in force: generous, so that a busy machine never decides a verdict."""
        return self.wall_timeout if self.wall_timeout is not None else 4 * self.timeout + 10


LIMIT_TEXT = {
    "memory": "memory limit exceeded",
    "output": "output limit exceeded",
    "processes": "process limit reached",
    "time": "timeout",
    "file_size": "file size limit exceeded",
    "open_files": "open file limit reached",
    "disk": "working directory full",
    "files": "file limit reached",
}


@dataclass
class RunResult:
    """How one program ended.

    ``limit`` names the limit the program hit (a key of :data:`LIMIT_TEXT`), or None. A program that
    hits a limit fails, whatever it did afterwards: the harness decides from what it observed itself
    (the CPU time and wall clock, the output it read, the cgroup's OOM and refused-fork counters, the
    scratch file system), never from which process the kernel happened to kill. Errors an rlimit
    returns to the program (``MemoryError``, ``File too large``...) fail it when they end it; see
    ``docs/evaluation.md``. ``completed``: the runner reported that ``main.py`` ran to its end (the
    positive pass signal); ``early_exit``: how the program ended itself before that, if it did.
    """

    exit_code: int | None  # None when killed by a signal, timed out or never started
    signal: int | None = None  # the signal that ended it, if any
    timed_out: bool = False  # it hit the time limit (CPU time, or the wall-clock backstop)
    oom_killed: bool = False  # the process tree hit the cgroup memory cap (OOM event)
    error: str | None = None  # the sandbox itself failed (the program did not run or was not observed)
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: float = 0.0  # wall clock of the program, seconds
    isolation: str = ""
    limit: str | None = None  # the limit the program hit, if any (see LIMIT_TEXT)
    limit_detail: str = ""  # which bound, in words (deterministic: the configured value, not a measurement)
    cpu_time: float = 0.0  # CPU seconds of the program (with the children it waited for)
    completed: bool = False  # the runner saw main.py run to its end (the positive pass signal)
    early_exit: str | None = None  # e.g. "SystemExit(0)", "os._exit(0)": how it ended itself before its end

    @property
    def passed(self) -> bool:
        """The program ran to its end (the runner said so), within every limit, and exited with status 0."""
        ok = self.error is None and not self.timed_out and self.limit is None
        return ok and self.exit_code == 0 and self.completed

    @property
    def reason(self) -> str:
        """One line saying why the run passed or failed (the same line for the same program, every run)."""
        if self.limit is not None:
            return LIMIT_TEXT[self.limit] + (f" ({self.limit_detail})" if self.limit_detail else "")
        if self.error is not None:
            return f"sandbox error: {self.error}"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        if self.exit_code == 0:
            if self.completed:
                return "passed"
            if self.early_exit:
                return f"early exit: {self.early_exit} before the end of the program (exiting early is a failure)"
            return "no result: the program ended with exit code 0 before its end (exec, or a low-level exit)"
        last = _last_error_line(self.stderr)
        return f"exit code {self.exit_code}" + (f": {last}" if last else "")


# The last stderr line of a program that an rlimit ended (only ever used to name the limit of a run
# that already failed: a program cannot turn a failure into a pass by printing these).
_SOFT_LIMITS = (
    ("MemoryError", "memory"),
    ("OSError: [Errno 27] File too large", "file_size"),
    ("OSError: [Errno 24] Too many open files", "open_files"),
    ("OSError: [Errno 28] No space left on device", "disk"),
)


def _last_error_line(stderr: str) -> str:
    for line in reversed(stderr.strip().splitlines()):
        if line.strip():
            return line.strip()[:300]
    return ""


class SandboxWarning(UserWarning):
    """``isolation="auto"`` settled on the weak ``process`` isolation (no network or file-system isolation)."""


def _fallback_warning(failures: list[str]) -> str:
    """The warning for ``auto`` landing on ``process``: why the stronger layers failed, what would help."""
    hint = ""
    if shutil.which("bwrap") is None:
        hint = (
            " Install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap, or .ci/install-system-packages)"
            " for the bwrap isolation."
        )
    return (
        "fewstep sandbox: generated code runs with the weaker 'process' isolation (no network or "
        "file-system isolation): " + "; ".join(failures) + "." + hint
    )


@dataclass
class _Probe:
    ok: bool
    detail: str


_PROBES: dict[tuple[Any, ...], _Probe] = {}
_PROBE_LOCK = threading.Lock()
# The start-up probe: the interpreter, a few standard-library extension modules (their shared
# libraries must be inside the root) and the writable places.
PROBE_PROGRAM = (
    "import bisect, collections, datetime, decimal, fractions, hashlib, heapq, itertools, json, math, random, re\n"
    "import os, tempfile\nopen('probe.txt', 'w').write('x')\ntempfile.TemporaryFile().close()\n"
    "print('fewstep-sandbox-ok')"
)


@dataclass
class Sandbox:
    """Runs Python programs in isolation. Thread-safe: :meth:`run_many` runs several at once.

    ``isolation``: one of :data:`ISOLATIONS`. ``cgroups``: ``None`` uses them where they can be
    created, ``False`` never. ``python``: the interpreter that runs programs; ``None`` (default) means
    this one (same packages importable) or, when the unprivileged sandbox uid cannot start it under the
    chosen isolation (e.g. a virtual environment under a 0700 ``/root`` in ``process`` isolation), the
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
                            if self.isolation == "auto" and name == "process":
                                warnings.warn(_fallback_warning(failures), SandboxWarning, stacklevel=3)
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
                    try:
                        res = self._run(name, PROBE_PROGRAM, Limits(timeout=30), cgroup=False, python=python)
                    except RuntimeError as exc:  # no root plan for this interpreter
                        _PROBES[key] = _Probe(False, str(exc))
                        return _PROBES[key]
                    ok = res.passed and res.stdout.strip() == "fewstep-sandbox-ok"
                    _PROBES[key] = _Probe(ok, "ok" if ok else (res.reason + " " + res.stderr.strip()[-300:]).strip())
            return _PROBES[key]

    def describe(self) -> dict[str, str]:
        """The isolation layers in force, in words (for logs, summaries and the docs)."""
        iso = self.resolve()
        caps = iso != "bwrap" or _bwrap_caps()
        return {
            "isolation": iso,
            "interpreter": self._python,
            "user": (
                "fresh unprivileged uid/gid per program (harness is root)"
                if self.is_root
                else ("user namespace (uid 0 inside, no capabilities)" if iso == "namespaces" else "the harness's uid")
            ),
            "cgroup": self._cgroup_layout.describe() if self._cgroup_layout else "none (rlimits only)",
            "network": "none (empty network namespace)" if iso != "process" else "NOT isolated (IP)",
            "sockets": "seccomp: no UNIX-domain or other non-IP sockets, no io_uring",
            "filesystem": (
                "allow-list root (interpreter, system libraries: read-only), minimal /dev, own-process /proc, "
                + ("one tmpfs of workdir_size bytes and `files` inodes for /sandbox, /tmp, /dev/shm")
                if iso != "process" and caps
                else (
                    "allow-list root; host working directory bound read-write, size-capped /tmp (setuid bubblewrap)"
                    if iso == "bwrap"
                    else (
                        "unprivileged uid: only world-writable places besides the working directory"
                        if self.is_root
                        else "NOT isolated beyond the harness user's permissions"
                    )
                )
            ),
            "time": "CPU time (primary), wall clock (backstop at 4 x timeout + 10 s by default)",
            "result": "positive pass signal: a nonce-tagged line from the runner after main.py ran to its end",
            "kill": {
                "namespaces": "PID namespace: the kernel kills every process when its PID 1 ends",
                "bwrap": "PID namespace (bwrap) + subreaper sweep",
                "process": "subreaper sweep" + (" + kill by uid" if self.is_root else "") + " + process group",
            }[iso],
        }

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
        plan = _rootfs.root_plan(python) if mode != "process" else []  # raises RuntimeError, before any work
        scratch = mode == "namespaces" or (mode == "bwrap" and _bwrap_caps())  # the launcher copies the files
        workdir = tempfile.mkdtemp(prefix="fewstep-sandbox-")
        uid = UID_BASE + secrets.randbelow(1 << 24) if self.is_root else None
        group: _cgroups.ProgramCgroup | None = None
        proc: subprocess.Popen | None = None
        fds: list[int] = []
        try:
            written = _write_files(workdir, program, files, stdin, None if scratch else uid)
            if cgroup and self._cgroup_layout is not None:
                try:
                    group = _cgroups.ProgramCgroup.create(
                        self._cgroup_layout, limits.memory + MEMORY_HEADROOM, limits.processes + HARNESS_TASKS[mode]
                    )
                except OSError as exc:  # never run without a layer that the probe found
                    return RunResult(None, error=f"could not create the program's cgroup: {exc}", isolation=mode)
            if not os.access(python, os.X_OK):
                return RunResult(None, error=f"interpreter not found or not executable: {python}", isolation=mode)
            pipes = {name: os.pipe() for name in ("status", "out", "err", "result", "nonce")}
            fds += [fd for pair in pipes.values() for fd in pair]
            nonce = secrets.token_hex(16).encode()
            os.write(pipes["nonce"][1], nonce)
            os.close(pipes["nonce"][1])
            fds.remove(pipes["nonce"][1])
            cfg = self._launcher_config(mode, python, workdir, limits, uid, group, pipes, stdin is not None, plan)
            src_fd, cfg_fd = _memfd("fewstep-launcher", _LAUNCHER_SOURCE), _memfd("fewstep-config", json.dumps(cfg))
            fds += [src_fd, cfg_fd]
            child_fds = (pipes["status"][1], pipes["nonce"][0], pipes["result"][1], src_fd, cfg_fd)
            proc = subprocess.Popen(
                [python, "-I", "-S", "-B", "-c", _launcher.BOOT, str(src_fd), str(cfg_fd)],
                stdin=subprocess.DEVNULL,
                stdout=pipes["out"][1],
                stderr=pipes["err"][1],
                pass_fds=child_fds,
                start_new_session=True,
                close_fds=True,
                env={"PATH": cfg["env"]["PATH"], "LANG": "C.UTF-8"},
            )
            for fd in (*child_fds, pipes["out"][1], pipes["err"][1]):
                os.close(fd)
                fds.remove(fd)
            watch = _hard_limit_watch(group, limits)

            def stop_program(_limit: str) -> None:
                self._stop_program(proc, group, uid)

            readers = {k: pipes[k][0] for k in ("out", "err", "status", "result")}
            streams, stopped = _collect(proc, readers, limits, watch, stop_program)
            status = _parse_status(streams["status"][0], proc)
            self._stop(proc, group, uid)  # the tree is gone before the counters are read
            events = group.events() if group else {}
            proc = None
            entries = 0 if scratch else _count_entries(workdir, limits.files + 1 + written) - written
            return _verdict(mode, limits, status, streams, nonce, stopped, events, entries)
        finally:
            if proc is not None:  # an exception on the way: the tree must not survive it
                self._stop(proc, group, uid)
            if uid is not None and mode == "process":
                _remove_files_of(uid)
            if group is not None:
                group.remove()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            _remove_tree(workdir)

    @staticmethod
    def _stop_program(proc: subprocess.Popen, group: _cgroups.ProgramCgroup | None, uid: int | None) -> None:
        """A limit was hit: kill the program now. The launcher, alive, reaps it, sweeps and reports.

        With a sandbox uid (root harness) one SIGKILL to each of its processes ends the program; the
        launcher (namespaces: the kernel; process and bwrap: its sweep) takes the rest. Without one, the
        launcher's session and the cgroup are killed whole (the launcher's report is then lost).
        """
        if uid is not None:
            for pid in _pids_of_uid(uid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            return
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        if group is not None:
            group.kill_all()

    @staticmethod
    def _stop(proc: subprocess.Popen, group: _cgroups.ProgramCgroup | None, uid: int | None) -> None:
        """SIGKILL the launcher's session, the program's cgroup and its uid; reap the launcher."""
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        if group is not None:
            group.kill_all()
        if uid is not None:
            _kill_uid(uid)
        proc.wait()

    def _launcher_config(
        self,
        mode: str,
        python: str,
        workdir: str,
        limits: Limits,
        uid: int | None,
        group: _cgroups.ProgramCgroup | None,
        pipes: dict[str, tuple[int, int]],
        has_stdin: bool,
        plan: list[list[str]],
    ) -> dict[str, Any]:
        """The launcher's JSON configuration (see ``_launcher.py``); it travels on a memfd, never on a command line."""
        inside = workdir if mode == "process" else _launcher.SANDBOX_WORKDIR
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": inside,
            "TMPDIR": inside,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONIOENCODING": "utf-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        # With a pids cgroup, its pids.max is the binding process limit (its refusals are counted, so the
        # verdict sees them); RLIMIT_NPROC, one above, only backs it up. Without one, RLIMIT_NPROC binds.
        nproc = limits.processes + 1 if group is not None and uid is not None else limits.processes
        bwrap = shutil.which("bwrap") or "bwrap"
        return {
            "mode": mode,
            "userns": mode == "namespaces" and not self.is_root,
            "host_workdir": workdir,
            "workdir": inside,
            "argv": [python, "-s", "-B", "-c", _RUNNER_SOURCE],
            "env": env,
            "cpu_limit": limits.timeout,
            "wall_timeout": limits.wall,
            "limits": {
                "memory": limits.memory,
                "processes": nproc,
                "file_size": limits.file_size,
                "open_files": limits.open_files,
                "cpu_rlimit": _cpu_rlimit(limits),
                "workdir_size": limits.workdir_size,
                "files": limits.files,
            },
            "uid": uid,
            "gid": uid,
            "cgroups": [str(d) for d in group.dirs] if group else [],
            "status_fd": pipes["status"][1],
            "nonce_fd": pipes["nonce"][0],
            "result_fd": pipes["result"][1],
            "parent_pid": os.getpid(),
            "stdin": os.path.join(inside, ".stdin") if has_stdin else None,
            "force_remount": self.force_remount,
            "rootfs": plan if mode == "namespaces" else [],
            "bwrap": bwrap,
            "bwrap_caps": _bwrap_caps(),
            "bwrap_args": (
                _rootfs.bwrap_args(
                    plan, workdir, root=self.is_root, caps=_bwrap_caps(), scratch_size=limits.workdir_size
                )
                if mode == "bwrap"
                else []
            ),
            "launcher_python": python,
        }


# Memory cap of the tree = limits.memory + this (the launcher and PID 1: two small Python processes).
MEMORY_HEADROOM = 64 * MiB
# Tasks of the harness itself inside the program's cgroup, per isolation: the launcher; + PID 1
# (namespaces); bwrap's monitor, bwrap's PID 1 and the inner launcher (bwrap). pids.max = processes +
# these, so the program's own tree may hold exactly ``processes`` tasks.
HARNESS_TASKS = {"process": 1, "namespaces": 2, "bwrap": 3}
# The tree-wide CPU check (cgroups) allows this much above the limit: it also counts the harness's
# own start-up (launcher, bubblewrap), and the program's own process is held to the exact limit.
TREE_CPU_SLACK = 0.5

_LAUNCHER_SOURCE = Path(LAUNCHER).read_text()
_RUNNER_SOURCE = Path(RUNNER).read_text()


def _cpu_rlimit(limits: Limits) -> int:
    """RLIMIT_CPU (soft) of each process: a whole second past the CPU limit, so that it only backs it up."""
    return math.ceil(limits.timeout) + 1


def _bwrap_caps() -> bool:
    """Whether bubblewrap can keep capabilities for the inner launcher (root, or a non-setuid bubblewrap)."""
    if os.geteuid() == 0:
        return True
    path = shutil.which("bwrap")
    try:
        return path is not None and not os.stat(path).st_mode & stat.S_ISUID
    except OSError:
        return False


def _memfd(name: str, content: str) -> int:
    fd = os.memfd_create(name)
    os.write(fd, content.encode())
    return fd


def _write_files(
    workdir: str, program: str, files: dict[str, str | bytes] | None, stdin: str | bytes | None, owner: int | None
) -> int:
    """Write the program's files into ``workdir``; returns how many."""
    all_files: dict[str, str | bytes] = {**(files or {}), PROGRAM_NAME: program}
    if stdin is not None:
        all_files[".stdin"] = stdin
    for name, content in all_files.items():
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"sandbox file names must be plain names, got {name!r}")
        data = content.encode() if isinstance(content, str) else content
        Path(workdir, name).write_bytes(data)
    if owner is not None:
        for p in [workdir, *(os.path.join(workdir, n) for n in all_files)]:
            os.chown(p, owner, owner)
    return len(all_files)


def _hard_limit_watch(group: _cgroups.ProgramCgroup | None, limits: Limits) -> Callable[[], str | None]:
    """A poll that names the cgroup limit the tree hit (``memory``, ``processes``, ``time``), or None."""

    def watch() -> str | None:
        if group is None:
            return None
        ev = group.events()
        if ev["oom"] or ev["oom_kill"]:
            return "memory"
        if ev["pids_max"]:
            return "processes"
        cpu = group.cpu_seconds()
        return "time" if cpu is not None and cpu > limits.timeout + TREE_CPU_SLACK else None

    return watch


def _read_result(raw: bytes, nonce: bytes) -> tuple[bool, str | None]:
    """(completed, early exit) from the result pipe: only lines tagged with this run's nonce count."""
    statuses = []
    for line in raw.split(b"\n"):
        if line.startswith(nonce + b" "):
            status, _, detail = line[len(nonce) + 1 :].decode("ascii", "replace").partition(" ")
            statuses.append((status, "".join(c for c in detail.strip() if c.isprintable())[:60]))
    early = next((detail for status, detail in statuses if status == "exit"), None)
    completed = any(s == "ok" for s, _ in statuses) and all(s == "ok" for s, _ in statuses)
    return completed, early


def _verdict(
    mode: str,
    limits: Limits,
    status: dict[str, Any],
    streams: dict[str, tuple[bytes, bool]],
    nonce: bytes,
    stopped: str | None,
    events: dict[str, int],
    entries: int,
) -> RunResult:
    """How the run ended, from what the harness observed. Hard limits first, in a fixed order.

    The harness's own observations decide (memory and process counters of the cgroup, the output it
    read, the CPU time and wall clock the launcher measured, the scratch file system's free inodes and
    bytes), in this order: memory, processes, output, CPU time, wall clock, files, disk. A program's
    status only counts when no limit was hit; the stderr of a program that already failed only names
    the rlimit that ended it; exit status 0 passes only with the runner's completion line.
    """
    out, err = streams["out"], streams["err"]
    completed, early = _read_result(streams["result"][0], nonce)
    res = RunResult(
        exit_code=status.get("exit"),
        signal=status.get("signal"),
        timed_out=bool(status.get("timed_out")),
        oom_killed=bool(events.get("oom") or events.get("oom_kill")),
        error=status.get("error"),
        stdout=out[0].decode("utf-8", "replace"),
        stderr=err[0].decode("utf-8", "replace"),
        stdout_truncated=out[1],
        stderr_truncated=err[1],
        duration=float(status.get("duration") or 0.0),
        isolation=mode,
        cpu_time=float(status.get("cpu") or 0.0),
        completed=completed,
        early_exit=early,
    )
    scratch = status.get("scratch") or {}
    soft = {
        "memory": f"a process went over its {limits.memory / MiB:g} MiB address space: MemoryError",
        "file_size": f"a file went over {limits.file_size} bytes",
        "open_files": f"more than {limits.open_files} open files",
        "disk": f"the {limits.workdir_size / MiB:g} MiB working directory is full",
    }
    if res.oom_killed:
        cap = (limits.memory + MEMORY_HEADROOM) / MiB
        res.limit, res.limit_detail = "memory", f"the process tree went over {cap:g} MiB"
    elif events.get("pids_max"):
        res.limit, res.limit_detail = "processes", f"a fork beyond {limits.processes} processes was refused"
    elif out[1] or err[1]:
        stream = "stdout" if out[1] else "stderr"
        res.limit, res.limit_detail = "output", f"more than {limits.output} bytes on {stream}"
    elif stopped == "time" or status.get("cpu_exceeded") or res.signal == signal.SIGXCPU:
        res.limit, res.limit_detail = "time", f"{limits.timeout:g} s CPU time"
    elif res.timed_out or stopped == "wall":
        res.limit = "time"
        res.limit_detail = f"{limits.wall:g} s wall clock, the backstop; the CPU limit is {limits.timeout:g} s"
    elif scratch.get("files_free") == 0 or entries > limits.files:
        res.limit, res.limit_detail = "files", f"at most {limits.files} files and folders"
    elif scratch.get("bytes_free") == 0:
        res.limit, res.limit_detail = "disk", soft["disk"]
    elif res.signal == signal.SIGXFSZ:
        res.limit, res.limit_detail = "file_size", soft["file_size"]
    elif stopped is None and res.error is None and res.exit_code not in (0, None):
        last = _last_error_line(res.stderr)
        for prefix, name in _SOFT_LIMITS:
            if last.startswith(prefix):
                res.limit, res.limit_detail = name, soft[name]
                break
    if res.limit == "time":
        res.timed_out = True
    if res.limit is not None:
        res.error = None  # the harness stopped the tree on purpose: a missing status is no sandbox error
    return res


def _count_entries(folder: str, cap: int) -> int:
    """Files and folders below ``folder``, counted up to ``cap`` (isolations without a scratch tmpfs)."""
    n = 0
    for _, dirs, names in os.walk(folder):
        n += len(dirs) + len(names)
        if n >= cap:
            return n
    return n


def _default_interpreters() -> list[str]:
    """This interpreter first, then the system's python3 (readable by any uid on standard installs)."""
    found = [sys.executable]
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK) and os.path.realpath(candidate) != os.path.realpath(sys.executable):
            found.append(candidate)
    return found


def _collect(
    proc: subprocess.Popen,
    readers: dict[str, int],
    limits: Limits,
    watch: Callable[[], str | None],
    on_limit: Callable[[str], None],
) -> tuple[dict[str, tuple[bytes, bool]], str | None]:
    """Read stdout, stderr, the status line and the result pipe until the launcher is done.

    The first time a limit is hit (``output``, or what ``watch`` reports: the cgroup's counters, polled
    every 50 ms at most), ``on_limit`` is called once to stop the program at once, and reading goes on
    until the launcher has reported. Returns each stream (stdout/stderr cut at ``limits.output``, the
    result pipe at :data:`RESULT_BYTES`, with whether it went over) and the limit hit first, if any.
    """
    caps = {"out": limits.output, "err": limits.output, "status": 1 << 16, "result": RESULT_BYTES}
    names = {fd: name for name, fd in readers.items()}
    bufs = {name: bytearray() for name in readers}
    cut = {name: False for name in readers}
    sel = selectors.DefaultSelector()
    for fd in names:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    # The launcher enforces the CPU and wall-clock limits itself; this is the backstop if it cannot.
    hard_deadline = time.monotonic() + limits.wall + 10.0
    exited_at: float | None = None
    stopped: str | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if proc.poll() is not None and exited_at is None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # something outside the launcher still holds a pipe open: stop listening
            hit = stopped or watch()
            if now > hard_deadline:
                hit = hit or "wall"
            for key, _ in sel.select(timeout=0.05):
                name = names[key.fd]
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                room = caps[name] - len(bufs[name])
                if room > 0:
                    bufs[name] += chunk[:room]
                if len(chunk) > room:
                    cut[name] = True
                    hit = hit or ("output" if name in ("out", "err") else None)
            if hit is not None and stopped is None:
                stopped = hit
                on_limit(hit)
            if stopped == "wall" and now > hard_deadline + 5.0:
                break
    finally:
        sel.close()
    return {name: (bytes(bufs[name]), cut[name]) for name in readers}, stopped


def _parse_status(raw: bytes, proc: subprocess.Popen) -> dict[str, Any]:
    try:
        return json.loads(raw.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        code = proc.poll()
        return {"error": f"the sandbox launcher ended without a status (return code {code})", "exit": None}


def _pids_of_uid(uid: int) -> list[int]:
    victims = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{name}").st_uid == uid:
                    victims.append(int(name))
    return victims


def _kill_uid(uid: int) -> None:
    """SIGKILL every process owned by ``uid`` (a sandbox-only uid) until none is left."""
    for _ in range(1000):
        victims = _pids_of_uid(uid)
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


__all__ = ["ISOLATIONS", "LIMIT_TEXT", "GiB", "KiB", "Limits", "MiB", "RunResult", "Sandbox", "SandboxWarning"]
