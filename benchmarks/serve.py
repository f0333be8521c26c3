"""Serving benchmark: ``fewstep serve`` under 1, 8 and 32 concurrent streaming clients, against
one-at-a-time :func:`fewstep.generate` in the same run. Results: a printed table and JSON.

For each model the server runs in its own process (this script started again with ``--_serve``), the
clients here (asyncio + aiohttp, or httpx with --client httpx; streaming SSE). Per concurrency level: requests/s, output tokens/s
(completion tokens of the answers), time to first delta (request sent -> first non-empty text
chunk), p50 / p99 request latency (sent -> ``[DONE]``). The direct row decodes the same prompts one
by one with ``fewstep.generate`` in this process (no HTTP, no text layer), in turn with the 1-client
requests (direct, HTTP, direct, HTTP, ...: a busy machine's changing load hits both alike): its
latency is the reference for the HTTP overhead at 1 client, its requests/s the reference for the
speedup at 8 and 32 clients.

Models: ``embedded`` (the shipped ``dparallel`` student with its card's policy, ``entropy:0.45``, 64
tokens, on held-out ``arith`` prompts) at 1/8/32 clients; ``8b-shaped`` (a random LLaDA with
LLaDA-8B's widths, vocabulary 126,464, ``--layers`` layers; a fixed 4 steps per block, as in
``benchmarks/decode.py``, since random weights commit one token per step under threshold rules) at 1/8.

    python benchmarks/serve.py                    # both models (a few minutes on 2 CPU cores)
    python benchmarks/serve.py --models embedded  # one model
    python benchmarks/serve.py --quick            # seconds; a smoke run

``--matched`` runs issue 27's matched-compute setting instead (results: ``serve_matched.json``): the
``dparallel`` student, the 64 embedded-task prompts, ``llada:steps=64`` (64 fixed forwards, blocks of
32, greedy), no EOS early stop, every server pinned to one core (``--pin``, default 0) with one torch
thread, the clients pinned to another; non-streaming chat completions (the peer's API). At 1, 8 and 32
clients: requests/s, and the server process's CPU seconds per request (from ``/proc``, robust to the
load of a shared machine); the same batch sizes in-process without HTTP, through the engine and through
the text layer, so HTTP and engine costs are separate; and every answer at 8 and 32 clients checked
against the 1-client one. ``--peer PYTHON`` also serves the same model with ``dlmserve`` (PyPI 0.1.1,
installed in the environment of that Python; never vendored) side by side, its loader given fewstep's
model and tokenizer; without it (or when dlmserve does not import there) the peer row is skipped with
the reason recorded.

    taskset -c 0,1 python benchmarks/serve.py --matched --peer /tmp/peer-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

VOCAB_8B = 126464
DEFAULT_OUT = str(ROOT / "benchmarks" / "results" / "serve.json")


def build_model(
    which: str, layers: int, quick: bool, cache: str = "none", device: str = "cpu", dtype: str | None = None
):
    """(model, tokenizer, default settings, prompts as text) of a benchmark model, on ``device`` in ``dtype``
    (None: the model's own, float32)."""
    import torch

    import fewstep
    from fewstep.assets import resolve_model
    from fewstep.decoding.text import GenerationSettings
    from fewstep.tasks import arith

    if which == "embedded":
        d = resolve_model("dparallel")
        prompts = [p.prompt for p in arith.generate_problems("test", 512, seed=0)]
        return (
            fewstep.load_model(d, dtype=dtype, device=device),
            fewstep.load_tokenizer(d),
            GenerationSettings(policy="entropy:0.45", max_tokens=64, block_length=32, cache=cache),
            prompts,
        )
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from decode import synthetic_llada

    from fewstep.models.tokenizer import build_word_tokenizer

    vocab = 1024 if quick else VOCAB_8B
    width = (
        {"d_model": 64, "n_layers": 1, "n_heads": 4, "mlp": 128}
        if quick
        else {"d_model": 4096, "n_layers": layers, "n_heads": 32, "mlp": 12288}
    )
    model = synthetic_llada(width["d_model"], width["n_layers"], width["n_heads"], width["mlp"], vocab)
    model = model.to(device=device, dtype=getattr(torch, dtype) if dtype else None)
    tok = build_word_tokenizer(f"w{i}" for i in range(5, vocab))  # ids 0-4 special, then one word per id
    words = [f"w{i}" for i in range(5, 4000 if not quick else 1000)]
    prompts = [" ".join(words[(7 * i + 13 * j) % len(words)] for j in range(16)) for i in range(256)]
    return model, tok, GenerationSettings(policy="llada:steps=4", max_tokens=32, block_length=32, cache=cache), prompts


def serve_main(args) -> int:
    """The server process: build the model, serve it on ``--port``."""
    import torch

    from fewstep.decoding.text import TextGenerator
    from fewstep.serve import ServeConfig, create_app, run

    torch.set_num_threads(args.threads)
    pin(args.pin)
    model, tok, settings, _ = build_model(args._serve, args.layers, args.quick, args.cache, args.device, args.dtype)
    if args.matched:
        settings = matched_settings()
    gen = TextGenerator(model, tok, max_batch=32)
    app = create_app(gen, ServeConfig(model_name=args._serve, defaults=settings, max_queue=1024))
    run(app, "127.0.0.1", args.port, log_level="warning")
    return 0


def direct(model, tok, settings, prompts) -> dict:
    """One request at a time through fewstep.generate (the answer cut at EOS and decoded, as a caller does)."""
    import fewstep
    from fewstep.decoding import stop_ids

    stops = set(stop_ids(model, tok))
    lat, tokens = [], 0
    t0 = time.perf_counter()
    for p in prompts:
        t = time.perf_counter()
        ids = tok(p, add_special_tokens=False)["input_ids"]
        out = fewstep.generate(
            model,
            [ids],
            settings.policy,
            gen_length=settings.max_tokens,
            block_length=settings.block_length,
            cache=settings.cache,
            tokenizer=tok,
            early_stop=True,
        )
        answer = out.answers[0].tolist()
        cut = next((i for i, x in enumerate(answer) if x in stops), len(answer))
        tok.decode(answer[:cut], skip_special_tokens=True)
        tokens += cut
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return _row("direct fewstep.generate", 1, len(prompts), wall, lat, [], tokens)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else 0.0


def _row(name, clients, n, wall, lat, ttfd, tokens) -> dict:
    return {
        "mode": name,
        "clients": clients,
        "requests": n,
        "seconds": round(wall, 4),
        "requests_per_s": round(n / wall, 3),
        "output_tokens_per_s": round(tokens / wall, 2),
        "ttfd_p50_s": round(statistics.median(ttfd), 4) if ttfd else None,
        "latency_p50_s": round(_pct(lat, 0.5), 4),
        "latency_p99_s": round(_pct(lat, 0.99), 4),
    }


class _Client:
    """One streaming HTTP client library behind one call: ``lines(url, body)`` yields the SSE lines."""

    def __init__(self, kind: str, connections: int):
        self.kind, self.connections, self.session = kind, connections, None

    async def __aenter__(self):
        if self.kind == "aiohttp":
            import aiohttp

            connector = aiohttp.TCPConnector(limit=self.connections)
            self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))
        else:
            import httpx

            limits = httpx.Limits(max_connections=self.connections)
            self.session = httpx.AsyncClient(timeout=600, limits=limits)
        return self

    async def __aexit__(self, *exc):
        await (self.session.close() if self.kind == "aiohttp" else self.session.aclose())

    async def get(self, url: str) -> None:
        if self.kind == "aiohttp":
            async with self.session.get(url) as r:
                await r.read()
        else:
            await self.session.get(url)

    async def lines(self, url: str, body: dict):
        if self.kind == "aiohttp":
            async with self.session.post(url, json=body) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {await r.read()}")
                async for raw in r.content:
                    yield raw.decode().rstrip("\r\n")
        else:
            async with self.session.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
                async for line in r.aiter_lines():
                    yield line


async def _clients(url: str, prompts: list[str], clients: int, client: _Client | None = None, kind="aiohttp") -> dict:
    """``clients`` concurrent streaming clients over ``prompts``; ``client``: an open :class:`_Client` to reuse."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    lat, ttfd, tokens = [], [], [0]

    async def one(client: _Client) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            t = time.perf_counter()
            first = None
            async for line in client.lines(url + "/v1/completions", {"prompt": prompt, "stream": True}):
                if not line.startswith("data: {"):
                    continue
                ev = json.loads(line[6:])
                if first is None and ev["choices"][0]["text"]:
                    first = time.perf_counter() - t
                if "usage" in ev:
                    tokens[0] += ev["usage"]["completion_tokens"]
            lat.append(time.perf_counter() - t)
            ttfd.append(first if first is not None else lat[-1])

    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            client = await stack.enter_async_context(_Client(kind, clients + 4))
            await client.get(url + "/health")  # open a connection before the clock starts
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return _row("fewstep serve (streaming)", clients, len(prompts), wall, lat, ttfd, tokens[0])


async def _interleaved(url, model, tok, settings, prompts, kind: str) -> tuple[dict, dict]:
    """Direct fewstep.generate and one streaming client, request by request in turn (the same load on the
    machine for both, so the HTTP overhead is not drowned by other processes' load changing over time)."""
    d_lat, s_lat, s_ttfd, d_tok, s_tok = [], [], [], 0, 0
    async with _Client(kind, 1) as client:  # one kept-alive connection, as a real client
        await client.get(url + "/health")
        for p in prompts:
            row = direct(model, tok, settings, [p])
            d_lat.append(row["seconds"])
            d_tok += round(row["output_tokens_per_s"] * row["seconds"])
            row = await _clients(url, [p], 1, client)
            s_lat.append(row["seconds"])
            s_ttfd.append(row["ttfd_p50_s"])
            s_tok += round(row["output_tokens_per_s"] * row["seconds"])
    n = len(prompts)
    return (_row("direct fewstep.generate", 1, n, sum(d_lat), d_lat, [], d_tok),
            _row("fewstep serve (streaming)", 1, n, sum(s_lat), s_lat, s_ttfd, s_tok))  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_model(which: str, levels: list[int], args) -> dict:
    import httpx

    model, tok, settings, prompts = build_model(which, args.layers, args.quick, args.cache, args.device, args.dtype)
    port = _free_port()
    cmd = [
        sys.executable,
        __file__,
        "--_serve",
        which,
        "--port",
        str(port),
        "--layers",
        str(args.layers),
        "--threads",
        str(args.threads),
        "--cache",
        args.cache,
        "--device",
        args.device,
    ]
    cmd += (["--quick"] if args.quick else []) + (["--dtype", args.dtype] if args.dtype else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        n_direct = args.requests_8b if which != "embedded" else args.requests
        warm = prompts[:2]
        direct(model, tok, settings, warm)
        asyncio.run(_clients(url, warm, 1, kind=args.client))
        load = os.getloadavg()[0]
        rows = list(asyncio.run(_interleaved(url, model, tok, settings, prompts[:n_direct], args.client)))
        for row in rows:
            print(json.dumps(row), flush=True)
        for c in levels[1:]:
            n = max(n_direct, c * (2 if which == "embedded" else 1))
            rows.append(asyncio.run(_clients(url, prompts[:n], c, kind=args.client)))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    base = rows[0]
    ceiling = forward_batching_gain(model) if which == "embedded" else None
    engine_gain = text_layer_batching_gain(model, tok, settings, prompts[:n_direct]) if which == "embedded" else None
    for r in rows[1:]:
        r["speedup_vs_direct"] = round(r["requests_per_s"] / base["requests_per_s"], 3)
        if r["clients"] == 1:
            r["latency_overhead_vs_direct"] = round(r["latency_p50_s"] / base["latency_p50_s"] - 1, 3)
    return {
        "model": which,
        "policy": str(settings.policy),
        "max_tokens": settings.max_tokens,
        "block_length": settings.block_length,
        "cache": settings.cache,
        "load_average_1min_at_start": round(load, 2),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "forward_batching_gain": ceiling,
        "text_layer_batching_gain": engine_gain,
        "rows": rows,
    }


def forward_batching_gain(model, tokens: int = 80, batch: int = 32) -> dict:
    """The ceiling batching can reach on this machine: one model forward of ``tokens`` columns, per row,
    alone and in a batch of ``batch`` (whatever the engine does, rows share at best this)."""
    import torch

    vocab = int(model.config.vocab_size)
    out = {}
    with torch.no_grad():
        for b in (1, batch):
            x = torch.randint(5, vocab, (b, tokens), generator=torch.Generator().manual_seed(0)).to(model.device)
            kw = {"start": tokens - 32, "end": tokens, "logits_start": tokens - 32, "logits_end": tokens}
            model.denoise(x, None, **kw)
            reps = max(3, 96 // b)
            t = time.perf_counter()
            for _ in range(reps):
                model.denoise(x, None, **kw)
            out[b] = (time.perf_counter() - t) / reps / b
    return {"tokens": tokens, "batch": batch, "ms_per_row_alone": round(out[1] * 1e3, 3),
            "ms_per_row_batched": round(out[batch] * 1e3, 3), "gain": round(out[1] / out[batch], 3)}  # fmt: skip


def text_layer_batching_gain(model, tok, settings, prompts: list[str], batch: int = 32) -> dict:
    """What the engine itself gains from batching here, with no HTTP: the same prompts through the text
    layer one at a time and ``batch`` at a time, in this process (the server cannot beat this ratio)."""
    from fewstep.decoding.text import TextGenerator

    gen = TextGenerator(model, tok, max_batch=batch)
    gen.generate(prompts[:2], settings)
    t = time.perf_counter()
    for p in prompts:
        gen.generate([p], settings)
    alone = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, len(prompts), batch):
        gen.generate(prompts[i : i + batch], settings)
    batched = time.perf_counter() - t
    return {"requests": len(prompts), "batch": batch, "requests_per_s_alone": round(len(prompts) / alone, 2),
            "requests_per_s_batched": round(len(prompts) / batched, 2), "gain": round(alone / batched, 3)}  # fmt: skip


# ---- the matched-compute setting (issue 27) ---------------------------------------------------------

MATCHED_POLICY, MATCHED_TOKENS, MATCHED_BLOCK, MATCHED_STEPS = "llada:steps=64", 64, 32, 64
PEER_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %}\n{% endif %}{% endfor %}"


def matched_settings():
    from fewstep.decoding.text import GenerationSettings

    return GenerationSettings(
        policy=MATCHED_POLICY, max_tokens=MATCHED_TOKENS, block_length=MATCHED_BLOCK, early_stop=False
    )


def pin(cpu: int | None) -> None:
    """Run this process (every thread it starts later too) on one core."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peer_main(args) -> int:
    """The peer's server process (run with the peer's Python): dlmserve's app, its model loader given
    fewstep's model and tokenizer (the same weights, the same network code)."""
    os.environ.setdefault("DLMSERVE_MODEL", "dparallel")
    os.environ.setdefault("DLMSERVE_MAX_BATCH", "32")  # fewstep serves 32 rows at once too
    os.environ.setdefault("DLMSERVE_DEVICE", "cpu")
    os.environ.setdefault("DLMSERVE_LOG_LEVEL", "warning")
    import torch

    torch.set_num_threads(args.threads)
    pin(args.pin)
    model, tok, _, _ = build_model("embedded", 1, False)
    tok.chat_template = PEER_TEMPLATE  # the embedded tokenizer has none: the user's text, as fewstep renders it
    import uvicorn
    from dlmserve import engine as peer_engine
    from dlmserve.models.llada import LoadedLLaDA

    def load_model(model_id: str, dtype: str = "bf16", device: str = "cpu"):
        return LoadedLLaDA(model=model, tokenizer=tok, device=model.device, dtype="bf16",
                           mask_id=int(model.config.mask_token_id))  # fmt: skip

    peer_engine.load_model = load_model
    from dlmserve.api.server import app

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


def peer_available(python: str | None) -> tuple[bool, str]:
    """(whether dlmserve imports with ``python``, why not)."""
    if not python:
        return False, "no --peer given (pip install dlmserve==0.1.1 in a scratch venv; --peer its python)"
    try:
        out = subprocess.run([python, "-c", "import dlmserve, dlmserve.api.server; print(dlmserve.__version__)"],
                             capture_output=True, text=True, timeout=300, env=_env())  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{python} does not run: {exc}"
    if out.returncode != 0:
        return False, f"dlmserve does not import with {python}: {out.stderr.strip().splitlines()[-1:]}"
    return True, f"dlmserve {out.stdout.strip()}"


def _env(src: str | None = None) -> dict:
    path = [str(Path(src) / "src") if src else str(ROOT / "src"), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}


def _start(cmd: list[str], url: str, src: str | None = None) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, env=_env(src))
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start: {' '.join(cmd)}")
        time.sleep(0.5)


async def _chat_clients(url: str, bodies: list[dict], clients: int) -> tuple[float, list[float], list[str]]:
    """``clients`` concurrent non-streaming chat clients over ``bodies``: (seconds, latencies, texts)."""
    import aiohttp

    queue: asyncio.Queue = asyncio.Queue()
    for i, b in enumerate(bodies):
        queue.put_nowait((i, b))
    texts: list[str] = [""] * len(bodies)
    lat: list[float] = []

    async def one(session) -> None:
        while not queue.empty():
            i, body = queue.get_nowait()
            t = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                data = await r.json(content_type=None)
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {data}")
            lat.append(time.perf_counter() - t)
            texts[i] = data["choices"][0]["message"]["content"]

    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=1800)) as session:
        async with session.get(url + "/health") as r:  # a connection open before the clock starts
            await r.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(session) for _ in range(clients)))
        return time.perf_counter() - t0, lat, texts


def _bodies(server: str, prompts: list[str]) -> list[dict]:
    if server == "fewstep":
        extra = {"model": "embedded", "policy": MATCHED_POLICY, "block_length": MATCHED_BLOCK}
    else:
        extra = {"model": "dparallel", "num_denoising_steps": MATCHED_STEPS, "block_length": MATCHED_BLOCK,
                 "temperature": 0.0, "seed": 0}  # fmt: skip
    return [{"messages": [{"role": "user", "content": p}], "max_tokens": MATCHED_TOKENS, **extra} for p in prompts]


class _Server:
    """A server process (fewstep or the peer) pinned to the servers' core, paused (SIGSTOP) between its
    bursts so that an idle server takes nothing from the one measured."""

    def __init__(self, kind: str, args, src: str | None = None):
        """``kind``: ``fewstep`` or ``peer``; ``src``: serve fewstep from this source tree (a baseline)."""
        self.kind = kind
        self.name = {"fewstep": "fewstep serve", "peer": "dlmserve 0.1.1"}[kind] + (" (baseline)" if src else "")
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        common = ["--port", str(port), "--threads", str(args.threads), "--pin", str(args.pin)]
        if kind == "fewstep":
            cmd = [sys.executable, __file__, "--_serve", "embedded", "--matched", *common]
        else:
            cmd = [args.peer, __file__, "--_peer_serve", *common]
        self.proc = _start(cmd, self.url, src)

    def signal(self, sig) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def close(self) -> None:
        self.signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def burst(self, prompts: list[str], clients: int) -> dict:
        self.signal(signal.SIGCONT)
        try:
            cpu = process_cpu(self.proc.pid)
            wall, lat, texts = asyncio.run(_chat_clients(self.url, _bodies(self.kind, prompts), clients))
            cpu = process_cpu(self.proc.pid) - cpu
        finally:
            self.signal(signal.SIGSTOP)
        return {"seconds": wall, "cpu": cpu, "latencies": lat, "texts": texts}


def _in_process_burst(layer: str, model, tok, prompts: list[str], batch: int) -> dict:
    """The same requests without HTTP, in this process: the engine alone (``Engine.run``, token ids in and out)
    or the text layer (``TextGenerator.generate``, text in and out), with ``max_batch`` = the concurrency."""
    from fewstep.decoding.engine import Engine, Request
    from fewstep.decoding.text import TextGenerator

    t, c = time.perf_counter(), time.process_time()
    if layer == "engine":
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        reqs = [Request(p, policy=MATCHED_POLICY, gen_length=MATCHED_TOKENS, block_length=MATCHED_BLOCK,
                        early_stop=False) for p in ids]  # fmt: skip
        Engine(model, max_batch=batch).run(reqs)
    else:
        TextGenerator(model, tok, max_batch=batch).generate(prompts, matched_settings())
    return {"seconds": time.perf_counter() - t, "cpu": time.process_time() - c, "latencies": [], "texts": None}


def _burst_size(clients: int, base: int) -> int:
    """Requests per burst: at least ``base`` and two waves of the clients."""
    return max(base, 2 * clients)


def matched_runs(model, tok, prompts: list[str], levels: list[int], servers: list[_Server], args) -> dict:
    """Every runner (each server, the in-process engine and text layer) at every level, in short bursts
    interleaved over ``args.repeats`` rounds (the order reversed every other round): a shared machine's
    changing load hits every runner and level alike. Returns ``{(runner, clients): [burst, ...]}``."""
    client_cpu = args.client_pin if args.client_pin is not None else (1 if (os.cpu_count() or 1) > 1 else None)
    runners = [(s.name, s) for s in servers] + [("in-process engine (no HTTP)", "engine"),
                                                ("in-process text layer (no HTTP)", "text layer")]  # fmt: skip
    out: dict[tuple[str, int], list[dict]] = {}
    cursor = 0
    for rep in range(args.repeats):
        order = [(c, r) for c in levels for r in runners]
        for c, (name, runner) in order if rep % 2 == 0 else order[::-1]:
            n = _burst_size(c, args.burst)
            batch = [prompts[(cursor + i) % len(prompts)] for i in range(n)]
            cursor += n
            if isinstance(runner, _Server):
                pin(client_cpu)
                res = runner.burst(batch, c)
            else:
                pin(args.pin)
                res = _in_process_burst(runner, model, tok, batch, c)
            res["prompts"] = batch
            out.setdefault((name, c), []).append(res)
            print(json.dumps({"runner": name, "clients": c, "requests": n, "seconds": round(res["seconds"], 3),
                              "cpu_s_per_request": round(res["cpu"] / n, 4)}), flush=True)  # fmt: skip
    return out


def _summary(name: str, clients: int, bursts: list[dict], reference: dict[str, str] | None) -> dict:
    n = sum(len(b["prompts"]) for b in bursts)
    wall, cpu = sum(b["seconds"] for b in bursts), sum(b["cpu"] for b in bursts)
    lat = [x for b in bursts for x in b["latencies"]]
    row = {"server": name, "clients": clients, "requests": n, "seconds": round(wall, 3),
           "requests_per_s": round(n / wall, 3), "cpu_s_per_request": round(cpu / n, 4),
           "requests_per_s_bursts": [round(len(b["prompts"]) / b["seconds"], 3) for b in bursts],
           "cpu_s_per_request_bursts": [round(b["cpu"] / len(b["prompts"]), 4) for b in bursts]}  # fmt: skip
    if lat:
        row["latency_p50_s"], row["latency_p99_s"] = round(_pct(lat, 0.5), 4), round(_pct(lat, 0.99), 4)
    if reference is not None:
        pairs = [(t, reference[p]) for b in bursts for t, p in zip(b["texts"], b["prompts"])]
        row["answers_equal_alone"] = round(sum(t.strip() == x.strip() for t, x in pairs) / len(pairs), 4)
    return row


def _reference_texts(model, tok, prompts: list[str]) -> tuple[list[str], list[str]]:
    """Each prompt's answer decoded alone with fewstep.generate: the whole answer with special tokens skipped
    (what the peer returns) and the answer cut at the first EOS (what fewstep returns)."""
    import fewstep

    full, cut = [], []
    stops = {int(model.config.eos_token_id)}
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        ans = fewstep.generate(model, [ids], MATCHED_POLICY, gen_length=MATCHED_TOKENS, block_length=MATCHED_BLOCK,
                               tokenizer=tok).answers[0].tolist()  # fmt: skip
        full.append(tok.decode(ans, skip_special_tokens=True))
        end = next((i for i, t in enumerate(ans) if t in stops), len(ans))
        cut.append(tok.decode(ans[:end], skip_special_tokens=True))
    return full, cut


def matched_main(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    levels = [int(c) for c in (args.clients or "1,8,32").split(",")]
    model, tok, _, _ = build_model("embedded", 1, False)
    from fewstep.tasks import arith

    prompts = [p.prompt for p in arith.generate("test", args.requests, seed=0)]
    ok, why = peer_available(args.peer)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    pin(args.pin)
    full, cut = _reference_texts(model, tok, prompts)  # each prompt alone (and a warm-up)
    servers = []
    try:
        kinds = [("fewstep", None)] + ([("fewstep", args.baseline_src)] if args.baseline_src else [])
        for kind, src in kinds + ([("peer", None)] if ok else []):
            servers.append(_Server(kind, args, src))
            servers[-1].burst(prompts[:2], 1)  # warm-up, then paused
        bursts = matched_runs(model, tok, prompts, levels, servers, args)
    finally:
        for s in servers:
            s.close()
    names = ["fewstep serve", "fewstep serve (baseline)", "dlmserve 0.1.1"]
    refs = dict(zip(names, [dict(zip(prompts, cut))] * 2 + [dict(zip(prompts, full))]))
    rows = [_summary(name, c, b, refs.get(name)) for (name, c), b in bursts.items()]
    rows.sort(key=lambda r: (names.index(r["server"]) if r["server"] in names else 3, r["server"], r["clients"]))
    for r in rows:
        base = next(b for b in rows if b["server"] == r["server"] and b["clients"] == levels[0])
        r["speedup_vs_1"] = round(r["requests_per_s"] / base["requests_per_s"], 3)
        r["cpu_gain_vs_1"] = round(base["cpu_s_per_request"] / r["cpu_s_per_request"], 3)
    result = {
        "setting": {"model": "dparallel (shipped student, LLaDA format, float32)", "prompts": len(prompts),
                    "policy": MATCHED_POLICY, "max_tokens": MATCHED_TOKENS, "block_length": MATCHED_BLOCK,
                    "early_stop": False, "requests": "non-streaming chat completions", "server_core": args.pin,
                    "threads": args.threads, "max_batch": 32, "repeats": args.repeats,
                    "burst": f"max({args.burst}, 2 x clients) requests per runner and level, interleaved"},
        "host": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count()},
        "peer": {"ran": ok, "reason" if not ok else "version": why},
        "baseline": args.baseline_label if args.baseline_src else None,
        "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    result["target"] = matched_target(rows, levels)
    out = Path(args.out if args.out != DEFAULT_OUT else ROOT / "benchmarks" / "results" / "serve_matched.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(matched_markdown(result))
    print(f"\nwritten to {out}")
    return 0


def matched_target(rows: list[dict], levels: list[int]) -> dict:
    """Issue 27's target: at the most clients at least 2.6x the one-client requests/s, and at every level at
    least the peer's requests/s where both ran."""
    few = {r["clients"]: r for r in rows if r["server"] == "fewstep serve"}
    peer = {r["clients"]: r for r in rows if r["server"].startswith("dlmserve")}
    top = levels[-1]
    out = {"speedup_at_max_clients": few[top]["speedup_vs_1"], "cpu_gain_at_max_clients": few[top]["cpu_gain_vs_1"],
           "speedup_met": few[top]["speedup_vs_1"] >= 2.6}  # fmt: skip
    if peer:
        out["vs_peer_requests_per_s"] = {c: round(few[c]["requests_per_s"] / peer[c]["requests_per_s"], 3) for c in few}
        out["vs_peer_cpu_per_request"] = {
            c: round(peer[c]["cpu_s_per_request"] / few[c]["cpu_s_per_request"], 3) for c in few
        }
        out["at_least_peer"] = all(v >= 1 for v in out["vs_peer_requests_per_s"].values())
    base = {r["clients"]: r for r in rows if r["server"] == "fewstep serve (baseline)"}
    if base:
        out["vs_baseline_requests_per_s"] = {
            c: round(few[c]["requests_per_s"] / base[c]["requests_per_s"], 3) for c in few
        }
        out["vs_baseline_cpu_per_request"] = {
            c: round(base[c]["cpu_s_per_request"] / few[c]["cpu_s_per_request"], 3) for c in few
        }
    return out


def matched_markdown(result: dict) -> str:
    st = result["setting"]
    lines = [f"\n**matched compute** ({st['policy']}, {st['max_tokens']} tokens in blocks of {st['block_length']}, no early "
             f"stop, {st['prompts']} prompts, server on core {st['server_core']}, {st['threads']} thread; 1-min load "
             f"{result['load_average_1min'][0]} -> {result['load_average_1min'][1]}; {st['repeats']} interleaved rounds of bursts; "
             f"peer: {result['peer'].get('version') or 'skipped: ' + result['peer']['reason']}; "
             f"baseline: {result.get('baseline') or 'none'})\n",
             "| server | clients | req/s | vs 1 client | CPU s/request | CPU gain vs 1 | latency p50 | same answers |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        same = f"{r['answers_equal_alone'] * 100:.0f} %" if "answers_equal_alone" in r else "–"
        p50 = f"{r['latency_p50_s'] * 1000:.0f} ms" if "latency_p50_s" in r else "–"
        lines.append(f"| {r['server']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['speedup_vs_1']:.2f}x | "
                     f"{r['cpu_s_per_request']:.3f} | {r['cpu_gain_vs_1']:.2f}x | {p50} | {same} |")  # fmt: skip
    lines.append(f"\ntarget: {json.dumps(result['target'])}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    lines = []
    for m in result["models"]:
        lines.append(f"\n**{m['model']}** (policy `{m['policy']}`, cache {m.get('cache', 'none')}, {m['max_tokens']} tokens; 1-min load average "
                     f"{m.get('load_average_1min_at_start')} -> {m.get('load_average_1min_at_end')})\n")  # fmt: skip
        if m.get("forward_batching_gain"):
            g = m["forward_batching_gain"]
            lines.append(f"one forward per row: {g['ms_per_row_alone']} ms alone, {g['ms_per_row_batched']} ms in a "
                         f"batch of {g['batch']} (batching gain {g['gain']}x)\n")  # fmt: skip
        if m.get("text_layer_batching_gain"):
            g = m["text_layer_batching_gain"]
            lines.append(f"the engine without HTTP: {g['requests_per_s_alone']} req/s one at a time, "
                         f"{g['requests_per_s_batched']} req/s {g['batch']} at a time (gain {g['gain']}x)\n")  # fmt: skip
        lines.append("| mode | clients | req/s | output tok/s | TTFD p50 | latency p50 | latency p99 | vs direct |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in m["rows"]:
            ttfd = f"{r['ttfd_p50_s'] * 1000:.0f} ms" if r["ttfd_p50_s"] is not None else "–"
            vs = f"{r['speedup_vs_direct']:.2f}x" if "speedup_vs_direct" in r else "1.00x"
            if "latency_overhead_vs_direct" in r:
                vs += f" (latency {r['latency_overhead_vs_direct'] * 100:+.0f} %)"
            lines.append(
                f"| {r['mode']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} "
                f"| {ttfd} | {r['latency_p50_s'] * 1000:.0f} ms | {r['latency_p99_s'] * 1000:.0f} ms | {vs} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="embedded,8b-shaped", help="comma-separated: embedded, 8b-shaped")
    p.add_argument("--requests", type=int, default=64, help="embedded: requests per level (at least 2 per client)")
    p.add_argument("--requests-8b", type=int, default=8, help="8b-shaped: requests per level")
    p.add_argument("--layers", type=int, default=1, help="layers of the 8B-shaped model (LLaDA-8B has 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and the direct run")
    p.add_argument("--cache", choices=["none", "prefix", "dual"], default="none",
                   help="KV cache mode of both the server and the direct run")  # fmt: skip
    p.add_argument("--device", default="cpu", help="where the server and the direct run put the model (cpu, cuda)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: the model's own, float32)")  # fmt: skip
    p.add_argument("--clients", default=None,
                   help="comma-separated concurrency levels, 1 first (default: 1,8,32 embedded, 1,8 8b-shaped)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp", help="the clients' HTTP library")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--matched", action="store_true",
                   help="issue 27's matched-compute setting against the peer (serve_matched.json; see above)")  # fmt: skip
    p.add_argument("--peer", default=None, metavar="PYTHON",
                   help="--matched: a Python with dlmserve 0.1.1 installed, to serve the same model side by side")  # fmt: skip
    p.add_argument(
        "--pin", type=int, default=0, help="--matched: the core every server (and the in-process rows) runs on"
    )
    p.add_argument("--client-pin", type=int, default=None, help="--matched: the clients' core (default 1)")
    p.add_argument("--baseline-src", default=None, metavar="DIR",
                   help="--matched: also serve fewstep from this source tree (e.g. `git archive` of an older commit)")  # fmt: skip
    p.add_argument("--baseline-label", default="baseline", help="--matched: what --baseline-src is (recorded)")
    p.add_argument(
        "--repeats", type=int, default=4, help="--matched: interleaved rounds of bursts (order reversed every other)"
    )
    p.add_argument(
        "--burst", type=int, default=16, help="--matched: requests per burst (at least two waves of clients)"
    )
    p.add_argument("--report", metavar="JSON", help="print the markdown table of a results file and exit")
    p.add_argument("--_serve", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_peer_serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.report:
        result = json.loads(Path(args.report).read_text())
        print(matched_markdown(result) if "setting" in result else markdown(result))
        return 0
    if args._serve:
        return serve_main(args)
    if args._peer_serve:
        return peer_main(args)
    if args.matched:
        return matched_main(args)
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.requests, args.requests_8b = 8, 2
    result = {
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                 "cpu_count": os.cpu_count(), "device": args.device, "dtype": args.dtype or "float32"},
        "engine": "decoding.engine: continuous batching (max_batch 32)", "client": args.client,
        "quick": args.quick, "models": [],
    }  # fmt: skip
    t0 = time.perf_counter()
    for which in [m.strip() for m in args.models.split(",") if m.strip()]:
        levels = [1, 8, 32] if which == "embedded" else [1, 8]
        if args.clients:
            levels = [int(c) for c in args.clients.split(",") if c.strip()]
            if not levels or levels[0] != 1:
                p.error("--clients must start with 1 (the one-client run is compared with the direct run)")
        result["models"].append(bench_model(which, levels, args))
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
