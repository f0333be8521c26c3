"""Bad input gets an OpenAI-style error with the right status, never a traceback nor a wedged server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from fewstep.tasks import arith
from tests.serve.conftest import GEN, reference, serve

LONG = " ".join(["1 +"] * 300) + " 1 ?"  # 601 tokens: longer than the 512-token context
SAMPLED = "entropy:threshold=0.45,temperature=0.7"  # a sampling policy: the seed matters
CASES = [
    # (name, raw body or JSON, status, param)
    ("malformed JSON", b'{"prompt": "1 ?",', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("non-UTF-8 bytes", b'{"prompt": "1 \xff\xfe ?"}', 400, None),
    ("missing prompt", {"max_tokens": 8}, 400, "prompt"),
    ("prompt of the wrong type", {"prompt": {"text": "1 ?"}}, 400, "prompt"),
    ("max_tokens a string", {"prompt": "1 ?", "max_tokens": "8"}, 400, "max_tokens"),
    ("max_tokens a bool", {"prompt": "1 ?", "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens zero", {"prompt": "1 ?", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", {"prompt": "1 ?", "max_tokens": -4}, 400, "max_tokens"),
    ("max_tokens beyond the context", {"prompt": "1 ?", "max_tokens": 4096}, 400, "max_tokens"),
    ("prompt longer than the context", {"prompt": LONG, "max_tokens": 8}, 400, "prompt"),
    ("token id outside the vocabulary", {"prompt": [5, 99999], "max_tokens": 8}, 400, "prompt"),
    ("unknown model", {"model": "gpt-9", "prompt": "1 ?"}, 404, "model"),
    ("unknown policy", {"prompt": "1 ?", "policy": "greedy-ish"}, 400, "policy"),
    ("bad policy option", {"prompt": "1 ?", "policy": "entropy:warp=3"}, 400, "policy"),
    ("bad policy value", {"prompt": "1 ?", "policy": "llada:steps=abc"}, 400, "policy"),
    ("threshold on a policy without one", {"prompt": "1 ?", "policy": "llada", "threshold": 0.5}, 400, "threshold"),
    ("top_p on a policy that does not sample with it", {"prompt": "1 ?", "top_p": 0.5}, 400, "top_p"),
    ("temperature out of range", {"prompt": "1 ?", "temperature": 9}, 400, "temperature"),
    (
        "block_length not dividing max_tokens",
        {"prompt": "1 ?", "max_tokens": 24, "block_length": 16},
        400,
        "block_length",
    ),
    ("unknown cache", {"prompt": "1 ?", "cache": "triple"}, 400, "cache"),
    ("n > 1", {"prompt": "1 ?", "n": 2}, 400, "n"),
    ("stop list too long", {"prompt": "1 ?", "stop": [f"s{i}" for i in range(17)]}, 400, "stop"),
    ("stop of the wrong type", {"prompt": "1 ?", "stop": 5}, 400, "stop"),
    ("bad stream_mode", {"prompt": "1 ?", "stream": True, "stream_mode": "pixels"}, 400, "stream_mode"),
    ("stream not a bool", {"prompt": "1 ?", "stream": "yes"}, 400, "stream"),
    ("max_nfe zero", {"prompt": "1 ?", "max_nfe": 0}, 400, "max_nfe"),
    ("logprobs", {"prompt": "1 ?", "logprobs": 5}, 400, "logprobs"),
    # every field within its range, through the engine's one validation path
    ("seed from 2**64", {"prompt": "1 ?", "policy": SAMPLED, "seed": 18446744073709551616}, 400, "seed"),
    ("negative seed", {"prompt": "1 ?", "policy": SAMPLED, "seed": -1}, 400, "seed"),
    ("seed a float", {"prompt": "1 ?", "seed": 1.5}, 400, "seed"),
    ("max_nfe beyond any count", {"prompt": "1 ?", "max_nfe": 2**40}, 400, "max_nfe"),
    ("block_length beyond the answer", {"prompt": "1 ?", "max_tokens": 8, "block_length": 10**12}, 400, "block_length"),
    ("policy steps beyond any canvas", {"prompt": "1 ?", "policy": "llada:steps=1000000000"}, 400, "policy"),
    ("policy spec too long", {"prompt": "1 ?", "policy": "threshold:" + "9" * 5000}, 400, "policy"),
    ("temperature infinite", b'{"prompt": "1 ?", "temperature": 1e999}', 400, "temperature"),
    ("temperature a huge integer", {"prompt": "1 ?", "temperature": 10**400}, 400, "temperature"),
    ("threshold out of the policy's range", {"prompt": "1 ?", "policy": "threshold", "threshold": 7}, 400, "threshold"),
    ("top_p out of range", {"prompt": "1 ?", "policy": "dream", "top_p": 5}, 400, "top_p"),
    ("cache of the wrong type", {"prompt": "1 ?", "cache": 3}, 400, "cache"),
    ("an integer of 5,000 digits", b'{"prompt": "1 ?", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),
]


def _check_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text and err["param"] == param
    return err


@pytest.mark.parametrize("name,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_completion_requests(server, name, body, status, param):
    kw = (
        {"content": body, "headers": {"Content-Type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    _check_error(httpx.post(server.url + "/v1/completions", timeout=30, **kw), status, param)


def test_bad_chat_requests_and_routes(server):
    url = server.url + "/v1/chat/completions"
    _check_error(httpx.post(url, json={"messages": []}), 400, "messages")
    _check_error(httpx.post(url, json={"messages": [{"content": "1 ?"}]}), 400, "messages[0]")
    _check_error(httpx.post(url, json={"messages": [{"role": "user", "content": 3}]}), 400, "messages[0].content")
    _check_error(
        httpx.post(url, json={"messages": [{"role": "user", "content": "1 ?"}], "max_tokens": 0}), 400, "max_tokens"
    )
    _check_error(httpx.get(server.url + "/v1/nothing"), 404, None)
    _check_error(httpx.get(server.url + "/v1/completions"), 405, None)
    # the official client raises its typed errors from these bodies
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="1 ?")
    with pytest.raises(openai.BadRequestError, match="only n = 1"):
        client.completions.create(model="dparallel", prompt="1 ?", n=3)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert client.completions.create(model="dparallel", prompt="3 + 4 - 2 + 8 - 1 ?").choices[0].text


def test_the_seed_reproducer_gets_400_and_the_server_keeps_answering_the_same(server, loaded):
    """A seed from 2**64 once answered 500 and left its request in the engine for good, wedging the server."""
    url = server.url + "/v1/completions"
    body = {"prompt": "3 + 4 - 2 + 8 - 1 ?", "policy": SAMPLED, "seed": 3}
    before = httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]
    text, _ = reference(*loaded, body["prompt"], SAMPLED, seed=3)
    assert before == text
    for seed in (18446744073709551616, 2**200, -(2**63)):
        err = _check_error(httpx.post(url, json={**body, "seed": seed}, timeout=60), 400, "seed")
        assert "seed must be an integer" in err["message"] and len(err["message"]) < 200
    for _ in range(3):  # the same answers, at once: nothing was left behind in the engine
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == before
    assert httpx.post(url, json={**body, "seed": 2**64 - 1}, timeout=60).status_code == 200  # the largest seed
    assert httpx.get(server.url + "/health").json()["status"] == "ok" and server.gen.active() == 0
    assert not server.gen.engine.has_work()


def test_a_request_whose_forward_fails_ends_alone_and_the_others_finish_exactly(loaded):
    """A fault injected into the model for one request (its prompt holds a poisoned token): that request
    answers 500, the streaming requests decoding beside it finish with their answers alone, and the
    server goes on serving."""
    import fewstep
    from tests.decoding.test_faults import FaultyModel

    model, tok = loaded
    prompts = [p.prompt for p in arith.generate("test", 3, seed=1)]
    # one token per forward in one block of 64: the good requests are still decoding when the bad one comes
    policy, block = "llada:steps=64", GEN
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = fewstep.generate(model, ids, policy, gen_length=GEN, block_length=block, tokenizer=tok, early_stop=True)
    used = {t for row in ids for t in row} | {t for row in out.answers.tolist() for t in row}
    poison = next(
        t for t in range(model.config.vocab_size) if t not in used and t not in fewstep.decoding.stop_ids(model, tok)
    )
    s = serve(FaultyModel(model, poison), tok)
    try:
        want = [reference(model, tok, p, policy, block_length=block)[0] for p in prompts]
        got: dict[int, str] = {}

        def stream(i: int) -> None:
            body = {"prompt": prompts[i], "policy": policy, "block_length": block, "stream": True}
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
                lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
            got[i] = "".join(json.loads(ln)["choices"][0]["text"] for ln in lines if json.loads(ln).get("choices"))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while s.gen.active() < len(prompts):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        bad = {"prompt": [*ids[0][:-1], poison, ids[0][-1]], "policy": policy, "block_length": block}
        err = _check_error(httpx.post(s.url + "/v1/completions", json=bad, timeout=60), 500, None)
        assert err["code"] == "request_failed" and "the model forward failed: RuntimeError" in err["message"]
        assert s.gen.active() == len(prompts)  # the others still decode
        for t in threads:
            t.join()
        assert [got[i] for i in range(len(prompts))] == want
        again = {"prompt": prompts[0], "policy": policy, "block_length": block}
        r = httpx.post(s.url + "/v1/completions", json=again, timeout=60)
        assert r.json()["choices"][0]["text"] == want[0] and httpx.get(s.url + "/health").status_code == 200
        assert s.gen.engine.failed == 1 and not s.gen.engine.has_work()
    finally:
        s.close()


def test_body_over_the_limit_is_413(server):
    big = b'{"prompt": "' + b"1 + " * 300_000 + b'1 ?"}'
    _check_error(httpx.post(server.url + "/v1/completions", content=big), 413, None)

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(40):
            yield b" " * 65536

    _check_error(httpx.post(server.url + "/v1/completions", content=chunks()), 413, None)


def test_full_queue_answers_429_at_once(loaded):
    s = serve(*loaded, max_batch=1, max_queue=1)
    try:
        slow = {  # 448 forwards each: both are still decoding when the third request arrives
            "prompt": "1 + 2 ?",
            "max_tokens": 448,
            "block_length": 448,
            "policy": "llada:steps=448",
            "stream": True,
        }
        results = []

        def hold():
            with httpx.stream("POST", s.url + "/v1/completions", json=slow, timeout=120) as r:
                results.append((r.status_code, [ln for ln in r.iter_lines() if ln][-1]))

        threads = [threading.Thread(target=hold) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while s.gen.active() < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        rounds = s.gen.engine.rounds
        err = _check_error(httpx.post(s.url + "/v1/completions", json={"prompt": "1 ?"}, timeout=30), 429, None)
        assert err["code"] == "queue_full"
        # "at once": answered while both admitted requests still decode (no wait for a free row)
        assert s.gen.active() == 2 and s.gen.engine.rounds - rounds < 448
        for t in threads:
            t.join()
        assert results == [(200, "data: [DONE]")] * 2  # the admitted ones are served
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "1 ?", "max_tokens": 8}).status_code == 200
    finally:
        s.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serve_with_api_key():
    """`fewstep serve` in its own process: the key from FEWSTEP_API_KEY, 401 without it, the defaults."""
    port = _free_port()
    env = {**os.environ, "FEWSTEP_API_KEY": "sesame", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fewstep", "serve", "--port", str(port), "--max-batch", "4"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        body = {"prompt": "3 + 4 - 2 + 8 - 1 ?"}
        err = _check_error(httpx.post(url + "/v1/completions", json=body), 401, None)
        assert err["type"] == "authentication_error"
        _check_error(
            httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401, None
        )
        client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        r = client.completions.create(model="dparallel", prompt=body["prompt"])
        assert r.choices[0].text.endswith("#### 12") and r.usage.nfe < 16  # the card's policy, 64 tokens
        card = client.models.list().data[0]
        assert card.id == "dparallel" and card.fewstep["policy"] == "cad:0.95"
        assert card.fewstep["max_tokens"] == 64
        assert httpx.get(url + "/").status_code == 200  # the page itself needs no key
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_serve_user_errors(capsys):
    """One line on stderr and exit status 2, before anything is served."""
    from fewstep import cli

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    for args, msg in (
        (["--model", "no-such-model"], "does not exist"),
        (["--policy", "nope"], "unknown policy"),
        (["--gen-length", "1000"], "context"),
        (["--max-batch", "0"], "--max-batch"),
        (["--port", str(taken.getsockname()[1])], "cannot listen"),
    ):
        try:
            code = cli.main(["serve", *args])
        except SystemExit as exc:  # argparse's own errors (a bad --max-batch) exit from the parser
            code = exc.code
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith("fewstep serve: error:") and msg in err and "Traceback" not in err, err
    taken.close()
