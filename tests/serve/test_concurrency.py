"""32 concurrent clients, 240 requests with random arrival times: every answer is what it gets alone.

Mixed policies (greedy and seeded sampling), cache modes, lengths and stop strings; some requests
stream (completions and chat), some are cancelled mid-stream by closing the connection, and bad
requests are mixed in. No request is lost, the cancelled ones free their rows, /health answers after.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from fewstep.tasks import arith
from tests.serve.conftest import reference

N_REQUESTS, N_CLIENTS = 240, 32
PROMPTS = [p.prompt for p in arith.generate_problems("test", 24, seed=1)]
POLICIES = ["entropy:0.45", "threshold:0.9", "llada:steps=8", "cad:0.9", "threshold:0.7"]
BAD = [
    b'{"prompt": ',
    json.dumps({"prompt": "1 ?", "policy": "nope"}).encode(),
    json.dumps({"prompt": "1 ?", "max_tokens": 0}).encode(),
    json.dumps({"prompt": "1 ?", "n": 4}).encode(),
    json.dumps({"model": "other", "prompt": "1 ?"}).encode(),
]


def _jobs(rng: random.Random) -> list[dict]:
    jobs = []
    for i in range(N_REQUESTS):
        kind = rng.choices(["plain", "stream", "chat-stream", "cancel", "bad"], [45, 20, 10, 12, 13])[0]
        gen = rng.choice([16, 32])
        body = {
            "prompt": rng.choice(PROMPTS),
            "max_tokens": gen,
            "block_length": rng.choice([8, 16]),
            "policy": rng.choice(POLICIES),
            "cache": rng.choice(["none", "prefix", "dual"]),
        }
        if rng.random() < 0.2:
            body["stop"] = [rng.choice(["=", "####", "+ 1"])]
        if rng.random() < 0.15 and body["policy"].startswith("threshold"):
            body.update(temperature=0.8, seed=rng.randrange(100))
        if kind == "cancel":
            body.update(policy="llada:steps=32", max_tokens=32, block_length=32, stop=[])
        jobs.append({"i": i, "kind": kind, "body": body, "at": rng.uniform(0, 2.5), "bad": rng.choice(BAD)})
    return jobs


def _run(url: str, job: dict, t0: float, tls: threading.local) -> dict:
    client = getattr(tls, "client", None) or httpx.Client(timeout=120)
    tls.client = client
    time.sleep(max(0.0, t0 + job["at"] - time.monotonic()))
    kind, body = job["kind"], job["body"]
    if kind == "bad":
        r = client.post(url + "/v1/completions", content=job["bad"], headers={"Content-Type": "application/json"})
        return {"status": r.status_code, "error": r.json().get("error")}
    if kind == "plain":
        r = client.post(url + "/v1/completions", json=body)
        return {"status": r.status_code, "text": r.json()["choices"][0]["text"]}
    chat = kind == "chat-stream"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if chat:
        body = {
            **{k: v for k, v in body.items() if k != "prompt"},
            "messages": [{"role": "user", "content": body["prompt"]}],
        }
    text, finish = "", None
    with client.stream("POST", url + path, json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            if kind == "cancel":
                return {"status": r.status_code, "cancelled": True}  # leaving the block closes the connection
            choice = json.loads(line[6:])["choices"][0]
            text += (choice["delta"].get("content") or "") if chat else choice["text"]
            finish = choice["finish_reason"] or finish
    return {"status": r.status_code, "text": text, "finish": finish}


def _wait(condition, seconds: float = 60.0) -> None:
    """Wait for ``condition()`` (a liveness bound only: what is asserted does not depend on timing)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_concurrent_clients_get_what_they_get_alone(server, loaded):
    model, tok = loaded
    jobs = _jobs(random.Random(0))
    tls = threading.local()
    t0 = time.monotonic()
    with ThreadPoolExecutor(N_CLIENTS) as pool:
        results = list(pool.map(lambda j: _run(server.url, j, t0, tls), jobs))

    refs: dict[tuple, str] = {}
    good = 0
    for job, res in zip(jobs, results):
        b = job["body"]
        if job["kind"] == "bad":
            assert res["status"] in (400, 404) and res["error"]["message"], res
            continue
        assert res["status"] == 200, res
        if job["kind"] == "cancel":
            continue
        key = (
            b["prompt"],
            b["policy"],
            b["cache"],
            b["max_tokens"],
            b["block_length"],
            tuple(b.get("stop", ())),
            b.get("temperature"),
            b.get("seed"),
        )
        if key not in refs:
            policy = b["policy"] + (",temperature=0.8" if b.get("temperature") else "")
            refs[key] = reference(
                model,
                tok,
                b["prompt"],
                policy,
                gen_length=b["max_tokens"],
                block_length=b["block_length"],
                cache=b["cache"],
                stop=tuple(b.get("stop", ())),
                seed=b.get("seed"),
            )[0]
        assert res["text"] == refs[key], (job, res)
        good += 1
    kinds = {k: sum(j["kind"] == k for j in jobs) for k in ("plain", "stream", "chat-stream", "cancel", "bad")}
    assert good == kinds["plain"] + kinds["stream"] + kinds["chat-stream"] and min(kinds.values()) >= 10
    assert len({k[1] for k in refs}) == len(POLICIES) and len({k[2] for k in refs}) == 3
    _wait(lambda: server.gen.active() == 0 and not server.gen.engine.has_work())  # cancelled rows are freed
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "model": "dparallel", "running": 0, "queued": 0}


def test_disconnected_clients_free_their_rows(server):
    """A streaming client that closes its connection and a non-streaming one that hangs up both cancel
    their requests: the engine drops them instead of decoding them. Each client hangs up only once its
    request runs; the checks count cancellations and engine rounds (a 448-step request takes 448), not time."""
    huge = {"prompt": PROMPTS[1], "max_tokens": 448, "block_length": 448, "policy": "llada:steps=448"}
    engine = server.gen.engine
    rounds, cancelled = engine.rounds, engine.cancelled
    with httpx.stream("POST", server.url + "/v1/completions", json={**huge, "stream": True}, timeout=60) as r:
        assert r.status_code == 200  # headers sent: the request is admitted
        _wait(lambda: engine.rounds > rounds)  # and running
    _wait(lambda: engine.cancelled == cancelled + 1 and server.gen.active() == 0)
    body = json.dumps(huge).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as raw:  # a non-streaming client that hangs up
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        _wait(lambda: server.gen.active() == 1)
    _wait(lambda: engine.cancelled == cancelled + 2 and server.gen.active() == 0 and not engine.has_work())
    assert engine.rounds - rounds < 448  # neither request was decoded to its end
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
