"""A real uvicorn server on a free local port, serving the shipped ``dparallel`` student in-process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

import fewstep
from fewstep.assets import resolve_model
from fewstep.decoding.text import GenerationSettings, TextGenerator
from fewstep.serve import ServeConfig, ServerLimits, create_app, start_in_thread

POLICY = "entropy:0.45"  # the model card's recommendation
GEN, BLOCK = 64, 32


@pytest.fixture(scope="session")
def loaded():
    d = resolve_model("dparallel")
    return fewstep.load_model(d), fewstep.load_tokenizer(d)


class Served:
    def __init__(self, gen: TextGenerator, cfg: ServeConfig, limits: ServerLimits | None = None):
        self.gen, self.cfg = gen, cfg
        self.app = create_app(gen, cfg)
        self.server, self.thread, self.port = start_in_thread(self.app, limits=limits)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(model, tok, limits: ServerLimits | None = None, **cfg) -> Served:
    defaults = GenerationSettings(policy=POLICY, max_tokens=GEN, block_length=BLOCK)
    gen = TextGenerator(model, tok, max_batch=cfg.get("max_batch", 32))
    return Served(gen, ServeConfig(model_name="dparallel", defaults=defaults, **cfg), limits)


@pytest.fixture(scope="session")
def server(loaded):
    s = serve(*loaded)
    yield s
    s.close()


def reference(
    model,
    tok,
    prompt: str,
    policy: str = POLICY,
    *,
    gen_length: int = GEN,
    block_length: int = BLOCK,
    cache: str = "none",
    stop: tuple[str, ...] = (),
    seed: int | None = None,
) -> tuple[str, int]:
    """What ``fewstep.generate`` gives ``prompt`` alone: the answer cut at its first stop id, decoded, cut at
    the first stop string; and its NFE."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = fewstep.generate(
        model,
        [ids],
        policy,
        gen_length=gen_length,
        block_length=block_length,
        cache=cache,
        tokenizer=tok,
        early_stop=True,
        seed=None if seed is None else [seed],
    )
    answer = out.answers[0].tolist()
    stops = fewstep.decoding.stop_ids(model, tok)
    cut = next((i for i, t in enumerate(answer) if t in stops), len(answer))
    text = tok.decode(answer[:cut], skip_special_tokens=True)
    hits = [text.find(s) for s in stop if s in text]
    return (text[: min(hits)] if hits else text), int(out.nfe[0])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_process(*flags: str) -> tuple[subprocess.Popen, str]:
    """``fewstep serve`` (the shipped ``dparallel``) in its own process on a free port, once it answers
    /health; returns the process and its URL. Its output goes to a file (a pipe nobody reads would fill
    and block the server's access log), read with :func:`output`."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    log = tempfile.NamedTemporaryFile("w+", prefix="fewstep-serve-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "fewstep", "serve", "--port", str(port), *flags],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log_path = log.name  # type: ignore[attr-defined]
    log.close()
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"fewstep serve did not start: {output(proc)}")
        time.sleep(0.2)


def output(proc: subprocess.Popen) -> str:
    """What a process from :func:`start_process` printed so far."""
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def stop_process(proc: subprocess.Popen) -> None:
    """Kill a process from :func:`start_process` (if it still runs) and remove its output file."""
    proc.kill()
    proc.wait()
    Path(proc.log_path).unlink(missing_ok=True)  # type: ignore[attr-defined]
