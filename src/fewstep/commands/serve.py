"""`fewstep serve`: an OpenAI-compatible server (completions, chat, SSE streaming) and the live denoising page."""

from __future__ import annotations

import argparse
import os

from fewstep.assets import SHIPPED_HELP, resolve_model
from fewstep.commands import EOS_FILL_HELP

#: What an unset decoding flag means when the model folder has no recommended decoding (decoding.json).
FALLBACK = {"policy": "threshold:0.9", "gen_length": 128, "block_length": None, "cache": "none", "early_stop": True}

EPILOG = """\
endpoints: GET / (live denoising page), GET /health (liveness), GET /ready (readiness), GET /metrics
(Prometheus), GET /openapi.json, GET /v1/models, POST /v1/completions, POST /v1/chat/completions.
fewstep's knobs are extra body fields: policy, threshold, cache, block_length, max_nfe, stream_mode
("text" or "denoise"). SIGTERM or Ctrl+C drains (new requests 503, in-flight ones get --drain-timeout
seconds) and exits 0; a second signal exits at once. See docs/serving.md.

examples:
  fewstep serve                                   # the shipped dparallel student, its decoding.json
  fewstep serve --model /models/LLaDA-8B-Instruct --policy threshold:0.9 --cache dual --gen-length 256 \\
      --device cuda:0 --port 8000
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "3 + 4 - 2 + 8 - 1 ?", "max_tokens": 64}'
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fewstep serve``."""
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default="dparallel", metavar="PATH", help=f"{SHIPPED_HELP} (default: dparallel)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--policy",
        default=None,
        metavar="NAME[:ARGS]",
        help="default unmasking policy (default: the model's decoding.json, else threshold:0.9)",
    )
    parser.add_argument(
        "--cache",
        default=None,
        choices=["none", "prefix", "dual"],
        help="default KV cache mode (default: the model's decoding.json, else none)",
    )
    parser.add_argument(
        "--gen-length",
        type=int,
        default=None,
        help="default max_tokens, the answer canvas (default: the model's decoding.json, else 128)",
    )
    parser.add_argument(
        "--block-length",
        type=int,
        default=None,
        help="default semi-autoregressive block length (default: the model's decoding.json, else 32, at most "
        "the answer length; a block-diffusion model's own block size)",
    )
    parser.add_argument(
        "--eos-fill",
        action="store_true",
        help=EOS_FILL_HELP + " (the default of the requests' eos_fill field)",
    )
    parser.add_argument("--max-batch", type=int, default=32, help="rows decoded together (default: 32)")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests waiting beyond the running set; more get 429 at once (default: 256)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("FEWSTEP_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $FEWSTEP_API_KEY, else no key)",
    )
    _add_robustness(parser)


def _add_robustness(parser: argparse.ArgumentParser) -> None:
    """Flags for the edge, connection deadlines, health and shutdown."""
    g = parser.add_argument_group("limits, health and shutdown")
    g.add_argument(
        "--allowed-hosts",
        default=None,
        metavar="NAMES",
        help="Host header names accepted, comma-separated ('*.example.com' a domain's, '*' any) (default: "
        "without --api-key, the bound address and, on a loopback address, localhost/127.0.0.1/::1; any "
        "when bound to every interface or with --api-key)",
    )
    g.add_argument(
        "--max-prompt-chars",
        type=int,
        default=None,
        metavar="N",
        help="characters in one prompt (or one chat's messages), refused with 400 before tokenising; 0: no "
        "cap (default: 16 per token of the model's context)",
    )
    g.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=5.0,
        metavar="S",
        help="close a connection idle this long, before its first request or between requests (default: 5)",
    )
    g.add_argument(
        "--timeout-read",
        type=float,
        default=30.0,
        metavar="S",
        help="close a connection whose request (head and body) has not arrived this long after its first "
        "byte, with 408 when its head is incomplete (default: 30)",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="on SIGTERM/SIGINT, how long requests in flight may run on before they end with an error event "
        "(default: 5)",
    )
    g.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="/health and /ready answer 503 when requests are pending and no engine round has finished for "
        "this long (default: 60)",
    )


def _check_limits(args: argparse.Namespace) -> None:
    for flag in ("timeout_keep_alive", "timeout_read", "drain_timeout", "stall_timeout"):
        value = getattr(args, flag)
        if not value > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0 seconds; got {value}")
    if args.max_prompt_chars is not None and args.max_prompt_chars < 0:
        raise ValueError(f"--max-prompt-chars must be >= 0; got {args.max_prompt_chars}")


def build(args: argparse.Namespace):
    """Load the model and build the app (separate from :func:`run` so tests can serve it in-process)."""
    import torch

    import fewstep
    from fewstep.decoding.text import GenerationSettings, TextGenerator
    from fewstep.models.saving import recommended
    from fewstep.serve import ServeConfig, create_app
    from fewstep.serve.guards import default_allowed_hosts, parse_allowed_hosts

    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError("--max-batch must be >= 1 and --max-queue >= 0")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535; got {args.port}")
    _check_limits(args)
    key = args.api_key or None
    hosts = parse_allowed_hosts(args.allowed_hosts) if args.allowed_hosts else default_allowed_hosts(args.host, key)
    model_dir = resolve_model(args.model)
    d = recommended(model_dir, vars(args), FALLBACK)
    settings = GenerationSettings(
        policy=d["policy"],
        max_tokens=d["gen_length"],
        block_length=d["block_length"],
        cache=d["cache"],
        early_stop=d["early_stop"],
        eos_fill=args.eos_fill,
    )
    from fewstep.decoding.text import resolve_policy

    resolve_policy(settings)  # a bad --policy fails before the model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    model = fewstep.load_model(model_dir, dtype=dtype, device=device)
    tokenizer = fewstep.load_tokenizer(model_dir)
    gen = TextGenerator(model, tokenizer, max_batch=args.max_batch)
    gen.request([0], settings)  # the default settings fit the model (a one-token prompt)
    cfg = ServeConfig(
        model_name=args.model,
        defaults=settings,
        aliases={str(model_dir), model_dir.name},
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_key=key,
        max_prompt_chars=args.max_prompt_chars,
        allowed_hosts=hosts,
        stall_timeout=args.stall_timeout,
    )
    return create_app(gen, cfg), cfg


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until SIGTERM / SIGINT drain and stop it (exit status 0)."""
    import socket

    from fewstep.serve import ServerLimits
    from fewstep.serve import run as serve

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.socket(family) as sock:  # a taken port fails before the model loads
        try:
            sock.bind((args.host, args.port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    app, cfg = build(args)
    d = cfg.defaults
    print(f"fewstep serve: {cfg.model_name} · policy {d.policy} · max_tokens {d.max_tokens} · cache {d.cache}")
    print(f"fewstep serve: http://{args.host}:{args.port}/ (page) · http://{args.host}:{args.port}/v1 (OpenAI API)")
    hosts = ", ".join(cfg.hosts())
    print(f"fewstep serve: API key {'required' if cfg.api_key else 'not set'} · Host names accepted: {hosts}")
    limits = ServerLimits(args.timeout_keep_alive, args.timeout_read, args.drain_timeout)
    serve(app, args.host, args.port, limits=limits)
    return 0
