"""The code sandbox against hostile programs, for every isolation this machine offers.

Each attack runs with small limits (1-2 s, 256 MiB, 16 processes) so the suite stays fast and the
machine safe. Every test checks that the harness comes back in bounded time with the sample failed
(or, for "survivable" attacks, that the attack had no effect), and that nothing is left running.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from fewstep.eval.sandbox import Limits, MiB, Sandbox, _cgroups

SMALL = Limits(timeout=2.0, memory=256 * MiB, processes=16, file_size=1 * MiB, output=64 * 1024, workdir_size=8 * MiB)
IS_ROOT = os.geteuid() == 0


def _usable(isolation: str, **kw) -> Sandbox | None:
    """A sandbox with this isolation, or None when the machine does not offer it."""
    box = Sandbox(SMALL, isolation=isolation, **kw)
    try:
        box.resolve()
    except RuntimeError:
        return None
    return box


_BOXES: dict[str, Sandbox | None] = {}


@pytest.fixture(params=["namespaces", "bwrap", "process"])
def box(request) -> Sandbox:
    iso = request.param
    if iso not in _BOXES:
        _BOXES[iso] = _usable(iso)
    if _BOXES[iso] is None:
        why = "bubblewrap is not installed" if iso == "bwrap" and not shutil.which("bwrap") else "not usable here"
        pytest.skip(f"isolation {iso!r}: {why}")
    return _BOXES[iso]


def _alive_with(token: str) -> list[int]:
    """Pids whose command name or command line contains ``token``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            comm = Path(f"/proc/{name}/comm").read_text()
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if token in comm or token in cmdline:
            found.append(int(name))
    return found


def _timed(box: Sandbox, program: str, **kw):
    start = time.monotonic()
    res = box.run(program, **kw)
    return res, time.monotonic() - start


# ------------------------------------------------------------------------------------- basics


def test_runs_program_and_captures_output(box):
    res = box.run(
        "import sys\nprint(input())\nprint('to stderr', file=sys.stderr)\nraise SystemExit(3)", stdin="hello\n"
    )
    assert res.exit_code == 3 and not res.passed
    assert res.stdout == "hello\n" and "to stderr" in res.stderr
    assert res.reason == "exit code 3: to stderr"
    ok = box.run("print(sum(range(10)))")
    assert ok.passed and ok.stdout == "45\n" and ok.reason == "passed"


def test_exception_and_signal_reasons(box):
    assert box.run("assert 1 == 2, 'boom'").reason == "exit code 1: AssertionError: boom"
    res = box.run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert not res.passed and res.reason == "killed by SIGSEGV"


def test_environment_is_scrubbed(box, monkeypatch):
    monkeypatch.setenv("FEWSTEP_TEST_SECRET", "hunter2")
    res = box.run("import os, json\nprint(json.dumps(dict(os.environ)))\nprint(os.getcwd() == os.environ['HOME'])")
    assert res.passed
    assert "hunter2" not in res.stdout and "FEWSTEP_TEST_SECRET" not in res.stdout
    assert res.stdout.strip().endswith("True")


@pytest.mark.skipif(not IS_ROOT, reason="privilege drop applies when the harness is root")
def test_program_runs_unprivileged(box):
    res = box.run(
        "import os\nst = open('/proc/self/status').read()\n"
        "f = dict(l.split(':', 1) for l in st.splitlines())\n"
        "print(os.getuid(), os.geteuid(), f['CapEff'].strip(), f['CapBnd'].strip(), f['NoNewPrivs'].strip())"
    )
    uid, euid, cap_eff, cap_bnd, nnp = res.stdout.split()
    assert int(uid) != 0 and int(euid) != 0
    assert int(cap_eff, 16) == 0 and int(cap_bnd, 16) == 0 and nnp == "1"


# ------------------------------------------------------------------------------------ attacks


def test_infinite_loop_is_killed_at_the_timeout(box):
    res, took = _timed(box, "while True:\n    pass", limits=Limits(timeout=1.0))
    assert res.timed_out and not res.passed and res.reason.startswith("timeout")
    assert took < 5


def test_process_count_limit_holds(box):
    """RLIMIT_NPROC (unprivileged uid) / pids cgroup: at most `processes` processes, even as root."""
    token = f"fewstep-nproc-{uuid.uuid4().hex[:8]}"
    program = (
        "import os, time\nn = 0\nfor _ in range(200):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        f"    if pid == 0:\n        open('/proc/self/comm', 'w').write('{token}'[:15])\n        time.sleep(60)\n        os._exit(0)\n"
        "    n += 1\nprint(n)"
    )
    res, took = _timed(box, program)
    assert res.passed, res.reason
    assert 0 < int(res.stdout) < SMALL.processes
    assert took < 10, "children sleeping 60 s must be killed when the program ends"
    assert not _alive_with(token[:15])


def test_fork_bomb(box):
    token = f"fewstep-bomb-{uuid.uuid4().hex[:8]}"
    program = (
        f"import os\nopen('/proc/self/comm', 'w').write('{token}'[:15])\n"
        "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    )
    res, took = _timed(box, program, limits=Limits(timeout=1.5, memory=256 * MiB, processes=16))
    assert not res.passed
    assert took < 8
    time.sleep(0.1)
    assert not _alive_with(token[:15])


def test_memory_bomb(box):
    res, took = _timed(box, "x = []\nwhile True:\n    x.append(bytearray(10**7))")
    assert not res.passed and ("MemoryError" in res.reason or "memory" in res.reason)
    assert took < 8


def test_forking_memory_bomb_hits_the_cgroup_cap(box):
    """Eight processes of 100 MiB each stay under RLIMIT_AS but exceed the tree's memory cap."""
    if _cgroups.probe() is None:
        pytest.skip("no writable cgroup here: total memory is bounded by processes x memory only")
    program = (
        "import os, time\nfor _ in range(7):\n    if os.fork() == 0:\n        break\n"
        "x = bytearray(100 * 2**20)\nfor i in range(0, len(x), 4096):\n    x[i] = 1\ntime.sleep(2)\nprint('survived')"
    )
    res, took = _timed(box, program, limits=Limits(timeout=5, memory=128 * MiB, processes=16))
    assert not res.passed and res.oom_killed, res.reason
    assert res.reason.startswith("memory limit exceeded")
    assert took < 10


def test_output_flood_is_cut(box):
    res, took = _timed(
        box, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", limits=Limits(timeout=1.0, output=4096)
    )
    assert res.timed_out and res.stdout_truncated
    assert len(res.stdout) == 4096 and set(res.stdout) == {"x"}
    assert took < 5
    done = box.run("print('a' * 10000)\nprint('ok')", limits=Limits(output=100))
    assert done.passed and done.stdout_truncated and len(done.stdout) == 100
    assert done.reason == "passed (output cut)"


def test_killing_the_parent_does_not_stop_the_harness(box):
    res = box.run(
        "import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError as e:\n    print('refused', e.errno)\n"
        "import time\ntime.sleep(0.2)\nprint('still here')"
    )
    assert res.error is None or "sandbox" in res.reason  # the harness reports, whatever happened
    after = box.run("print('next sample')")
    assert after.passed and after.stdout == "next sample\n"


def test_kill_every_process_it_can(box):
    if box.resolve() == "process" and not IS_ROOT:
        pytest.skip("without namespaces or a separate uid, kill(-1) reaches the harness user's processes")
    res = box.run("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError as e:\n    print(e.errno)")
    assert res is not None
    assert box.run("print(1)").passed  # and we are still alive to run the next one


def test_setsid_double_fork_escape_is_killed(box):
    token = f"fewstep-esc-{uuid.uuid4().hex[:6]}"
    program = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        open('/proc/self/comm', 'w').write('{token}'[:15])\n        time.sleep(60)\n    os._exit(0)\n"
        "time.sleep(0.3)\nprint('parent done')"
    )
    res, took = _timed(box, program)
    assert res.passed and res.stdout == "parent done\n"
    assert took < 10
    time.sleep(0.1)
    assert not _alive_with(token[:15])


def test_cannot_write_outside_its_directory(box):
    iso = box.resolve()
    with tempfile.TemporaryDirectory() as private, tempfile.TemporaryDirectory() as shared:
        os.chmod(private, 0o755)  # like most of the file system: others may read, not write
        os.chmod(shared, 0o1777)  # like /tmp
        targets = [os.path.join(private, "escaped"), os.path.join(shared, "escaped")]
        program = (
            "import os\n"
            f"for p in {targets!r}:\n"
            "    try:\n        open(p, 'w').write('x')\n        print('wrote', p)\n"
            "    except OSError as e:\n        print('refused', e.errno)\n"
            "open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())"
        )
        res = box.run(program)
        assert res.passed and res.stdout.endswith("fine\n")
        if IS_ROOT or iso != "process":
            assert not os.path.exists(targets[0])
        if iso != "process":  # process mode: world-writable folders stay writable (documented)
            assert not os.path.exists(targets[1])


def test_no_network(box):
    if box.resolve() == "process":
        pytest.skip("process isolation has no network namespace (documented)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        program = (
            f"import socket\nfor addr in [('127.0.0.1', {port}), ('1.1.1.1', 53)]:\n"
            "    s = socket.socket()\n    s.settimeout(1)\n"
            "    try:\n        s.connect(addr)\n        print('connected', addr)\n"
            "    except OSError as e:\n        print('refused', e.errno)"
        )
        res = box.run(program)
        assert res.passed
        assert "connected" not in res.stdout and res.stdout.count("refused") == 2
    finally:
        server.close()


def test_file_size_limit(box):
    res = box.run("open('big', 'wb').write(b'x' * (2 * 2**20))")
    assert not res.passed and "File too large" in res.reason
    assert box.run("open('small', 'wb').write(b'x' * 1000)").passed


def test_parallel_workers_keep_order(box):
    programs = [f"import time\ntime.sleep(0.4)\nprint({i})" for i in range(4)]
    start = time.monotonic()
    seen = []
    results = box.run_many(programs, workers=2, on_result=lambda i, r: seen.append(i))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
    assert sorted(seen) == [0, 1, 2, 3]
    assert time.monotonic() - start < 4 * 0.4 + 3  # overlapped, not one after the other


# ------------------------------------------------------------------------------ specific layers


def test_namespaces_read_only_fallback_by_remount():
    """Kernels without mount_setattr: per-mount bind-remounts give the same read-only file system."""
    box = _usable("namespaces", force_remount=True)
    if box is None:
        pytest.skip("namespaces isolation is not usable here")
    with tempfile.TemporaryDirectory() as shared:
        os.chmod(shared, 0o1777)
        target = os.path.join(shared, "escaped")
        res = box.run(f"try:\n    open({target!r}, 'w')\nexcept OSError as e:\n    print(e.errno)")
        assert res.passed and res.stdout.strip() == "30"  # EROFS
        assert not os.path.exists(target)


def test_limits_are_validated():
    with pytest.raises(ValueError):
        Limits(timeout=0)
    with pytest.raises(ValueError):
        Sandbox(isolation="docker")


def test_describe_names_every_layer():
    box = _usable("auto")
    if box is None:
        pytest.skip("no usable isolation")
    layers = box.describe()
    assert set(layers) == {"isolation", "interpreter", "user", "cgroup", "network", "filesystem", "kill"}
    assert layers["isolation"] in ("namespaces", "bwrap", "process")
