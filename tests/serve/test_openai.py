"""The official ``openai`` client against a real server: completions and chat, streaming and not."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import fewstep
from fewstep.tasks import arith
from tests.serve.conftest import GEN, POLICY, reference

PROBLEMS = [p.prompt for p in arith.generate_problems("test", 3, seed=0)]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["dparallel"]
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["fewstep"]["policy"] == POLICY and card["fewstep"]["max_tokens"] == GEN
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("policy", [POLICY, "llada:steps=16"])
def test_completion_is_fewstep_generate(server, client, loaded, policy):
    model, tok = loaded
    for prompt in PROBLEMS:
        r = client.completions.create(model="dparallel", prompt=prompt, max_tokens=GEN, extra_body={"policy": policy})
        text, nfe = reference(model, tok, prompt, policy)
        assert r.choices[0].text == text
        assert r.choices[0].finish_reason == "stop"  # the answer ends with EOS before 64 tokens
        assert r.usage.nfe == nfe and r.usage.prompt_tokens == len(tok(prompt)["input_ids"])
        assert r.usage.completion_tokens == len(tok(text)["input_ids"])
        assert r.usage.tokens_per_forward == pytest.approx(32 / nfe if policy == POLICY else 4.0, abs=32)
        assert r.usage.tokens_per_forward > 1
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_completion_concatenates_to_the_answer(client, loaded):
    model, tok = loaded
    prompt = PROBLEMS[0]
    text, nfe = reference(model, tok, prompt, "llada:steps=64")  # one token per step: many deltas
    chunks = list(
        client.completions.create(
            model="dparallel", prompt=prompt, max_tokens=GEN, stream=True, extra_body={"policy": "llada:steps=64"}
        )
    )
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.nfe == nfe
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stop_strings_are_held_back_and_cut(client, loaded):
    model, tok = loaded
    prompt = PROBLEMS[1]
    full, _ = reference(model, tok, prompt)
    stop = full.split()[6]  # a word from the middle of the answer
    want, _ = reference(model, tok, prompt, stop=(stop, "never there"))
    assert want != full and stop not in want
    r = client.completions.create(model="dparallel", prompt=prompt, max_tokens=GEN, stop=[stop, "never there"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="dparallel",
            prompt=prompt,
            max_tokens=GEN,
            stop=[stop, "never there"],
            stream=True,
            extra_body={"policy": "llada:steps=64"},
        )
    )
    assert streamed == reference(model, tok, prompt, "llada:steps=64", stop=(stop, "never there"))[0]


def test_chat_completions(client, loaded):
    model, tok = loaded
    prompt = PROBLEMS[2]
    text, nfe = reference(model, tok, prompt)  # no chat template: the message is the raw prompt
    r = client.chat.completions.create(model="dparallel", messages=[{"role": "user", "content": prompt}])
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.usage.nfe == nfe and r.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model="dparallel",
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.nfe == nfe


def test_seeded_sampling_and_list_prompts(client, loaded):
    model, tok = loaded
    policy = "threshold:0.9,temperature=0"
    r = client.completions.create(
        model="dparallel", prompt=PROBLEMS, max_tokens=32, seed=7, temperature=1.0, extra_body={"policy": policy}
    )
    for prompt, choice in zip(PROBLEMS, sorted(r.choices, key=lambda c: c.index)):
        want, _ = reference(model, tok, prompt, "threshold:0.9,temperature=1.0", gen_length=32, seed=7)
        assert choice.text == want
    again = client.completions.create(
        model="dparallel", prompt=PROBLEMS[0], max_tokens=32, seed=7, temperature=1.0, extra_body={"policy": policy}
    )
    assert again.choices[0].text == r.choices[0].text  # same seed, same sample, whatever shared the batch


def test_denoise_stream(server, loaded):
    model, tok = loaded
    prompt = PROBLEMS[0]
    text, nfe = reference(model, tok, prompt, "llada:steps=64")
    body = {"prompt": prompt, "stream": True, "stream_mode": "denoise", "policy": "llada:steps=64"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    steps = [e for e in events if e["object"] == "fewstep.denoise.step"]
    assert [e["nfe"] for e in steps] == list(range(1, nfe + 1))
    assert all(sum(t is not None for t in e["tokens"]) == e["nfe"] for e in steps[:-1])  # one token per step
    assert all(sum(s > 0 for s in e["steps"]) == e["nfe"] and len(e["committed"]) == 1 for e in steps)
    # the last canvas: every position committed at some step, or filled with EOS by early stop
    eos = fewstep.decoding.stop_ids(model, tok)
    assert all((s > 0) or (t in eos) for t, s in zip(steps[-1]["tokens"], steps[-1]["steps"]))
    assert steps[-1]["pieces"][steps[-1]["tokens"].index(tok("=")["input_ids"][0])] == "="
    assert events[-1]["object"] == "fewstep.denoise.done" and events[-1]["text"] == text
    assert events[-1]["nfe"] == nfe


def test_multiblock_with_eos_fill_is_fewstep_generate(client, server, loaded):
    """d3LLM's decoding through the API: ``policy`` multiblock and the ``eos_fill`` field give the answer and
    NFE of ``fewstep.generate``; ``usage`` reports tokens per forward (before the EOS) beside positions."""
    model, tok = loaded
    eos = set(fewstep.decoding.stop_ids(model, tok))
    for prompt in PROBLEMS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        kw = {"gen_length": GEN, "block_length": 32, "tokenizer": tok, "early_stop": True, "eos_fill": True}
        ref = fewstep.generate(model, [ids], "multiblock", **kw)
        answer = ref.answers[0].tolist()
        cut = next(i for i, t in enumerate(answer) if t in eos)
        r = client.completions.create(
            model="dparallel", prompt=prompt, max_tokens=GEN, extra_body={"policy": "multiblock", "eos_fill": True}
        )
        assert r.choices[0].text == tok.decode(answer[:cut], skip_special_tokens=True)
        alone = fewstep.generate(model, [ids], "multiblock", **{**kw, "eos_fill": False})
        assert r.usage.nfe == int(ref.nfe[0]) <= int(alone.nfe[0])  # never later than the block-level stop
        assert r.usage.tokens_per_forward == pytest.approx(cut / int(ref.nfe[0]), abs=1e-4)
        assert r.usage.positions_per_forward == pytest.approx(float(ref.positions_per_forward[0]), abs=1e-4)
    bad = httpx.post(server.url + "/v1/completions", json={"prompt": PROBLEMS[0], "eos_fill": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "eos_fill"
