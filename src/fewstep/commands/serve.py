"""`fewstep serve`: an OpenAI-compatible server (completions, chat, SSE streaming) and the live denoising page."""

from __future__ import annotations

import argparse
import os

from fewstep.commands import EOS_FILL_HELP, SHIPPED_HELP, resolve_model

EPILOG = """\
endpoints: GET / (live denoising page), GET /health, GET /v1/models, POST /v1/completions,
POST /v1/chat/completions. fewstep's knobs are extra body fields: policy, threshold, cache,
block_length, max_nfe, stream_mode ("text" or "denoise"). See docs/serving.md.

examples:
  fewstep serve                                   # the shipped dparallel student, its recommended policy
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
        help="default unmasking policy (default: the one the model card recommends, else threshold:0.9)",
    )
    parser.add_argument("--cache", default="none", choices=["none", "prefix", "dual"], help="default KV cache mode")
    parser.add_argument(
        "--gen-length",
        type=int,
        default=None,
        help="default max_tokens, the answer canvas (default: the model card's, else 128)",
    )
    parser.add_argument(
        "--block-length",
        type=int,
        default=None,
        help="default semi-autoregressive block length (default: 32, at most the answer length; a "
        "block-diffusion model's own block size)",
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


def build(args: argparse.Namespace):
    """Load the model and build the app (separate from :func:`run` so tests can serve it in-process)."""
    import torch

    import fewstep
    from fewstep.decoding.text import GenerationSettings, TextGenerator
    from fewstep.serve import ServeConfig, card_defaults, create_app

    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError("--max-batch must be >= 1 and --max-queue >= 0")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535; got {args.port}")
    model_dir = resolve_model(args.model)
    card = card_defaults(model_dir)
    settings = GenerationSettings(
        policy=args.policy or card.get("policy", "threshold:0.9"),
        max_tokens=args.gen_length or card.get("gen_length", 128),
        block_length=args.block_length or card.get("block_length"),
        cache=args.cache,
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
        api_key=args.api_key or None,
    )
    return create_app(gen, cfg), cfg


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    import socket

    from fewstep.serve import run as serve

    with socket.socket() as sock:  # a taken port fails before the model loads
        try:
            sock.bind((args.host, args.port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    app, cfg = build(args)
    d = cfg.defaults
    print(f"fewstep serve: {cfg.model_name} · policy {d.policy} · max_tokens {d.max_tokens} · cache {d.cache}")
    print(f"fewstep serve: http://{args.host}:{args.port}/ (page) · http://{args.host}:{args.port}/v1 (OpenAI API)")
    serve(app, args.host, args.port)
    return 0
