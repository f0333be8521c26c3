"""``GET /metrics`` after real requests, read by prometheus-client's own parser: every count is what was sent."""

from __future__ import annotations

import json
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import serve

PROMPTS = ["3 + 4 - 2 + 8 - 1 ?", "5 + 9 - 1 - 7 + 1 ?", "1 + 2 ?"]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_count_what_was_sent(loaded):
    s = serve(*loaded)
    try:
        m = scrape(s.url)
        assert m[("fewstep:num_requests_running", ())] == 0 and m[("fewstep:request_success_total",
                                                                    (("finished_reason", "stop"),))] == 0  # fmt: skip
        usages, finish = [], []
        for p in PROMPTS:  # three plain requests
            r = httpx.post(s.url + "/v1/completions", json={"prompt": p}, timeout=60).json()
            usages.append(r["usage"])
            finish.append(r["choices"][0]["finish_reason"])
        r = httpx.post(s.url + "/v1/completions", json={"prompt": PROMPTS[0], "max_nfe": 1}, timeout=60).json()
        usages.append(r["usage"])
        finish.append(r["choices"][0]["finish_reason"])
        for p in PROMPTS[:2]:  # two streams (chat), their usage in the last chunk
            body = {"messages": [{"role": "user", "content": p}], "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as stream:
                chunks = [json.loads(ln[6:]) for ln in stream.iter_lines() if ln.startswith("data: {")]
            usages.append(chunks[-1]["usage"])
            finish.append(next(c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and
                               c["choices"][0]["finish_reason"]))  # fmt: skip
        bad = [({"prompt": "1 ?", "policy": "nope"}, 400), ({"prompt": "1 ?", "n": 3}, 400),
               ({"model": "gpt-9", "prompt": "1 ?"}, 404)]  # fmt: skip
        for body, status in bad:
            assert httpx.post(s.url + "/v1/completions", json=body).status_code == status
        text = httpx.post(
            s.url + "/v1/completions", content=b'{"prompt": "1 ?"}', headers={"Content-Type": "text/plain"}
        )
        assert text.status_code == 415
        # one request cancelled by its client while it runs
        slow = {"prompt": PROMPTS[1], "max_tokens": 448, "block_length": 448, "policy": "llada:steps=448",
                "stream": True}  # fmt: skip
        with httpx.stream("POST", s.url + "/v1/completions", json=slow, timeout=60) as stream:
            assert stream.status_code == 200
            deadline = time.monotonic() + 30
            while s.gen.engine.rounds == 0 or s.gen.active() == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            during = scrape(s.url)
        deadline = time.monotonic() + 30
        while s.gen.active():
            assert time.monotonic() < deadline
            time.sleep(0.01)

        m = scrape(s.url)
        assert during[("fewstep:num_requests_running", ())] == 1 and during[("fewstep:num_requests_waiting", ())] == 0
        assert m[("fewstep:num_requests_running", ())] == 0
        n = len(usages)
        for reason in ("stop", "length"):
            want = finish.count(reason)
            assert m[("fewstep:request_success_total", (("finished_reason", reason),))] == want, reason
        assert finish.count("length") == 1 and finish.count("stop") == n - 1
        assert m[("fewstep:request_success_total", (("finished_reason", "abort"),))] == 1
        for hist in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_forwards",
                     "tokens_per_forward"):  # fmt: skip
            assert m[(f"fewstep:{hist}_count", ())] == n, hist
            assert m[(f"fewstep:{hist}_bucket", (("le", "+Inf"),))] == n, hist
        assert m[("fewstep:e2e_request_latency_seconds_sum", ())] > 0
        assert m[("fewstep:prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usages)
        assert m[("fewstep:generation_tokens_total", ())] == sum(u["completion_tokens"] for u in usages)
        assert m[("fewstep:forwards_total", ())] == sum(u["nfe"] for u in usages)
        assert m[("fewstep:request_forwards_sum", ())] == sum(u["nfe"] for u in usages)
        assert m[("fewstep:tokens_per_forward_sum", ())] > n  # the student commits several tokens per forward
        errors = {k[1]: v for k, v in m.items() if k[0] == "fewstep:request_errors_total"}
        assert errors == {
            (("kind", "invalid_request_error"), ("status", "400")): 2,
            (("kind", "model_not_found"), ("status", "404")): 1,
            (("kind", "unsupported_media_type"), ("status", "415")): 1,
        }, errors
    finally:
        s.close()
