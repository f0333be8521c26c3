"""The server's edge: nesting and encodings, the prompt's size cap, tokenising off the event loop,
connection deadlines (raw sockets), and the Host / media-type checks of a server without an API key."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from fewstep.serve import ServerLimits
from fewstep.serve.guards import default_allowed_hosts, host_allowed, parse_allowed_hosts
from tests.serve.conftest import reference, serve

PROMPT = "3 + 4 - 2 + 8 - 1 ?"


def _error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert code is None or err["code"] == code, err
    return err


def _post(url: str, raw: bytes, path: str = "/v1/completions", **headers) -> httpx.Response:
    return httpx.post(url + path, content=raw, headers={"Content-Type": "application/json", **headers}, timeout=30)


def test_nesting_and_encodings_are_400_with_a_plain_message(server, loaded):
    err = _error(_post(server.url, b"[" * 100_000), 400, "invalid_json")
    assert err["message"] == "the request body nests arrays and objects more than 64 levels deep"
    deep = json.dumps({"prompt": "1 ?", "max_tokens": json.loads("[" * 70 + "]" * 70)}).encode()  # parses
    assert _error(_post(server.url, deep), 400, "invalid_json")["message"] == err["message"]
    err = _error(_post(server.url, b'{"prompt": "1 \\ud800 ?"}'), 400, "invalid_encoding", "prompt")
    assert "lone UTF-16 surrogate \\ud800" in err["message"] and "not valid Unicode" in err["message"]
    chat = b'{"messages": [{"role": "user", "content": "\\udfff"}]}'
    _error(_post(server.url, chat, "/v1/chat/completions"), 400, "invalid_encoding", "messages")
    _error(_post(server.url, b'{"prompt": "1 ?", "max_tokens": ' + b"9" * 5000 + b"}"), 400, "invalid_json")
    # a pair is a character, not a mistake
    r = _post(server.url, b'{"prompt": "3 + 4 - 2 + 8 - 1 ? \\ud83d\\ude00", "max_tokens": 8}')
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT}, timeout=30)
    assert r.json()["choices"][0]["text"] == reference(*loaded, PROMPT)[0]


class _Spy:
    """A tokenizer that records the threads it runs on, and can hold a call until released."""

    def __init__(self, tok, hold: bool = False):
        self._tok, self.threads, self.hold = tok, [], hold
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        if self.hold:
            assert self.release.wait(60)
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_prompt_character_cap_before_tokenising(loaded):
    s = serve(*loaded, max_prompt_chars=1000)
    try:
        spy = s.gen.tokenizer = _Spy(loaded[1])
        err = _error(httpx.post(s.url + "/v1/completions", json={"prompt": "1 + " * 300}), 400, "prompt_too_long",
                     "prompt")  # fmt: skip
        assert "1200 characters" in err["message"] and "at most 1000" in err["message"]
        body = {"messages": [{"role": "user", "content": "x" * 1001}]}
        _error(httpx.post(s.url + "/v1/chat/completions", json=body), 400, "prompt_too_long", "messages")
        assert spy.threads == []  # refused before any tokenising
        # under the cap, the engine's own context check still speaks (after tokenising)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "1 + " * 249 + "1 ?"})
        assert "context" in _error(r, 400, None, "max_tokens")["message"] and spy.threads
    finally:
        s.close()
    d = serve(*loaded)  # the default cap: 16 characters per token of the 512-token context
    try:
        err = _error(
            httpx.post(d.url + "/v1/completions", json={"prompt": "1" * 8193}), 400, "prompt_too_long", "prompt"
        )
        assert "at most 8192" in err["message"]
    finally:
        d.close()


def test_tokenising_runs_off_the_event_loop(loaded):
    """While a prompt is being tokenised (held in the tokenizer), the server answers /health."""
    s = serve(*loaded)
    try:
        spy = s.gen.tokenizer = _Spy(loaded[1], hold=True)
        got: dict = {}
        client = threading.Thread(target=lambda: got.update(r=httpx.post(s.url + "/v1/completions",
                                                                          json={"prompt": PROMPT}, timeout=60)))  # fmt: skip
        client.start()
        assert spy.entered.wait(30)
        assert httpx.get(s.url + "/health", timeout=5).json()["status"] == "ok"  # the loop is free
        spy.release.set()
        client.join(60)
        assert got["r"].json()["choices"][0]["text"] == reference(*loaded, PROMPT)[0]
        assert spy.threads and all(t.startswith("fewstep-prepare") for t in spy.threads), spy.threads
    finally:
        spy.release.set()
        s.close()


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends before it closes ``sock`` (fails if it is still open after ``seconds``)."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the connection was still open after {seconds} s; got {data!r}")
    except ConnectionResetError:
        pass
    return data


def test_idle_and_half_sent_connections_are_closed(loaded):
    s = serve(*loaded, limits=ServerLimits(timeout_keep_alive=0.5, timeout_read=1.0))
    addr = ("127.0.0.1", s.port)
    try:
        idle = [socket.create_connection(addr) for _ in range(20)]  # connected, never a byte
        head = socket.create_connection(addr)
        head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        body = socket.create_connection(addr)
        body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # fmt: skip
        kept = socket.create_connection(addr)  # a finished request, then idle on a keep-alive connection
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        slow = socket.create_connection(addr)  # slow but within the read deadline: served
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.3)
        slow.sendall(b"\r\n")
        t0 = time.monotonic()
        for sock in idle:
            assert _closed_within(sock, 10) == b""
        assert _closed_within(head, 10).startswith(b"HTTP/1.1 408 ")
        assert b" 200 " not in _closed_within(body, 10)
        assert b"HTTP/1.1 200 OK" in _closed_within(kept, 10)
        assert b"HTTP/1.1 200 OK" in _closed_within(slow, 10)
        assert time.monotonic() - t0 < 10
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
    finally:
        s.close()


def test_without_a_key_only_json_bodies_and_the_servers_own_host_names(server, loaded):
    url, body = server.url + "/v1/completions", json.dumps({"prompt": PROMPT}).encode()
    rounds = server.gen.engine.rounds
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = httpx.post(url, content=body, headers={"Content-Type": ctype})
        assert "application/json" in _error(r, 415, "unsupported_media_type")["message"]
    _error(httpx.post(url, content=body), 415, "unsupported_media_type")  # no Content-Type at all
    assert server.gen.engine.rounds == rounds  # nothing was decoded
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/")):
            r = httpx.request(method, server.url + path, content=body, headers={"Host": host})
            assert "--allowed-hosts" in _error(r, 400, "invalid_host")["message"]
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost", f"[::1]:{server.port}"):
        r = httpx.post(url, content=body, headers={"Host": host, "Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference(*loaded, PROMPT)[0]


def test_with_a_key_or_named_hosts(loaded):
    keyed = serve(*loaded, api_key="sesame")
    try:  # a key cannot be sent cross-site without a preflight: any media type and host
        r = httpx.post(keyed.url + "/v1/completions", content=json.dumps({"prompt": PROMPT, "max_tokens": 8}),
                       headers={"Authorization": "Bearer sesame", "Content-Type": "text/plain",
                                "Host": "api.example.com"})  # fmt: skip
        assert r.status_code == 200, r.text
    finally:
        keyed.close()
    named = serve(*loaded, allowed_hosts=("api.example.com", "*.internal"))
    try:
        for host, status in (("api.example.com", 200), ("a.b.internal:80", 200), ("evil.example", 400),
                             ("127.0.0.1", 400)):  # fmt: skip
            assert httpx.get(named.url + "/health", headers={"Host": host}).status_code == status, host
    finally:
        named.close()


def test_default_allowed_hosts():
    assert default_allowed_hosts("127.0.0.1", None) == ("127.0.0.1", "localhost", "::1")
    assert default_allowed_hosts("::1", None) == ("::1", "localhost", "127.0.0.1")
    assert default_allowed_hosts("192.168.7.2", None) == ("192.168.7.2",)
    assert default_allowed_hosts("0.0.0.0", None) == ("*",) and default_allowed_hosts("127.0.0.1", "k") == ("*",)
    assert parse_allowed_hosts(" API.example.com., *.corp ,[::1]") == ("api.example.com", "*.corp", "::1")
    with pytest.raises(ValueError, match="at least one"):
        parse_allowed_hosts(" , ")
    assert host_allowed("[::1]:8000", ["::1"]) and not host_allowed("localhost.evil:80", ["localhost"])


def test_cli_limit_flags_are_checked(capsys):
    """A bad limit flag: one line on stderr and exit status 2, before the model loads."""
    from fewstep import cli
    from tests.serve.conftest import free_port

    port = str(free_port())
    for args, msg in (
        (["--drain-timeout", "0"], "--drain-timeout must be > 0"),
        (["--timeout-read", "-1"], "--timeout-read must be > 0"),
        (["--max-prompt-chars", "-5"], "--max-prompt-chars must be >= 0"),
        (["--allowed-hosts", ","], "--allowed-hosts needs at least one name"),
    ):
        assert cli.main(["serve", "--port", port, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fewstep serve: error:") and msg in err and "Traceback" not in err, err
