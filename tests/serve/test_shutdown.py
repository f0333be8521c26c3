"""Graceful shutdown of a real ``fewstep serve`` process, with streaming clients in flight.

The first SIGTERM / SIGINT drains: new requests get 503 and ``/ready`` 503 while ``/health`` stays 200,
the requests in flight finish with their solo answers within ``--drain-timeout``, the rest end with an
error event (a stream) or a 503 (a plain request), and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx

from tests.serve.conftest import output, reference, start_process, stop_process

PROMPTS = ["3 + 4 - 2 + 8 - 1 ?", "5 + 9 - 1 - 7 + 1 ?"]
SHORT = {"policy": "llada:steps=32", "max_tokens": 32, "block_length": 32}  # 32 forwards
LONG = {"policy": "llada:steps=448", "max_tokens": 448, "block_length": 448}  # 448 forwards: seconds on a CPU


def _start(*flags: str) -> tuple[subprocess.Popen, str]:
    return start_process("--max-batch", "8", *flags)


class Stream(threading.Thread):
    """A streaming client (denoise events: one per forward, so it is seen in flight at once)."""

    def __init__(self, url: str, prompt: str, settings: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, {"prompt": prompt, "stream": True, "stream_mode": "denoise", **settings}
        self.lines: list[str] = []
        self.started, self.error = threading.Event(), None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.started.set()
        except httpx.HTTPError as exc:  # the server went away mid-stream
            self.error = exc
        self.started.set()

    def events(self) -> list[dict]:
        return [json.loads(ln[6:]) for ln in self.lines if ln.startswith("data: {")]


def _until(url: str, status: int, seconds: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while (r := httpx.get(url, timeout=10)).status_code != status:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.02)
    return r


def _running(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("fewstep:num_requests_running ")))


def test_drain_lets_requests_in_flight_finish_and_a_second_signal_exits_at_once(loaded):
    proc, url = _start("--drain-timeout", "60", "--timeout-keep-alive", "2", "--timeout-read", "10")
    try:
        short = [Stream(url, p, SHORT) for p in PROMPTS]
        long = Stream(url, PROMPTS[0], LONG)
        for s in (long, *short):
            s.start()
            assert s.started.wait(60)
        proc.send_signal(signal.SIGINT)  # Ctrl+C: drain
        ready = _until(url + "/ready", 503).json()
        assert ready["status"] == "draining" and "shutting down" in ready["reason"]
        late = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0]}, timeout=30)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
        assert httpx.get(url + "/health").status_code == 200  # alive: a liveness probe must not kill it
        for s, p in zip(short, PROMPTS):  # the requests in flight finish with their solo answers
            s.join(120)
            done = s.events()[-1]
            assert s.lines[-1] == "data: [DONE]" and done["object"] == "fewstep.denoise.done", s.lines[-3:]
            assert done["text"] == reference(*loaded, p, SHORT["policy"], gen_length=32, block_length=32)[0]
        assert proc.poll() is None and long.is_alive()  # the long one still decodes within its 60 s
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # a second signal: exit now
        assert proc.wait(timeout=15) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 10
        long.join(30)
        assert "data: [DONE]" not in long.lines  # cut off, not finished
    finally:
        stop_process(proc)


def test_drain_deadline_ends_the_rest_with_an_error_and_exits_0(loaded):
    proc, url = _start("--drain-timeout", "1")
    try:
        stream = Stream(url, PROMPTS[1], LONG)
        stream.start()
        assert stream.started.wait(60)
        plain: dict = {}
        client = threading.Thread(target=lambda: plain.update(
            r=httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], **LONG}, timeout=120)))  # fmt: skip
        client.start()
        deadline = time.monotonic() + 60
        while _running(url) < 2:  # both in flight
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - t0 < 1 + 20  # the deadline, then a prompt exit
        stream.join(30)
        client.join(30)
        assert stream.lines[-1] == "data: [DONE]"
        err = json.loads(stream.lines[-2][6:])["error"]
        assert err["code"] == "shutting_down" and "drain deadline (1 s)" in err["message"]
        assert stream.events()[0]["object"] == "fewstep.denoise.step"  # it was decoding when the signal came
        assert plain["r"].status_code == 503 and plain["r"].json()["error"]["code"] == "shutting_down"
        assert "SIGTERM: draining" in output(proc), output(proc)
    finally:
        stop_process(proc)
