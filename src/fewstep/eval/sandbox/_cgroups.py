"""Per-program control groups: a memory cap for the whole process tree and a process-count cap.

Used where the harness may create cgroups (root, or a delegated cgroup v2 subtree): cgroup v1 with the
``memory`` and ``pids`` hierarchies, or cgroup v2 with both controllers enabled for our cgroup's
children. Each program gets a fresh child group of the harness's own group, removed afterwards.
Where neither is possible the layer is simply absent (``probe()`` returns None) and the sandbox relies
on the per-process rlimits alone.

The verdict reads the groups' event counters (:meth:`ProgramCgroup.events`): an OOM event (v2
``memory.events`` ``oom``/``oom_kill``, v1 ``memory.oom_control`` ``oom_kill``) or a refused fork
(``pids.events`` ``max``) means the tree hit its cap, whichever process the kernel chose to kill or
refuse. With v2, ``memory.oom.group = 1`` makes the kernel kill the whole tree at once; v1 has no such
switch, so the harness kills the tree itself as soon as it sees the counter move.

Where it can, the group also accounts the tree's CPU time (v1 ``cpuacct.usage``, v2 ``cpu.stat``
``usage_usec``, which every v2 group has): the harness's tree-wide CPU limit.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

_counter = itertools.count()
PREFIX = "fewstep-sbx-"


def _own_paths() -> dict[str, str]:
    """Controller (or "" for the v2 unified hierarchy) -> our cgroup path, from /proc/self/cgroup."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    return paths


def _mounts() -> list[tuple[str, str, list[str]]]:
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, fstype, opts, *_ = line.split()
        out.append((point, fstype, opts.split(",")))
    return out


@dataclass
class CgroupLayout:
    """Where to create per-program groups: version and parent directories."""

    version: int
    memory_parent: Path
    pids_parent: Path
    cpu_parent: Path | None = None  # v1 cpuacct hierarchy (None: no tree-wide CPU accounting); v2: memory_parent

    def describe(self) -> str:
        cpu = "" if self.version == 1 and self.cpu_parent is None else ", cpu time"
        return f"cgroup v{self.version} (memory: {self.memory_parent}, pids: {self.pids_parent}{cpu})"


def _writable_dir(path: Path) -> bool:
    probe = path / f"{PREFIX}probe-{os.getpid()}-{next(_counter)}"
    try:
        probe.mkdir()
    except OSError:
        return False
    with contextlib.suppress(OSError):
        probe.rmdir()
    return True


def probe() -> CgroupLayout | None:
    """Find a place where per-program memory+pids groups can be made, or None."""
    try:
        own = _own_paths()
        mounts = _mounts()
    except OSError:
        return None
    v1 = {}
    for point, fstype, opts in mounts:
        if fstype == "cgroup":
            for c in ("memory", "pids", "cpuacct"):
                if c in opts and c in own:
                    v1[c] = Path(point) / own[c].lstrip("/")
    if {"memory", "pids"} <= set(v1) and _writable_dir(v1["memory"]) and _writable_dir(v1["pids"]):
        cpu = v1.get("cpuacct")
        return CgroupLayout(1, v1["memory"], v1["pids"], cpu if cpu is not None and _writable_dir(cpu) else None)
    for point, fstype, _ in mounts:
        if fstype == "cgroup2" and "" in own:
            parent = Path(point) / own[""].lstrip("/")
            try:
                enabled = (parent / "cgroup.subtree_control").read_text().split()
            except OSError:
                continue
            if {"memory", "pids"} <= set(enabled) and _writable_dir(parent):
                return CgroupLayout(2, parent, parent)
    return None


@dataclass
class ProgramCgroup:
    """The group(s) of one program run."""

    layout: CgroupLayout
    dirs: list[Path] = field(default_factory=list)

    @classmethod
    def create(cls, layout: CgroupLayout, memory: int, processes: int) -> ProgramCgroup:
        name = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        group = cls(layout)
        try:
            if layout.version == 1:
                mem, pids = layout.memory_parent / name, layout.pids_parent / name
                mem.mkdir()
                group.dirs.append(mem)
                pids.mkdir()
                group.dirs.append(pids)
                if layout.cpu_parent is not None:
                    (layout.cpu_parent / name).mkdir()
                    group.dirs.append(layout.cpu_parent / name)
                (mem / "memory.limit_in_bytes").write_text(str(memory))
                swap = mem / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(str(memory))
                (pids / "pids.max").write_text(str(processes))
            else:
                d = layout.memory_parent / name
                d.mkdir()
                group.dirs.append(d)
                (d / "memory.max").write_text(str(memory))
                if (d / "memory.oom.group").exists():  # one OOM kill takes the whole tree
                    (d / "memory.oom.group").write_text("1")
                if (d / "memory.swap.max").exists():
                    (d / "memory.swap.max").write_text("0")
                (d / "pids.max").write_text(str(processes))
        except OSError:
            group.remove()
            raise
        return group

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        return found

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the group until it is empty."""
        for d in self.dirs:
            kill = d / "cgroup.kill"
            if kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
        deadline = time.monotonic() + timeout
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)

    def cpu_seconds(self) -> float | None:
        """CPU time used so far by every task of the group (None where it is not accounted)."""
        for d in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                if self.layout.version == 1 and (d / "cpuacct.usage").exists():
                    return int((d / "cpuacct.usage").read_text()) / 1e9
                if self.layout.version == 2:
                    for line in (d / "cpu.stat").read_text().splitlines():
                        if line.startswith("usage_usec "):
                            return int(line.split()[1]) / 1e6
        return None

    def events(self) -> dict[str, int]:
        """Limit events so far: ``oom`` (times the tree hit its memory cap with nothing to reclaim),
        ``oom_kill`` (processes the OOM killer took) and ``pids_max`` (forks refused by ``pids.max``)."""
        found = {"oom": 0, "oom_kill": 0, "pids_max": 0}
        wanted = {
            "memory.events": {"oom": "oom", "oom_kill": "oom_kill"},  # v2
            "memory.oom_control": {"oom_kill": "oom_kill"},  # v1 (no "oom" count there)
            "pids.events": {"max": "pids_max"},
        }
        for d in self.dirs:
            for name, keys in wanted.items():
                try:
                    text = (d / name).read_text()
                except OSError:
                    continue
                for line in text.splitlines():
                    key, _, value = line.partition(" ")
                    if key in keys and value.strip().isdigit():
                        found[keys[key]] = max(found[keys[key]], int(value))
        return found

    def oom_killed(self) -> bool:
        """Whether the tree hit its memory cap (an OOM event or kill inside the group)."""
        ev = self.events()
        return ev["oom"] > 0 or ev["oom_kill"] > 0

    def remove(self) -> None:
        for d in reversed(self.dirs):
            for _ in range(200):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)
        self.dirs = []


def prune_stale(layout: CgroupLayout) -> None:
    """Remove empty groups left by harness processes that no longer exist (e.g. after SIGKILL)."""
    for parent in {layout.memory_parent, layout.pids_parent, layout.cpu_parent} - {None}:
        try:
            entries = list(parent.iterdir())
        except OSError:
            continue
        for d in entries:
            if not d.name.startswith(PREFIX) or not d.is_dir():
                continue
            owner = d.name[len(PREFIX) :].split("-")[0]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                with contextlib.suppress(OSError):
                    d.rmdir()
