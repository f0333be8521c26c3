"""Sandbox launcher: runs ONE untrusted program under isolation and reports how it ended.

:class:`fewstep.eval.sandbox.Sandbox` starts this source as ``python -I -S -B -c BOOT SRC_FD CFG_FD``:
the source and its JSON configuration arrive on file descriptors, so no command line shows a host
path or a setting. It imports only the standard library and nothing from fewstep. It runs in its own
session, with the program's stdout/stderr pipes as its fds 1/2, and writes one JSON line on
``status_fd`` at the end: ``{"exit", "signal", "timed_out", "cpu_exceeded", "cpu", "duration",
"scratch", "error"}``.

Modes (chosen by the harness, see ``docs/evaluation.md``):

* ``namespaces``: new PID, network, IPC, UTS and cgroup namespaces (plus a user namespace when not
  root). PID 1 of the new PID namespace takes a new mount namespace and builds the program's root
  from the allow-list (:func:`_build_root`): a read-only tmpfs holding read-only binds of the
  interpreter and the system libraries, a minimal ``/dev``, a ``/proc`` that shows only the program's
  own processes, and one size- and inode-capped tmpfs for the working directory, ``/tmp`` and
  ``/dev/shm``; then ``pivot_root`` and the host's root is detached. When the program or PID 1 ends
  (or the launcher dies: PID 1 has ``PR_SET_PDEATHSIG``), the kernel kills every process left.
* ``process``: no namespaces. The launcher is a child subreaper, so orphaned descendants (double
  fork, ``setsid``) are re-parented to it and killed in a sweep when the program ends.
* ``bwrap``: the launcher execs bubblewrap, which builds the same root from the same allow-list and
  runs this source again in ``process`` mode inside; that inner launcher (holding the capabilities
  bubblewrap keeps for it) adds the capped tmpfs and the private ``/proc`` exactly as PID 1 does.

In every mode the program runs with resource limits, an empty capability bounding set,
``PR_SET_NO_NEW_PRIVS``, a seccomp filter that refuses UNIX-domain (and every non-IP) socket and
io_uring, a scrubbed environment, and, when the launcher is root, a fresh unprivileged uid/gid given
by the harness. The launcher watches the program's CPU time (the primary time limit) and the wall
clock (a backstop), and kills it past either.
"""

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import signal
import struct
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
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
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
SYS_MOUNT_SETATTR = 442  # same number on every architecture (asm-generic and x86)

# In-sandbox paths (namespaces and bwrap): the working directory, and where the scratch tmpfs is staged.
SANDBOX_WORKDIR = "/sandbox"
SCRATCH_STAGE = "/.scratch"
# Inodes the harness itself uses on the scratch tmpfs: its root, work, tmp and shm, plus one spare (the
# program's files come on top). The program may create ``files`` files and folders; the spare lets it
# create one more, and no inode left at the end is how the harness sees that it went over.
SCRATCH_OWN_INODES = 5
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)
POLL = 0.02  # seconds between CPU-time checks of the program

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    """A step of the isolation setup failed: the program must not run."""


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {err})")


def _prctl(option, arg2=0):
    _check(
        _libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
        f"prctl({option})",
    )


def _mount(src, target, fstype, flags, data=None):
    def enc(s):
        return None if s is None else s.encode()

    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _read_fd(fd):
    """The whole content of a memfd (by offset, so that several processes can read the same one)."""
    return os.pread(fd, os.fstat(fd).st_size, 0)


# ------------------------------------------------------------------------------------------ seccomp

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SYSCALL_NR = {
    "x86_64": {"socket": 41, "socketpair": 53, "pivot_root": 155},
    "aarch64": {"socket": 198, "socketpair": 199, "pivot_root": 41},
}
IO_URING = (425, 426, 427)  # io_uring_setup/enter/register: same numbers everywhere
X32_SYSCALL_BIT = 0x40000000
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
SOCK_DGRAM = 2
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
BPF_LD_W_ABS, BPF_JEQ, BPF_JGE, BPF_AND, BPF_RET = 0x20, 0x15, 0x35, 0x54, 0x06
SECCOMP_DATA_NR, SECCOMP_DATA_ARCH, SECCOMP_DATA_ARG0, SECCOMP_DATA_ARG1 = 0, 4, 16, 24


def _assemble(program):
    """Classic BPF from (code, k, jump-if-true, jump-if-false) tuples; string jump targets are labels."""
    where, pos = {}, 0
    for ins in program:
        if isinstance(ins, str):
            where[ins] = pos
        else:
            pos += 1
    out, pos = [], 0
    for ins in program:
        if isinstance(ins, str):
            continue
        code, k, jt, jf = ins
        jt = where[jt] - pos - 1 if isinstance(jt, str) else jt
        jf = where[jf] - pos - 1 if isinstance(jf, str) else jf
        out.append(struct.pack("HBBI", code, jt, jf, k))
        pos += 1
    return b"".join(out)


def seccomp_filter(machine):
    """The program's seccomp filter, or None on an architecture it does not know.

    Refused with EPERM: ``socket()`` of any family but IPv4, IPv6 and netlink (UNIX-domain sockets
    above all: no ``connect()`` to a host socket is possible, whatever the file system shows), and
    datagram ``socketpair()`` (its sockets could be re-aimed at a path). Refused with ENOSYS:
    io_uring (it could connect without the ``socket`` system call), x32 system calls and every
    system call of a foreign architecture (32-bit entry points would bypass the numbers above).
    Stream ``socketpair()`` (asyncio, multiprocessing) stays allowed.
    """
    if machine not in SYSCALL_NR:
        return None
    nr = SYSCALL_NR[machine]
    deny, nosys = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS
    prog = [
        (BPF_LD_W_ABS, SECCOMP_DATA_ARCH, 0, 0),
        (BPF_JEQ, AUDIT_ARCH[machine], 0, "nosys"),
        (BPF_LD_W_ABS, SECCOMP_DATA_NR, 0, 0),
    ]
    if machine == "x86_64":
        prog.append((BPF_JGE, X32_SYSCALL_BIT, "nosys", 0))
    prog += [(BPF_JEQ, nr["socket"], "socket", 0), (BPF_JEQ, nr["socketpair"], "socketpair", 0)]
    prog += [(BPF_JEQ, n, "nosys", 0) for n in IO_URING]
    prog += [
        (BPF_RET, RET_ALLOW, 0, 0),
        "socket",
        (BPF_LD_W_ABS, SECCOMP_DATA_ARG0, 0, 0),
        (BPF_JEQ, AF_INET, "allow", 0),
        (BPF_JEQ, AF_INET6, "allow", 0),
        (BPF_JEQ, AF_NETLINK, "allow", "deny"),
        "socketpair",
        (BPF_LD_W_ABS, SECCOMP_DATA_ARG0, 0, 0),
        (BPF_JEQ, AF_UNIX, 0, "allow"),
        (BPF_LD_W_ABS, SECCOMP_DATA_ARG1, 0, 0),
        (BPF_AND, 0xF, 0, 0),
        (BPF_JEQ, SOCK_DGRAM, "deny", "allow"),
        "deny",
        (BPF_RET, deny, 0, 0),
        "allow",
        (BPF_RET, RET_ALLOW, 0, 0),
        "nosys",
        (BPF_RET, nosys, 0, 0),
    ]
    return _assemble(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_seccomp():
    """Load the filter (needs ``no_new_privs`` first). Architectures without one run without it."""
    prog = seccomp_filter(os.uname().machine)
    if prog is None:
        return
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.addressof(buf))
    ret = _libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0))
    _check(ret, "seccomp filter")


# --------------------------------------------------------------------------------------------- program


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities():
    """Empty the bounding, ambient and inheritable sets: after execve the program holds no capability,
    even as uid 0 of a user namespace (execve as root grants the inheritable set and the bounding set)."""
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    for half in data:
        half.inheritable = 0
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)):
            err = ctypes.get_errno()
            if err == errno.EINVAL:  # past the last capability this kernel knows
                break
            raise SetupError(f"dropping capability {cap}: {os.strerror(err)}")
    _libc.prctl(
        PR_CAP_AMBIENT,
        ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    )


def _set_oom_score(value):
    # lowering needs privileges; without them the score simply stays as it was
    with contextlib.suppress(OSError):
        _write("/proc/self/oom_score_adj", str(value))


def _program_fds(cfg):
    """stdin from its file (or /dev/null); the nonce pipe as fd 3 and the result pipe as fd 4; nothing else."""
    stdin = cfg.get("stdin")
    fd = os.open(stdin if stdin else os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    nonce = fcntl.fcntl(cfg["nonce_fd"], fcntl.F_DUPFD, 10)
    result = fcntl.fcntl(cfg["result_fd"], fcntl.F_DUPFD, 10)
    os.dup2(nonce, 3)
    os.dup2(result, 4)
    os.closerange(5, 65536)


def _exec_program(cfg):
    """In the forked child: limits, identity, seccomp, then execve. Never returns."""
    try:
        _libc.prctl(PR_SET_DUMPABLE, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
        _set_oom_score(1000)
        lim = cfg["limits"]
        _program_fds(cfg)
        os.chdir(cfg["workdir"])
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_AS, (lim["memory"], lim["memory"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_size"], lim["file_size"]))
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["processes"], lim["processes"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (lim["open_files"], lim["open_files"]))
        resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_rlimit"], lim["cpu_rlimit"] + 1))
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
        if os.geteuid() == 0 or cfg.get("userns") or cfg.get("capable"):
            _drop_capabilities()
        uid, gid = cfg.get("uid"), cfg.get("gid")
        if uid is not None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _install_seccomp()
        argv = cfg["argv"]
        os.execve(argv[0], argv, cfg["env"])
    except BaseException as exc:
        try:
            os.write(2, f"fewstep sandbox: cannot start the program: {exc}\n".encode())
        finally:
            os._exit(127)


# ------------------------------------------------------------------------------------------ waiting

_TICK = os.sysconf("SC_CLK_TCK")
TREE_POLL = 0.1  # seconds between CPU-time checks of the whole tree (a scan of /proc)


def _stat_cpu(stat, first=11):
    """Seconds from a /proc/PID/stat line: utime + stime + cutime + cstime (``first=13``: the last two)."""
    fields = stat[stat.rfind(b")") + 2 :].split()
    return sum(int(x) for x in fields[first:15]) / _TICK


def _cpu_seconds(stat_fd):
    """utime + stime + cutime + cstime of a process (its own CPU and its waited-for children's)."""
    try:
        return _stat_cpu(os.pread(stat_fd, 4096, 0))
    except (OSError, ValueError):
        return 0.0


def _tree_cpu(scope, uid, program):
    """CPU seconds of the program's whole tree: each live process (with the children it waited for) and
    the orphans this launcher reaped. ``scope``: ``"pidns"`` (every process of our PID namespace but
    PID 1 and us), ``"uid"`` (every process of the sandbox uid), else the program alone."""
    me = os.getpid()
    if scope == "pidns":
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) not in (1, me)]
    elif scope == "uid":
        pids = _processes_of_uid(uid)
    else:
        pids = [program]
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                total += _stat_cpu(f.read())
        except (OSError, ValueError):
            continue
    with open("/proc/self/stat", "rb") as f:
        return total + _stat_cpu(f.read(), first=13)


def _supervise(pid, cfg, reap_all, scope):
    """Wait for the program, killing it past its CPU limit or the wall-clock backstop.

    The CPU limit holds for the program's process (checked every ``POLL``) and for its whole tree
    (``scope``, see :func:`_tree_cpu`; every ``TREE_POLL``). ``reap_all`` (PID 1, subreaper): reap
    every child meanwhile, not only the program. Returns the decoded status with ``cpu`` (seconds:
    the program's own CPU time plus its waited-for children's), ``cpu_exceeded``, ``timed_out`` (the
    wall-clock backstop) and ``duration``.
    """
    start = time.monotonic()
    cpu_limit, deadline, next_tree = cfg["cpu_limit"], start + cfg["wall_timeout"], start
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    stat_fd = None  # opened once the child has made itself readable (dumpable) again
    killed = cpu_exceeded = timed_out = False
    try:
        while True:
            while True:
                try:
                    done, status, usage = os.wait4(-1 if reap_all else pid, os.WNOHANG)
                except ChildProcessError:
                    raise SetupError("the program vanished before it was reaped") from None
                if done == 0:
                    break
                if done == pid:
                    cpu = usage.ru_utime + usage.ru_stime
                    return {
                        **_decode(status),
                        "cpu": cpu,
                        "cpu_exceeded": cpu_exceeded or cpu > cpu_limit,
                        "timed_out": timed_out,
                        "duration": time.monotonic() - start,
                    }
            if stat_fd is None:
                with contextlib.suppress(OSError):
                    stat_fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
            if not killed:
                now = time.monotonic()
                cpu = _cpu_seconds(stat_fd) if stat_fd is not None else 0.0
                if now >= next_tree:
                    cpu, next_tree = max(cpu, _tree_cpu(scope, cfg.get("uid"), pid)), now + TREE_POLL
                if cpu >= cpu_limit:
                    cpu_exceeded = killed = True
                elif now >= deadline:
                    timed_out = killed = True
                if killed:
                    os.kill(pid, signal.SIGKILL)
            if pidfd is not None:
                select.select([pidfd], [], [], POLL)
            else:
                time.sleep(POLL / 4)
    finally:
        if stat_fd is not None:
            os.close(stat_fd)
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


def _scratch_state():
    """Free inodes and bytes of the scratch tmpfs after the run (the harness names a full one)."""
    try:
        st = os.statvfs(SANDBOX_WORKDIR)
    except OSError:
        return None
    return {"files_free": st.f_ffree, "bytes_free": st.f_bavail * st.f_frsize}


# ---------------------------------------------------------------------------------- the program's root


def _mountinfo_points(prefix):
    """Mount points at or below ``prefix``, from /proc/self/mountinfo."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape").encode("latin-1").decode()
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                points.append((point, line.split()[5]))
    return points


_FLAG_NAMES = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}


def _make_readonly(path, force_remount, nodev=True):
    """``path`` and every mount below it read-only, nosuid (and nodev): one recursive mount_setattr,
    or bind-remounts of each mount on kernels before 5.12 (``force_remount`` tests that path)."""
    if not force_remount:
        flags = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | (MOUNT_ATTR_NODEV if nodev else 0)
        attr = struct.pack("QQQQ", flags, 0, 0, 0)
        buf = ctypes.create_string_buffer(attr, len(attr))
        ret = _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE, buf, len(attr))
        if ret == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise SetupError(f"mount_setattr {path}: {os.strerror(err)}")
    # MS_BIND with MS_REMOUNT changes only this mount's flags, never the file system's superblock.
    for point, opts in _mountinfo_points(path):
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (MS_NODEV if nodev else 0)
        for opt in opts.split(","):
            flags |= _FLAG_NAMES.get(opt, 0)
        ret = _libc.mount(None, point.encode(), None, flags, None)
        if ret != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR):  # shadowed or vanished mount point
                continue
            raise SetupError(f"read-only remount of {point}: {os.strerror(err)}")


def _mountpoint(path, like):
    """Create an empty directory or file at ``path`` (parents 0755) to bind ``like`` onto."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.isdir(like):
        os.makedirs(path, mode=0o755, exist_ok=True)
    elif not os.path.lexists(path):
        open(path, "w").close()


def _apply_plan(root, plan, force_remount):
    """The allow-list: parents as 0755 folders, read-only binds and symlinks, below ``root``."""
    for op in plan:
        if op[0] == "dir":
            os.makedirs(root + op[1], mode=0o755, exist_ok=True)
            os.chmod(root + op[1], 0o755)
        elif op[0] == "ro":
            _mountpoint(root + op[2], op[1])
            _mount(op[1], root + op[2], None, MS_BIND | MS_REC)
            _make_readonly(root + op[2], force_remount)
        elif op[0] == "symlink":
            os.makedirs(os.path.dirname(root + op[2]), mode=0o755, exist_ok=True)
            os.symlink(op[1], root + op[2])
        else:
            raise SetupError(f"unknown root plan entry {op!r}")


def _mount_dev(root):
    """A minimal /dev: six character devices bound from the host, the usual links, /dev/shm."""
    dev = root + "/dev"
    os.makedirs(dev, mode=0o755, exist_ok=True)
    for name in DEVICES:
        if not os.path.exists("/dev/" + name):
            continue
        open(f"{dev}/{name}", "w").close()
        _mount("/dev/" + name, f"{dev}/{name}", None, MS_BIND)  # keeps the host /dev mount's nosuid
    for name, target in DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")
    os.makedirs(dev + "/shm", mode=0o755, exist_ok=True)


def _mount_proc(path):
    """A fresh /proc of the sandbox's PID namespace that shows only the caller's own processes
    (``hidepid``) and no system-wide files (``subset=pid``, kernels >= 5.8)."""
    os.makedirs(path, mode=0o555, exist_ok=True)
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    for options in ("hidepid=invisible,subset=pid", "hidepid=2"):
        if _libc.mount(b"proc", path.encode(), b"proc", flags, options.encode()) == 0:
            return options
    # In bubblewrap's user namespace a second proc is refused (its /proc has covered parts): set the
    # same options on the one it mounted for this PID namespace.
    for options in ("hidepid=invisible,subset=pid", "hidepid=2"):
        if _libc.mount(None, path.encode(), None, MS_REMOUNT | flags, options.encode()) == 0:
            return options
    _check(-1, f"mount proc on {path}")
    return ""


def _mount_scratch(cfg, root, files):
    """One tmpfs of ``workdir_size`` bytes and ``files`` inodes: the working directory, /tmp and /dev/shm.

    The program's files are written into its working directory, owned by the sandbox uid.
    """
    lim = cfg["limits"]
    owner = cfg["uid"] if cfg.get("uid") is not None else os.geteuid()
    group = cfg["gid"] if cfg.get("gid") is not None else os.getegid()
    stage = root + SCRATCH_STAGE
    os.makedirs(stage, mode=0o700, exist_ok=True)
    size, inodes = lim["workdir_size"], lim["files"] + SCRATCH_OWN_INODES + len(files)
    _mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},nr_inodes={inodes},mode=0755")
    for sub, mode in (("work", 0o700), ("tmp", 0o1777), ("shm", 0o1777)):
        os.mkdir(f"{stage}/{sub}")
        os.chmod(f"{stage}/{sub}", mode)
    os.chown(f"{stage}/work", owner, group)
    for name, data in files.items():
        path = f"{stage}/work/{name}"
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, owner, group)
    for sub, target in (("work", SANDBOX_WORKDIR), ("tmp", "/tmp"), ("shm", "/dev/shm")):
        os.makedirs(root + target, mode=0o755, exist_ok=True)
        _mount(f"{stage}/{sub}", root + target, None, MS_BIND)  # a bind keeps the tmpfs's nosuid, nodev
    _check(_libc.umount2(stage.encode(), MNT_DETACH), f"umount {stage}")
    os.rmdir(stage)


def _read_files(folder):
    files = {}
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = f.read()
    return files


def _pivot_root(new_root):
    """Make ``new_root`` the root and detach the old one entirely (pivot_root(".", ".") + umount)."""
    nr = SYSCALL_NR.get(os.uname().machine, {}).get("pivot_root")
    if nr is None:
        raise SetupError(f"pivot_root: unknown system call number on {os.uname().machine}")
    os.chdir(new_root)
    _check(_libc.syscall(nr, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detaching the host's root")
    os.chdir("/")


def _build_root(cfg):
    """PID 1, namespaces mode: the program's root, from the allow-list only; then pivot into it."""
    host_workdir = cfg["host_workdir"]
    files = _read_files(host_workdir)
    root = host_workdir  # the new root is mounted over the (already read) host working directory
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    _apply_plan(root, cfg["rootfs"], cfg.get("force_remount", False))
    _mount_dev(root)
    _mount_proc(root + "/proc")
    _mount_scratch(cfg, root, files)
    _pivot_root(root)
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _finish_bwrap_root(cfg):
    """Inside bubblewrap (with its capabilities): the same capped tmpfs and private /proc as PID 1 builds."""
    files = _read_files(SANDBOX_WORKDIR)  # bubblewrap bound the host working directory here, read-only
    # Unbind it where we may; in a user namespace bubblewrap's mounts are locked: the scratch covers it.
    _libc.umount2(SANDBOX_WORKDIR.encode(), MNT_DETACH)
    _mount_proc("/proc")
    _mount_scratch(cfg, "", files)
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _mount(None, "/dev", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)  # bubblewrap's tmpfs


# --------------------------------------------------------------------------------------- process mode


def _run_process_mode(cfg):
    if cfg.get("inner_setup"):
        _finish_bwrap_root(cfg)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    pid = os.fork()
    if pid == 0:
        _exec_program(cfg)
    _prctl(PR_SET_DUMPABLE, 0)
    scope = "pidns" if cfg.get("inner") else ("uid" if cfg.get("uid") is not None else "program")
    result = _supervise(pid, cfg, reap_all=True, scope=scope)
    _sweep(cfg.get("uid"))
    if cfg.get("inner_setup"):
        result["scratch"] = _scratch_state()
    return result


# ------------------------------------------------------------------------------------ namespaces mode


def _enter_namespaces(cfg):
    """New PID, network, IPC, UTS, cgroup namespaces for our children (and a user namespace when not root)."""
    flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
    if cfg.get("userns"):
        uid, gid = os.geteuid(), os.getegid()
        _check(_libc.unshare(flags | CLONE_NEWUSER), "unshare")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    else:
        _check(_libc.unshare(flags), "unshare")
    _prctl(PR_SET_DUMPABLE, 0)


def _pid1(cfg, report_w):
    """PID 1 of the sandbox: build the root, run the program, reap, report its status."""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _prctl(PR_SET_DUMPABLE, 0)
        _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted from now on reaches the host
        _build_root(cfg)
        _libc.sethostname(b"sandbox", 7)
        pid = os.fork()
        if pid == 0:
            os.close(report_w)
            _exec_program(cfg)
        report = _supervise(pid, cfg, reap_all=True, scope="pidns")
        report["scratch"] = _scratch_state()
    except BaseException as exc:
        report = {"error": f"sandbox setup failed: {exc}"}
    os.write(report_w, json.dumps(report).encode())
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
    # PID 1 enforces the limits itself; this deadline only catches a PID 1 that cannot report.
    status = _wait_deadline(pid1, start + cfg["wall_timeout"] + 5.0)
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
    return {"exit": None, "signal": None, "timed_out": False, "duration": duration, **report}


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


# ------------------------------------------------------------------------------------------- bwrap mode


def _exec_bwrap(cfg, src_fd):
    """Exec bubblewrap; its options travel on a memfd (``--args``), the inner launcher's on another."""
    inner = {
        **cfg,
        "mode": "process",
        "cgroups": [],
        "parent_pid": None,
        "inner": True,
        "inner_setup": cfg["bwrap_caps"],
    }
    inner["capable"] = cfg["bwrap_caps"]
    inner.pop("bwrap_args", None)
    args_fd = os.memfd_create("fewstep-bwrap-args", 0)
    os.write(args_fd, b"\0".join(a.encode() for a in cfg["bwrap_args"]) + b"\0")
    os.lseek(args_fd, 0, os.SEEK_SET)
    cfg_fd = os.memfd_create("fewstep-sandbox-config", 0)
    os.write(cfg_fd, json.dumps(inner).encode())
    for fd in (src_fd, cfg_fd, args_fd):
        os.set_inheritable(fd, True)
    python = cfg["launcher_python"]
    argv = [cfg["bwrap"], "--args", str(args_fd), "--", python, "-I", "-S", "-B", "-c", BOOT, str(src_fd), str(cfg_fd)]
    os.execv(argv[0], argv)


BOOT = "import os,sys;f=int(sys.argv[1]);exec(compile(os.pread(f,os.fstat(f).st_size,0),'fewstep-launcher','exec'))"


# ------------------------------------------------------------------------------------------------ main


def _load_config():
    src_fd, cfg_fd = int(sys.argv[1]), int(sys.argv[2])
    cfg = json.loads(_read_fd(cfg_fd))
    os.close(cfg_fd)
    return cfg, src_fd


def main():
    cfg, src_fd = _load_config()
    status_fd = cfg["status_fd"]
    try:
        os.umask(0o022)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if cfg.get("parent_pid") is not None and os.getppid() != cfg["parent_pid"]:
            os._exit(1)  # the harness is already gone
        for cgroup in cfg.get("cgroups", []):
            _write(os.path.join(cgroup, "cgroup.procs"), str(os.getpid()))
        _set_oom_score(-1000)  # the OOM killer should pick the program, never the launcher or PID 1
        mode = cfg["mode"]
        if mode == "bwrap":
            _exec_bwrap(cfg, src_fd)
        os.close(src_fd)
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
