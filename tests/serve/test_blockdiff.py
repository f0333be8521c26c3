"""`fewstep serve` on the block-diffusion families (LLaDA2-MoE, SDAR fixtures): the official ``openai``
client, concurrent requests with mixed policies, streaming and not, each answer what it gets alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import fewstep
from fewstep.decoding.text import GenerationSettings, TextGenerator
from fewstep.serve import ServeConfig
from fewstep.tasks import arith
from tests.parity.fixtures import BLOCK_DIRS, model
from tests.serve.conftest import Served, reference

TOKENIZER = fewstep.assets.resolve_model("dparallel")  # its words are inside both fixtures' vocabularies
PROMPTS = [p.prompt for p in arith.generate_problems("test", 6, seed=3)]
GEN = 24  # not a multiple of the fixtures' block length: the last block is cut, as the official samplers do


@pytest.fixture(scope="module", params=BLOCK_DIRS, ids=lambda d: d.name)
def block_server(request):
    m, tok = model(request.param), fewstep.load_tokenizer(TOKENIZER)
    policy = "llada2" if "llada2" in request.param.name else "sdar"
    defaults = GenerationSettings(policy=policy, max_tokens=GEN, block_length=None, cache="prefix")
    served = Served(TextGenerator(m, tok, max_batch=8), ServeConfig(model_name="block", defaults=defaults))
    yield served, m, tok, policy
    served.close()


def test_concurrent_requests_get_what_they_get_alone(block_server):
    served, m, tok, default = block_server
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    jobs = [(p, pol, stream) for p in PROMPTS for pol, stream in ((default, False), ("threshold:0.5", True))]

    def ask(job):
        prompt, policy, stream = job
        body = {"policy": policy}
        if not stream:
            r = client.completions.create(model="block", prompt=prompt, max_tokens=GEN, extra_body=body)
            return r.choices[0].text, r.usage.nfe
        chunks = list(client.completions.create(model="block", prompt=prompt, max_tokens=GEN, stream=True,
                                                extra_body=body, stream_options={"include_usage": True}))  # fmt: skip
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return text, next(c.usage.nfe for c in chunks if c.usage is not None)

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    for (prompt, policy, _), answer in zip(jobs, got):
        assert answer == reference(m, tok, prompt, policy, gen_length=GEN, block_length=None, cache="prefix")
    assert served.gen.active() == 0
