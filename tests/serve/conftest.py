"""A real uvicorn server on a free local port, serving the shipped ``dparallel`` student in-process."""

from __future__ import annotations

import pytest

import fewstep
from fewstep.assets import resolve_model
from fewstep.decoding.text import Settings, TextGenerator
from fewstep.serve import ServeConfig, create_app, start_in_thread

POLICY = "entropy:0.45"  # the model card's recommendation
GEN, BLOCK = 64, 32


@pytest.fixture(scope="session")
def loaded():
    d = resolve_model("dparallel")
    return fewstep.load_model(d), fewstep.load_tokenizer(d)


class Served:
    def __init__(self, gen: TextGenerator, cfg: ServeConfig):
        self.gen, self.cfg = gen, cfg
        self.server, self.thread, self.port = start_in_thread(create_app(gen, cfg))
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(model, tok, **cfg) -> Served:
    defaults = Settings(policy=POLICY, max_tokens=GEN, block_length=BLOCK)
    gen = TextGenerator(model, tok, max_batch=cfg.get("max_batch", 32))
    return Served(gen, ServeConfig(model_name="dparallel", defaults=defaults, **cfg))


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
