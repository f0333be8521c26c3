"""Honest health: ``/health`` and ``/ready`` answer 503 with the reason when the engine thread is wedged
(a round that does not finish) or dead, and 200 again once it makes progress.

The faults are injected as unmasking policies registered for the test (one small class each, the way
fewstep adds a policy): one whose ``select`` waits on an event, one that raises a ``BaseException``
(which ends the engine thread: nothing in the engine catches it).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from fewstep.decoding.policies import POLICIES
from fewstep.decoding.policies.fastdllm import ConfidenceThresholdPolicy
from tests.serve.conftest import reference, serve

PROMPT = "3 + 4 - 2 + 8 - 1 ?"
GATE, ENTERED = threading.Event(), threading.Event()


class _Gate(ConfidenceThresholdPolicy):
    """``threshold`` whose select waits for GATE: the round does not finish until the test opens it."""

    name = "test-gate"

    def select(self, logits, state):
        ENTERED.set()
        assert GATE.wait(120)
        return super().select(logits, state)


class _Killed(BaseException):
    pass


class _Kill(ConfidenceThresholdPolicy):
    """A policy whose select ends the engine thread."""

    name = "test-kill"

    def select(self, logits, state):
        raise _Killed("the engine thread ends here")


def _until(url: str, status: int, seconds: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while (r := httpx.get(url, timeout=10)).status_code != status:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)
    return r


def test_wedged_engine_is_503_until_it_moves_again(loaded, monkeypatch):
    monkeypatch.setitem(POLICIES, _Gate.name, _Gate)
    GATE.clear()
    ENTERED.clear()
    s = serve(*loaded, stall_timeout=0.5)
    try:
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
        assert httpx.get(s.url + "/ready").json() == {"status": "ready", "model": "dparallel"}
        got: dict = {}
        body = {"prompt": PROMPT, "policy": _Gate.name}
        client = threading.Thread(target=lambda: got.update(r=httpx.post(s.url + "/v1/completions", json=body,
                                                                          timeout=120)))  # fmt: skip
        client.start()
        assert ENTERED.wait(60)  # the round is stuck inside the policy
        health = _until(s.url + "/health", 503).json()
        assert health["status"] == "error" and health["running"] == 1
        assert "has not finished a round" in health["reason"] and "1 request(s) pending" in health["reason"]
        ready = httpx.get(s.url + "/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "unhealthy"
        assert "has not finished a round" in ready.json()["reason"]
        GATE.set()  # the round finishes: the request is served as if nothing happened
        client.join(60)
        assert got["r"].status_code == 200
        assert got["r"].json()["choices"][0]["text"] == reference(*loaded, PROMPT, "threshold")[0]
        assert _until(s.url + "/health", 200).json()["status"] == "ok"
        assert httpx.get(s.url + "/ready").status_code == 200
    finally:
        GATE.set()
        s.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_engine_thread_is_503_and_ends_its_requests(loaded, monkeypatch):
    monkeypatch.setitem(POLICIES, _Kill.name, _Kill)
    s = serve(*loaded)
    try:
        slow = {"prompt": PROMPT, "policy": "llada:steps=448", "max_tokens": 448, "block_length": 448, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=slow, timeout=60) as stream:
            assert stream.status_code == 200
            r = httpx.post(s.url + "/v1/completions", json={"prompt": PROMPT, "policy": _Kill.name}, timeout=60)
            lines = [ln for ln in stream.iter_lines() if ln]
        # the request that killed it and the stream that was running with it both end with an error
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable", r.text
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "engine_unavailable"
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and health.json()["reason"] == "the engine thread is not running"
        assert httpx.get(s.url + "/ready").status_code == 503
        again = httpx.post(s.url + "/v1/completions", json={"prompt": PROMPT}, timeout=30)
        assert again.status_code == 503 and again.json()["error"]["code"] == "engine_unavailable"
    finally:
        s.close()
