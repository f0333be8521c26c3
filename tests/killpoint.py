"""Kill a fewstep command with SIGKILL at an exact point of its work, not at a moment chosen by a timer.

Tests of "killed mid-way, then resumed" used to poll a file from the parent and send SIGKILL when it
appeared; on a loaded machine the child could finish in between (or the kill land elsewhere). Here the
child kills itself, from a hook on the standard library's file operations, at a point fixed by the
work done (a checkpoint folder about to be renamed into place, a progress file about to record the
Nth batch, the Nth committed line of a JSONL file). The fewstep code runs unmodified; the kill is a
real SIGKILL, so nothing after the point runs (no ``finally``, no flush).

    proc = subprocess.run(killed_at({"rename_to": "step-000008"}, "pretrain", ...), env=env)
    assert proc.returncode == -signal.SIGKILL
"""

from __future__ import annotations

import json
import sys

_BOOT = r"""
import json, os, runpy, signal, sys
rule = json.loads(sys.argv[1])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def hook(event, args):
    if event != "os.rename":  # os.rename, os.replace and Path.rename all raise it, before acting
        return
    src, dst = os.fsdecode(args[0]), os.fsdecode(args[1])
    if "rename_to" in rule and os.path.basename(dst) == rule["rename_to"]:
        die()
    if "replace_json" in rule:
        name, key, value = rule["replace_json"]
        if os.path.basename(dst) == name:
            with open(src) as f:
                if json.load(f).get(key, 0) >= value:
                    die()

sys.addaudithook(hook)
if "fsync_lines" in rule:
    name, lines = rule["fsync_lines"]
    real_fsync = os.fsync

    def fsync(fd):
        real_fsync(fd)
        path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
        if os.path.basename(path) == name:
            with open(path, "rb") as f:
                if f.read().count(b"\n") >= lines:
                    die()

    os.fsync = fsync
sys.argv = ["fewstep", *sys.argv[2:]]
runpy.run_module("fewstep", run_name="__main__", alter_sys=True)
"""


def killed_at(rule: dict, *args: str) -> list[str]:
    """The argv of ``python -m fewstep ARGS`` that SIGKILLs itself at ``rule``:

    ``{"rename_to": NAME}``: when something is about to be renamed to ``NAME`` (a checkpoint folder);
    ``{"replace_json": [NAME, KEY, N]}``: when ``NAME`` is about to be replaced by JSON with ``KEY >= N``;
    ``{"fsync_lines": [NAME, N]}``: as soon as ``NAME`` holds N committed (fsync'd) lines.
    """
    return [sys.executable, "-c", _BOOT, json.dumps(rule), *args]
