"""Streaming on the continuous-batching engine: a request's deltas arrive across its rounds (the first one
long before its last forward), and cancelling a running request frees its row at the next round."""

from __future__ import annotations

import json
import threading
import time

import httpx

from fewstep.decoding.text import Canvas, Completion, Delta, GenerationSettings
from fewstep.tasks import arith
from tests.serve.conftest import reference

PROMPT = arith.generate_problems("test", 4, seed=3)[1].prompt
SLOW = {"policy": "threshold:0.9", "max_tokens": 64, "block_length": 8}  # 11 forwards (early stop)


def _collect(gen, settings: GenerationSettings, on_canvas=None) -> list:
    events, done = [], threading.Event()

    def sink(ev) -> None:
        events.append(ev)
        if on_canvas is not None and isinstance(ev, Canvas):
            on_canvas(ev)
        if isinstance(ev, Completion):
            done.set()

    rid = gen.submit(PROMPT, settings, sink, canvas=True)
    assert done.wait(60)
    return rid, events


def test_deltas_arrive_across_rounds(server, loaded):
    _, events = _collect(server.gen, GenerationSettings(**SLOW))
    comp = events[-1]
    first = next(i for i, e in enumerate(events) if isinstance(e, Delta))
    first_nfe = [e.nfe for e in events[:first] if isinstance(e, Canvas)][-1]  # the forward that made it final
    assert comp.nfe == 11 and first_nfe <= 2, (first_nfe, comp.nfe)  # within the first 2 of its 11 forwards
    assert sum(isinstance(e, Delta) for e in events) >= 4  # spread over rounds, not one at the end
    assert comp.first_delta_s <= comp.latency_s
    assert comp.text == reference(*loaded, PROMPT, SLOW["policy"], gen_length=64, block_length=8)[0]

    body = {"prompt": PROMPT, "stream": True, **SLOW}  # the same over HTTP (SSE)
    t0, ttfd, pieces = time.perf_counter(), None, []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and (piece := json.loads(line[6:])["choices"][0]["text"]):
                ttfd = ttfd or time.perf_counter() - t0
                pieces.append(piece)
    latency = time.perf_counter() - t0
    assert "".join(pieces) == comp.text and len(pieces) >= 4 and ttfd < latency


def test_cancelling_a_running_request_frees_its_row_at_the_next_round(server, loaded):
    gen, seen = server.gen, {}

    def cancel_at_3(ev: Canvas) -> None:  # runs in the engine thread, between rounds
        if ev.nfe == 3:
            seen["rounds"] = gen.engine.rounds
            gen.cancel(ev.id)

    _, events = _collect(gen, GenerationSettings(policy="llada:steps=64", max_tokens=64, block_length=64), cancel_at_3)
    comp = events[-1]
    assert comp.finish_reason == "cancelled" and comp.nfe == 3  # no forward after the cancel
    assert [e.nfe for e in events if isinstance(e, Canvas)] == [1, 2, 3]
    assert gen.engine.rounds == seen["rounds"] and gen.engine.running == 0 and not gen.engine.has_work()
    # the engine goes on serving: the next request gets exactly what it gets alone
    _, events = _collect(gen, GenerationSettings(**SLOW))
    assert events[-1].text == reference(*loaded, PROMPT, SLOW["policy"], gen_length=64, block_length=8)[0]
