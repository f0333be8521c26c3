"""The server's ``stream_mode: "denoise"`` stream shows a revising policy's revisions (DMax's ``spd``).

Each ``fewstep.denoise.step`` event names the positions its forward set (``committed``) and, among them, the
``revised`` ones: a decoded token replaced by another. Replaying the events gives the final canvas; the revision
count is what ``fewstep.generate`` reports for the same prompt alone; the text stream stays append-only.
"""

from __future__ import annotations

import json

import httpx

import fewstep
from tests.serve.conftest import BLOCK, GEN

PROMPT = "5 + 9 - 1 - 7 + 1 ?"  # the shipped student revises tokens on it (its answer changes under revision)
POLICY = "spd:0.5"


def _events(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_denoise_stream_shows_revisions(server, loaded):
    model, tok = loaded
    events = _events(server.url, {"prompt": PROMPT, "policy": POLICY, "stream": True, "stream_mode": "denoise"})
    steps = [e for e in events if e["object"] == "fewstep.denoise.step"]
    done = next(e for e in events if e["object"] == "fewstep.denoise.done")
    canvas: list[int | None] = [None] * len(steps[0]["tokens"])
    revisions = 0
    for e in steps:
        assert set(e["revised"]) <= set(e["committed"])
        for p in e["revised"]:  # a revision replaces a decoded token by another one
            assert canvas[p] is not None and canvas[p] != e["tokens"][p]
            assert e["steps"][p] < e["nfe"]  # first committed at an earlier forward
        canvas = list(e["tokens"])
        revisions += len(e["revised"])
    assert revisions > 0

    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    alone = fewstep.generate(model, [ids], POLICY, gen_length=GEN, block_length=BLOCK, tokenizer=tok, early_stop=True)
    assert revisions == int(alone.revisions[0]) and done["nfe"] == int(alone.nfe[0])
    assert canvas == [None if t == alone.mask_id else t for t in alone.answers[0].tolist()]

    # the text stream of the same request: deltas only ever append (text is final once its block closed)
    text = _events(server.url, {"prompt": PROMPT, "policy": POLICY, "stream": True})
    pieces = "".join(e["choices"][0]["text"] or "" for e in text if e.get("choices"))
    assert pieces == done["text"]
