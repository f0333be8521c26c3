"""Sandbox launcher: runs ONE untrusted program under isolation and reports how it ended.

This file is executed by path (``python -I -S -B _launcher.py CONFIG_JSON``) by
:class:`fewstep.eval.sandbox.Sandbox`; it imports only the standard library and nothing from fewstep.
It is started in its own session, with the program's stdout/stderr pipes as its fds 1/2 and a status
pipe (``status_fd``) on which it writes one JSON line at the end:
``{"exit": int|null, "signal": int|null, "timed_out": bool, "error": str|null, "duration": float}``.

Modes (chosen by the harness, see ``docs/evaluation.md``):

* ``namespaces``: new mount, PID, network, IPC and UTS namespaces (plus a user namespace when not
  root). PID 1 of the new PID namespace makes every mount read-only, mounts a size-capped tmpfs as the
  working directory and a fresh ``/proc``, then forks the program. When the program or PID 1 ends (or
  the launcher dies: PID 1 has ``PR_SET_PDEATHSIG``), the kernel kills every process left in the
  namespace, including ones that called ``setsid``.
* ``process``: no namespaces. The launcher is a child subreaper, so orphaned descendants (double fork,
  ``setsid``) are re-parented to it and killed in a sweep when the program ends or times out.
* ``bwrap``: like ``process``, but the launcher first execs bubblewrap, which runs this file again in
  ``process`` mode inside fresh namespaces with a read-only root.

In every mode the program runs with resource limits (address space, processes, file size, open files,
CPU time, no core dumps), an empty capability bounding set, ``PR_SET_NO_NEW_PRIVS``, a scrubbed
environment, and, when the launcher is root, a fresh unprivileged uid/gid given by the harness (so
``RLIMIT_NPROC`` applies and root-owned files stay out of reach).
"""

import contextlib
import ctypes
import errno
import json
import os
import resource
import select
import signal
import struct
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
SYS_MOUNT_SETATTR = 442  # same number on every architecture (asm-generic and x86)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    """A step of the isolation setup failed: the program must not run."""


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {err})")


def _prctl(option, arg2=0):
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), 0, 0, 0), f"prctl({option})")


def _mount(src, target, fstype, flags, data=None):
    def enc(s):
        return None if s is None else s.encode()

    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------- program


def _drop_capabilities():
    """Empty the bounding set and the ambient set: after execve the program holds no capability."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:  # past the last capability this kernel knows
                break
            raise SetupError(f"dropping capability {cap}: {os.strerror(err)}")
    _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)


def _set_oom_score(value):
    # lowering needs privileges; without them the score simply stays as it was
    with contextlib.suppress(OSError):
        _write("/proc/self/oom_score_adj", str(value))


def _exec_program(cfg):
    """In the forked child: limits, identity, then execve. Never returns."""
    try:
        _set_oom_score(1000)
        lim = cfg["limits"]
        stdin = cfg.get("stdin")
        fd = os.open(stdin if stdin else os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        os.closerange(3, 65536)
        os.chdir(cfg["workdir"])
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_AS, (lim["memory"], lim["memory"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_size"], lim["file_size"]))
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["processes"], lim["processes"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (lim["open_files"], lim["open_files"]))
        resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1))
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
        if os.geteuid() == 0 or cfg.get("userns"):
            _drop_capabilities()
        uid, gid = cfg.get("uid"), cfg.get("gid")
        if uid is not None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        argv = cfg["argv"]
        os.execve(argv[0], argv, cfg["env"])
    except BaseException as exc:
        try:
            os.write(2, f"fewstep sandbox: cannot start the program: {exc}\n".encode())
        finally:
            os._exit(127)


# ------------------------------------------------------------------------------------------ waiting


def _wait_deadline(pid, deadline):
    """Wait for ``pid`` until ``deadline`` (monotonic). Returns the wait status, or None on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.005))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _children_of(ppid):
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == ppid:
            kids.append(int(name))
    return kids


def _processes_of_uid(uid):
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{name}")
        except OSError:
            continue
        if st.st_uid == uid:
            found.append(int(name))
    return found


def _sweep(uid):
    """Kill every remaining descendant (we are their subreaper) and every process of the sandbox uid."""
    me = os.getpid()
    for _ in range(10000):
        victims = set(_children_of(me))
        if uid is not None:
            victims.update(_processes_of_uid(uid))
        victims.discard(me)
        for pid in victims:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        reaped = False
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reaped = True
        if not victims and not reaped:
            return
        if victims and not reaped:
            time.sleep(0.001)


def _decode(status):
    if status is None:
        return {"exit": None, "signal": None}
    if os.WIFSIGNALED(status):
        return {"exit": None, "signal": os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status), "signal": None}


# --------------------------------------------------------------------------------------- process mode


def _run_process_mode(cfg):
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _exec_program(cfg)
    status = _wait_deadline(pid, start + cfg["timeout"])
    duration = time.monotonic() - start
    timed_out = status is None
    if timed_out:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    _sweep(cfg.get("uid"))
    return {**_decode(status), "timed_out": timed_out, "duration": duration}


# ------------------------------------------------------------------------------------ namespaces mode


def _mountinfo():
    """(mount point, per-mount flags) for every mount, from /proc/self/mountinfo."""
    names = {
        "ro": MS_RDONLY,
        "nosuid": MS_NOSUID,
        "nodev": MS_NODEV,
        "noexec": MS_NOEXEC,
        "noatime": MS_NOATIME,
        "nodiratime": MS_NODIRATIME,
        "relatime": MS_RELATIME,
        "strictatime": MS_STRICTATIME,
    }
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape").encode("latin-1").decode()
            flags = 0
            for opt in fields[5].split(","):
                flags |= names.get(opt, 0)
            out.append((point, flags))
    return out


def _make_root_readonly(force_remount):
    """Every mount read-only and nosuid: one recursive mount_setattr, or bind-remounts on old kernels."""
    if not force_remount:
        attr = struct.pack("QQQQ", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
        buf = ctypes.create_string_buffer(attr, len(attr))
        ret = _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, buf, len(attr))
        if ret == 0:
            return "mount_setattr"
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise SetupError(f"mount_setattr /: {os.strerror(err)}")
    # MS_BIND with MS_REMOUNT changes only this mount's flags, never the file system's superblock.
    for point, flags in _mountinfo():
        ret = _libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | flags, None)
        if ret != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):  # shadowed or vanished mount point
                continue
            raise SetupError(f"read-only remount of {point}: {os.strerror(err)}")
    return "remount"


def _blocked_ancestors(paths, workdir):
    """[(dir, child)] to mask: the highest ancestor of each path that others may not traverse, repeated below it."""
    plan = []
    for path in sorted(set(paths)):
        parts = [p for p in path.split("/") if p]
        for k in range(len(parts)):
            parent = "/" + "/".join(parts[:k])
            try:
                mode = os.stat(parent).st_mode
            except OSError:
                break
            if not mode & 0o001 and (parent, parts[k]) not in plan:
                plan.append((parent, parts[k]))
    for parent, _ in plan:
        if workdir == parent or workdir.startswith(parent.rstrip("/") + "/"):
            raise SetupError(f"the working directory {workdir} lies under {parent}, which the sandbox uid cannot reach")
    return plan


def _expose(paths, workdir):
    """Let the unprivileged sandbox uid reach ``paths`` (the interpreter and its libraries).

    For each directory on the way that others may not traverse (such as a 0700 ``/root``), a tmpfs
    (mode 0755) is mounted over it and only the needed child is bind-mounted back: the rest of that
    directory stays hidden from the program.
    """
    plan = _blocked_ancestors(paths, workdir)
    for i, (parent, child) in enumerate(plan):
        source = os.path.join(parent, child)
        stage = os.path.join(workdir, f".expose-{i}")
        is_dir = os.path.isdir(source)
        if is_dir:
            os.mkdir(stage)
        else:
            open(stage, "w").close()
        _mount(source, stage, None, MS_BIND | MS_REC)
        siblings = [c for p, c in plan if p == parent]
        if siblings[0] == child:  # first child of this parent: mask the parent once
            _mount("tmpfs", parent, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        target = os.path.join(parent, child)
        if is_dir:
            os.mkdir(target)
        else:
            open(target, "w").close()
        _mount(stage, target, None, MS_MOVE)
    return [f"{p}/{c}" for p, c in plan]


def _setup_mounts(cfg):
    workdir = cfg["workdir"]
    if cfg.get("uid") is not None and cfg.get("expose"):
        _expose(cfg["expose"], workdir)
    files = {}
    for name in os.listdir(workdir):
        path = os.path.join(workdir, name)
        if os.path.isfile(path) and not name.startswith(".expose-"):
            with open(path, "rb") as f:
                files[name] = f.read()
    _make_root_readonly(cfg.get("force_remount", False))
    uid = cfg.get("uid")
    owner = 0 if uid is None else uid
    group = 0 if cfg.get("gid") is None else cfg["gid"]
    size = cfg["limits"]["workdir_size"]
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=0700,uid={owner},gid={group}")
    for name, data in files.items():
        path = os.path.join(workdir, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, owner, group)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")
    _libc.sethostname(b"sandbox", 7)


def _enter_namespaces(cfg):
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if cfg.get("userns"):
        uid, gid = os.geteuid(), os.getegid()
        _check(_libc.unshare(flags | CLONE_NEWUSER), "unshare")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    else:
        _check(_libc.unshare(flags), "unshare")
    # Nothing mounted from now on may propagate back to the host.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)


def _pid1(cfg, report_w):
    """PID 1 of the sandbox: finish the setup, run the program, reap, report its status."""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _setup_mounts(cfg)
    except BaseException as exc:
        os.write(report_w, json.dumps({"error": f"sandbox setup failed: {exc}"}).encode())
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        os.close(report_w)
        _exec_program(cfg)
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            status = None
            break
        if done == pid:
            break
    os.write(report_w, json.dumps(_decode(status)).encode())
    os._exit(0)  # the kernel now kills everything left in the namespace before we are reaped


def _run_namespaces_mode(cfg):
    _enter_namespaces(cfg)
    report_r, report_w = os.pipe()
    start = time.monotonic()
    pid1 = os.fork()
    if pid1 == 0:
        os.close(report_r)
        _pid1(cfg, report_w)
    os.close(report_w)
    status = _wait_deadline(pid1, start + cfg["timeout"])
    duration = time.monotonic() - start
    if status is None:
        os.kill(pid1, signal.SIGKILL)
        os.waitpid(pid1, 0)
        os.close(report_r)
        return {"exit": None, "signal": None, "timed_out": True, "duration": duration}
    data = b""
    while chunk := os.read(report_r, 65536):
        data += chunk
    os.close(report_r)
    report = json.loads(data) if data else {"error": f"sandbox init ended without a report ({_decode(status)})"}
    return {"exit": None, "signal": None, **report, "timed_out": False, "duration": duration}


# ------------------------------------------------------------------------------------------------ main


def main():
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if cfg.get("parent_pid") is not None and os.getppid() != cfg["parent_pid"]:
            os._exit(1)  # the harness is already gone
        for cgroup in cfg.get("cgroups", []):
            _write(os.path.join(cgroup, "cgroup.procs"), str(os.getpid()))
        _set_oom_score(-1000)  # the OOM killer should pick the program, never the launcher or PID 1
        mode = cfg["mode"]
        if mode == "bwrap":
            inner = {**cfg, "mode": "process", "cgroups": [], "parent_pid": None}
            argv = [*cfg["bwrap_argv"], sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(inner)]
            os.execv(argv[0], argv)
        if mode == "namespaces":
            result = _run_namespaces_mode(cfg)
        elif mode == "process":
            result = _run_process_mode(cfg)
        else:
            raise SetupError(f"unknown mode {mode!r}")
    except BaseException as exc:
        result = {
            "exit": None,
            "signal": None,
            "timed_out": False,
            "duration": 0.0,
            "error": f"sandbox setup failed: {exc}",
        }
    os.write(status_fd, (json.dumps(result) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
