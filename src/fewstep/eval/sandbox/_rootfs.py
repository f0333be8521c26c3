"""The program's file system, from an allow-list: what a sandboxed program may see of the host.

One plan serves both isolations that build a root: the ``namespaces`` launcher applies it itself
(``_launcher._apply_plan``) and ``bwrap`` gets it as bubblewrap options (:func:`bwrap_args`), so the
two show the program the same tree:

* read-only: the system's programs and libraries (``/usr`` and the ``/bin``, ``/sbin``, ``/lib*``
  links or folders), the dynamic loader's configuration (``/etc/ld.so.*``, ``/etc/alternatives``) and
  the interpreter (the executable, every link on its way, and its prefixes: the standard library and
  the packages of its environment);
* created by the sandbox: the parents of those paths as empty 0755 folders (so a 0700 ``/root`` holding
  the interpreter shows only the interpreter), a minimal ``/dev``, a ``/proc`` of the program's own
  processes, and one size- and inode-capped tmpfs for ``/sandbox`` (the working directory), ``/tmp``
  and ``/dev/shm``.

Nothing else exists inside: no host ``/tmp``, ``/run``, ``/var``, home folders, ``/sys`` or other
``/etc`` files, and so no host socket to connect to.
"""

from __future__ import annotations

import json
import os
import subprocess

from fewstep.eval.sandbox._launcher import SANDBOX_WORKDIR, SCRATCH_STAGE

SYSTEM_PATHS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
)
# Paths the sandbox makes itself: an interpreter that lives there cannot be shown.
RESERVED = ("/proc", "/dev", "/tmp", SANDBOX_WORKDIR, SCRATCH_STAGE)

_PREFIXES: dict[str, list[str]] = {}
_PLANS: dict[str, list[list[str]]] = {}


def interpreter_prefixes(python: str) -> list[str]:
    """``sys.prefix``, ``base_prefix``, ``exec_prefix``, ``base_exec_prefix`` of ``python`` (asked once)."""
    if python not in _PREFIXES:
        code = (
            "import sys, json; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))"
        )
        try:
            out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True)
            _PREFIXES[python] = sorted(set(json.loads(out.stdout)))
        except (OSError, subprocess.SubprocessError, ValueError):
            _PREFIXES[python] = []
    return _PREFIXES[python]


def _allow(path: str, binds: set[str], links: dict[str, str], depth: int = 0) -> None:
    """Add ``path``: a read-only bind of its real location, and every symlink met on the way to it."""
    path = os.path.normpath(os.path.abspath(path))
    if depth > 40 or not os.path.lexists(path):
        return
    parts = [p for p in path.split("/") if p]
    for i in range(1, len(parts) + 1):
        hop = "/" + "/".join(parts[:i])
        if os.path.islink(hop):
            target = os.readlink(hop)
            links[hop] = target
            resolved = os.path.normpath(os.path.join(os.path.dirname(hop), target))
            _allow(os.path.join(resolved, *parts[i:]), binds, links, depth + 1)
            return
    binds.add(path)


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def root_plan(python: str) -> list[list[str]]:
    """The allow-list for ``python``: ``["dir", path]``, ``["ro", source, path]``, ``["symlink", target, path]``.

    Raises RuntimeError when the interpreter needs a path the sandbox replaces (``/tmp``, ``/dev``...).
    """
    if python in _PLANS:
        return _PLANS[python]
    binds: set[str] = set()
    links: dict[str, str] = {}
    for path in (*SYSTEM_PATHS, python, *interpreter_prefixes(python)):
        _allow(path, binds, links)
    kept = sorted(b for b in binds if not any(b != a and _under(b, a) for a in binds))
    kept_links = {q: t for q, t in links.items() if not any(_under(q, a) for a in kept)}
    for path in [*kept, *kept_links]:
        if path == "/" or any(_under(path, r) for r in RESERVED):
            raise RuntimeError(f"the interpreter {python} needs {path}, which the sandbox replaces with its own")
    parents = set()
    for path in [*kept, *kept_links]:
        parent = os.path.dirname(path)
        while parent != "/":
            parents.add(parent)
            parent = os.path.dirname(parent)
    plan = [["dir", d] for d in sorted(parents, key=lambda p: (p.count("/"), p))]
    plan += [["ro", b, b] for b in kept]
    plan += [["symlink", t, q] for q, t in sorted(kept_links.items())]
    _PLANS[python] = plan
    return plan


def bwrap_args(plan: list[list[str]], workdir: str, *, root: bool, caps: bool, scratch_size: int) -> list[str]:
    """bubblewrap's options for the same tree (the command itself follows them).

    ``caps``: bubblewrap keeps capabilities for the inner launcher (root, or an unprivileged user
    namespace), which then mounts the inode-capped tmpfs and the private ``/proc`` itself, exactly as
    the namespaces launcher does; bubblewrap only binds the host working directory read-only for it to
    copy the files from. Without (a setuid bubblewrap run by a user): bubblewrap's own size-capped
    tmpfs for ``/tmp`` and ``/dev/shm``, the host working directory bound read-write, no inode cap.
    """
    args = (
        ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        if root
        else ["--unshare-all"]
    )
    if caps:  # without root: uid 0 of bubblewrap's own user namespace (one level, so that it may mount)
        args += ["--cap-add", "ALL"] + ([] if root else ["--uid", "0", "--gid", "0"])
    args += ["--die-with-parent", "--new-session"]
    for op in plan:
        if op[0] == "dir":
            args += ["--perms", "0755", "--dir", op[1]]
        elif op[0] == "ro":
            args += ["--ro-bind", op[1], op[2]]
        else:
            args += ["--symlink", op[1], op[2]]
    args += ["--dev", "/dev", "--proc", "/proc"]
    if caps:
        args += ["--perms", "0755", "--dir", "/tmp", "--ro-bind", workdir, SANDBOX_WORKDIR]
    else:
        for target in ("/tmp", "/dev/shm"):
            args += ["--size", str(scratch_size), "--perms", "01777", "--tmpfs", target]
        args += ["--bind", workdir, SANDBOX_WORKDIR, "--remount-ro", "/"]
    return [*args, "--hostname", "sandbox", "--chdir", "/"]
