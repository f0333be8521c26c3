"""The one validation path (:mod:`fewstep.decoding.request`): every field's type and range, the field named
at fault, messages restated in a caller's names, and the two parallelism figures (:mod:`fewstep.decoding.metrics`)."""

from __future__ import annotations

import pytest

from fewstep.decoding import metrics
from fewstep.decoding.engine import Engine, Quirks, Request, RequestError
from fewstep.decoding.policies import ConfidenceThresholdPolicy, parse_policy
from fewstep.decoding.request import MAX_COUNT, MAX_SEED
from fewstep.decoding.text import TEXT_NAMES
from tests.parity.fixtures import BLOCK_DIRS, DEFAULT_DIRS, model

LLADA = DEFAULT_DIRS[0]
P = [5, 17, 42, 8]

BAD = [
    # (request fields, field at fault, message part)
    ({"gen_length": 0}, "gen_length", "gen_length must be an integer >= 1; got 0"),
    ({"gen_length": "8"}, "gen_length", "gen_length must be an integer; got '8'"),
    ({"gen_length": True}, "gen_length", "gen_length must be an integer; got True"),
    ({"gen_length": 10**30}, "gen_length", "exceeds the model's context"),
    ({"gen_length": 16, "block_length": 0}, "block_length", "block_length must be in [1, gen_length=16]; got 0"),
    ({"gen_length": 16, "block_length": 2.0}, "block_length", "block_length must be an integer; got 2.0"),
    ({"gen_length": 16, "block_length": 6}, "block_length", "gen_length (16) must be a multiple of block_length (6)"),
    ({"cache": "triple"}, "cache", "cache must be one of none, prefix, dual; got 'triple'"),
    ({"seed": 2**64}, "seed", "seed must be an integer <= 18446744073709551615"),
    ({"seed": -1}, "seed", "seed must be an integer >= 0; got -1"),
    ({"seed": 1.5}, "seed", "seed must be an integer; got 1.5"),
    ({"cfg_scale": float("nan")}, "cfg_scale", "cfg_scale must be a finite number; got nan"),
    ({"cfg_scale": float("inf")}, "cfg_scale", "cfg_scale must be a finite number"),
    ({"cfg_scale": 1e9}, "cfg_scale", "cfg_scale must be <= 100.0"),
    ({"max_nfe": 0}, "max_nfe", "max_nfe must be an integer >= 1; got 0"),
    ({"max_nfe": 2**31}, "max_nfe", f"max_nfe must be an integer <= {MAX_COUNT}"),
    ({"max_steps_per_block": 0}, "max_steps_per_block", "max_steps_per_block must be an integer >= 1"),
    ({"mask_id": 10**6}, "mask_id", "mask_id must be in [0, 511]"),
    ({"eos_ids": [2, 512]}, "eos_ids", "eos_ids must be at most 256 token ids in [0, 511]"),
    ({"eos_ids": list(range(300))}, "eos_ids", "eos_ids must be at most 256 token ids"),
    ({"eos_ids": "2"}, "eos_ids", "eos_ids must be at most 256 token ids"),
    ({"early_stop": "yes"}, "early_stop", "early_stop must be true or false; got 'yes'"),
    ({"eos_early_stop": 1}, "eos_early_stop", "eos_early_stop must be true or false"),
    ({"quirks": {"mask_prediction": True}}, "quirks", "quirks must be a Quirks instance"),
    ({"quirks": Quirks(mask_prediction=1)}, "quirks", "quirks.mask_prediction must be true or false"),
    ({"id": ["unhashable"]}, "id", "request id must be hashable"),
    ({"prompt": []}, "prompt", "the prompt must hold at least one token"),
    ({"prompt": "5 17"}, "prompt", "prompt must be a sequence of integer token ids"),
    ({"prompt": [5, 1.0]}, "prompt", "prompt must be a sequence of integer token ids"),
    ({"prompt": [5, True]}, "prompt", "prompt must be a sequence of integer token ids"),
    ({"prompt": [5, 512]}, "prompt", "input_ids must be token ids in [0, 511]"),
    ({"policy": "threshold:" + "9" * 2000}, "policy", "policy spec must be at most 1000 characters"),
    ({"policy": "nope"}, "policy", "unknown policy 'nope'"),
    ({"policy": "llada:steps=" + "9" * 900}, "policy", "llada.steps must be in [0, 131072]; got an integer of"),
    ({"policy": "llada:steps=1000000000"}, "policy", "llada.steps must be in [0, 131072]"),
    ({"policy": "threshold:temperature=3"}, "policy", "threshold.temperature must be in [0.0, 2.0]; got 3.0"),
    ({"policy": "dream:top_k=1000000"}, "policy", "dream.top_k must be in [0, 131072]"),
    ({"policy": "cad:eos_ids=7/-1"}, "policy", "cad.eos_ids must be at most 256 token ids in [0, 2147483647]"),
    ({"policy": "sdar:eb_threshold=-1"}, "policy", "sdar.eb_threshold must be in [0.0, inf]"),
    ({"policy": "changed-after-built"}, "policy", "threshold.temperature must be in [0.0, 2.0]; got 5.0"),
    ({"policy": 3}, "policy", "policy must be a Policy or a string"),
]


@pytest.mark.parametrize(("fields", "field", "message"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_every_field_is_checked_and_named(fields, field, message):
    if fields.get("policy") == "changed-after-built":  # an instance whose option changed after its checks ran
        fields = {"policy": ConfidenceThresholdPolicy()}
        fields["policy"].temperature = 5.0
    engine = Engine(model(LLADA))
    with pytest.raises(RequestError) as err:
        engine.submit(Request(**{"prompt": P, "gen_length": 16, "block_length": 8, **fields}))
    assert err.value.field == field and message in str(err.value), str(err.value)
    assert len(str(err.value)) < 300 and not engine.has_work()


def test_policy_option_errors_name_the_option():
    engine = Engine(model(LLADA))
    with pytest.raises(RequestError) as err:
        engine.validate(Request(P, "threshold:temperature=2.5", 16, 8))
    assert (err.value.field, err.value.option) == ("policy", "temperature")


def test_the_bounds_themselves_are_accepted():
    """Each range's ends run (the largest seed a torch generator takes included)."""
    m = model(LLADA)
    reqs = [
        Request(P, "threshold:threshold=0.8,temperature=2.0", 8, 8, seed=MAX_SEED, max_nfe=MAX_COUNT),
        Request(P, "llada:steps=8", 8, 1, seed=0, cfg_scale=100.0, max_steps_per_block=MAX_COUNT, eos_ids=[]),
    ]
    results = Engine(m).run(reqs)
    assert [r.nfe for r in results] == [results[0].nfe, 8] and all(r.error is None for r in results)


def test_block_models_bound_the_block_by_the_context():
    d = BLOCK_DIRS[0]
    m = model(d)
    context = m.config.max_sequence_length
    with pytest.raises(RequestError, match=rf"block_length must be an integer in \[1, {context}\]") as err:
        Engine(m).validate(Request(P, "threshold:0.9", 8, context + 1))
    assert err.value.field == "block_length"
    Engine(m).validate(Request(P, "threshold:0.9", 8, 16))  # any length up to it, beyond the answer too


def test_messages_are_restated_in_a_callers_names():
    """The server's names come from the text layer's one table: the message follows, never edited as text."""
    engine = Engine(model(LLADA))
    cases = [
        (Request(P, gen_length=30, block_length=8), "max_tokens (30) must be a multiple of block_length (8)"),
        (Request(P, gen_length=0), "max_tokens must be an integer >= 1; got 0"),
        (Request(P, gen_length=4096), "prompt length (4) + max_tokens (4096) = 4100 exceeds the model's context"),
        (Request(P, eos_ids=[600]), "stop_ids must be at most 256 token ids"),
    ]
    for req, message in cases:
        with pytest.raises(RequestError) as err:
            engine.validate(req)
        api = err.value.renamed(TEXT_NAMES)
        assert message in str(api) and api.field in ("max_tokens", "block_length", "stop_ids"), str(api)
        assert "max_tokens" not in str(err.value) and "stop_ids" not in str(err.value)  # the engine's own words
        assert isinstance(api, ValueError) and api.option == err.value.option


def test_a_huge_option_value_gets_a_short_message():
    with pytest.raises(ValueError, match=r"llada\.steps expects int") as err:
        parse_policy("llada:steps=" + "9" * 5000)  # past Python's limit on digits converted at once
    assert len(str(err.value)) < 200


def test_tokens_and_positions_per_forward():
    eos, mask = {2, 9}, 4
    assert metrics.answer_tokens([5, 6, 7, 2, 2, 2], eos) == 3
    assert metrics.tokens_per_forward([5, 6, 7, 2, 2, 2], eos, 2) == 1.5
    assert metrics.tokens_per_forward([5, mask, 7, 9, 8], eos, 4, mask_id=mask) == 0.5  # masks are not tokens
    assert metrics.tokens_per_forward([5, 6], eos, 0) == 0.0
    assert metrics.tokens_per_forward([2, 5, 6], eos, 3) == 0.0  # an answer that starts with EOS
    assert metrics.positions_per_forward([4, 2, 2], 4) == 2.0 and metrics.positions_per_forward([], 0) == 0.0
