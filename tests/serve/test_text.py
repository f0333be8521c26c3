"""The text layer's incremental detokenisation with a byte-level tokenizer (multi-byte UTF-8 split
across tokens) and stop strings, fed the engine's real Update objects, and its generate() on it."""

from __future__ import annotations

import pytest

from fewstep.decoding import Policy
from fewstep.decoding.engine import RowResult, Update
from fewstep.decoding.text import TEXT_NAMES, Canvas, Completion, Delta, GenerationSettings, RequestError, TextGenerator

SPECIALS = ["<|pad|>", "<|unk|>", "<|endoftext|>", "<|eot_id|>", "<|mdm_mask|>"]
MASK, EOS = 4, 2


@pytest.fixture(scope="module")
def byte_gen():
    """A random tiny LLaDA over a byte-level tokenizer: ids 0-4 special, then the 256 byte symbols."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fewstep.models import LLaDAConfig, LLaDAModel

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIALS)} | {c: len(SPECIALS) + i for i, c in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIALS[0],
        unk_token=SPECIALS[1],
        eos_token=SPECIALS[2],
        mask_token=SPECIALS[4],
    )
    cfg = LLaDAConfig(
        d_model=32,
        n_heads=2,
        n_layers=1,
        vocab_size=len(vocab),
        mlp_hidden_size=64,
        mask_token_id=MASK,
        eos_token_id=EOS,
        pad_token_id=0,
        max_sequence_length=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    )
    model = LLaDAModel(cfg)
    model.init_weights(seed=0)
    return TextGenerator(model.eval(), tok)


def ids_of(gen, text: str) -> list[int]:
    return gen.tokenizer(text, add_special_tokens=False)["input_ids"]


def drive(gen, answer: list[int], order: list[int], settings: GenerationSettings):
    """Commit ``answer`` one position per forward in ``order``; returns the events the tracker emits."""
    events = []
    rid = gen.submit([5, 6, 7], settings, events.append, canvas=True)
    tracker, _ = gen._live.pop(rid)
    gen.engine.cancel(rid)
    canvas = [MASK] * len(answer)
    steps = [0] * len(answer)
    for nfe, pos in enumerate(order, 1):
        canvas[pos], steps[pos] = answer[pos], nfe
        u = Update(rid, nfe, 0, [pos], [answer[pos]], list(canvas), [], MASK)
        if nfe == len(order):  # the engine's last update of the request
            u.done, u.result = True, RowResult(rid, [5, 6, 7], list(answer), nfe, [1] * nfe, steps)
        comp = tracker.feed(u, True)
        if comp is not None:
            events.append(comp)
            break
    return events


def deltas(events) -> list[str]:
    return [e.text for e in events if isinstance(e, Delta)]


def test_incomplete_utf8_is_held_back(byte_gen):
    text = "€ü 𝄞!"  # 3-, 2- and 4-byte characters
    answer = ids_of(byte_gen, text)
    assert len(answer) == len(text.encode())
    answer += [EOS] * 4
    events = drive(byte_gen, answer, list(range(len(answer))), GenerationSettings(max_tokens=len(answer)))
    out = deltas(events)
    assert "".join(out) == text and all("\ufffd" not in d for d in out)
    assert out[0] == "€" and "𝄞" in out  # a character appears once all its bytes are committed
    comp = events[-1]
    assert isinstance(comp, Completion) and comp.text == text and comp.finish_reason == "stop" and comp.stop == EOS


def test_out_of_order_commits_release_the_prefix_only(byte_gen):
    text = "abcdef"
    answer = [*ids_of(byte_gen, text), EOS, EOS]
    events = drive(byte_gen, answer, [5, 4, 3, 0, 1, 2, 6, 7], GenerationSettings(max_tokens=8))
    assert deltas(events) == ["a", "b", "cdef"]
    canvases = [e for e in events if isinstance(e, Canvas)]
    assert canvases[0].tokens[:5] == [None] * 5 and canvases[0].steps[5] == 1
    assert canvases[3].text == "a" and canvases[3].steps[:6] == [4, 0, 0, 3, 2, 1]


def test_stop_strings_are_held_back(byte_gen):
    def run(text: str, stop: list[str]):
        answer = ids_of(byte_gen, text) + [EOS] * 3
        events = drive(
            byte_gen, answer, list(range(len(answer))), GenerationSettings(max_tokens=len(answer), stop=stop)
        )
        return deltas(events), events[-1]

    out, comp = run("abc STOP def", ["STOP"])  # cut before the stop string, no part of which is ever sent
    assert "".join(out) == "abc " == comp.text and not any("S" in d for d in out)
    assert comp.finish_reason == "stop" and comp.stop == "STOP" and comp.row is None  # finished by the text layer
    assert comp.nfe == len("abc STOP")  # its row is freed at once

    out, comp = run("abc STX def", ["STOP"])  # a false start is held back, then released
    assert "".join(out) == "abc STX def" == comp.text and "STX" in out
    assert comp.finish_reason == "stop" and comp.stop == EOS and comp.row is not None

    out, comp = run("ab€cd", ["€c"])  # a stop string with a multi-byte character
    assert "".join(out) == "ab" == comp.text and comp.stop == "€c"


def test_generate_streams_what_it_returns(byte_gen):
    """Random bytes from a random model: the deltas always concatenate to the returned text."""
    prompts = [[5 + i, 9, 40 + i] for i in range(4)]
    settings = GenerationSettings(policy="llada:steps=16", max_tokens=16, block_length=8, early_stop=False)
    outs = byte_gen.generate(prompts, settings)
    for p, o in zip(prompts, outs):
        events = []
        byte_gen.submit(p, settings, events.append)
        while not any(isinstance(e, Completion) for e in events):
            byte_gen.step()
        assert "".join(deltas(events)) == o.text == events[-1].text
        assert o.nfe == 16 and o.finish_reason in ("stop", "length")
    with pytest.raises(ValueError, match="block_length"):
        byte_gen.generate(prompts, settings.replace(block_length=5))


def test_generate_with_per_prompt_settings_and_events(byte_gen):
    prompts = [[5, 9, 40], [6, 9, 41]]
    base = GenerationSettings(policy="llada:steps=8", max_tokens=8, block_length=8, early_stop=False)
    alone = [byte_gen.generate([p], base.replace(seed=i))[0] for i, p in enumerate(prompts)]
    seen = []
    both = byte_gen.generate(prompts, [base.replace(seed=0), base.replace(seed=1)], on_event=seen.append, canvas=True)
    assert [o.text for o in both] == [o.text for o in alone]
    assert sum(isinstance(e, Canvas) for e in seen) == 16 and sum(isinstance(e, Completion) for e in seen) == 2
    with pytest.raises(ValueError, match="one per prompt"):
        byte_gen.generate(prompts, [base])


def test_completion_stats_name_both_figures(byte_gen):
    """tokens per forward counts the answer before the first EOS; positions per forward every commit."""
    answer = [*ids_of(byte_gen, "abc"), EOS, EOS, EOS]
    comp = drive(byte_gen, answer, list(range(6)), GenerationSettings(max_tokens=6))[-1]
    stats = comp.stats()
    assert stats["tokens_per_forward"] == comp.tokens_per_forward == 3 / 6
    assert stats["positions_per_forward"] == comp.positions_per_forward == 1.0
    assert "tokens_per_step" not in stats and comp.error is None and comp.stop == EOS


class Broken(Policy):
    name = "broken"

    def select(self, logits, state):
        raise IndexError("a bug in a policy")


def test_a_failed_request_ends_with_an_error_and_the_others_go_on(byte_gen):
    prompts = [[5, 9, 40], [6, 9, 41]]
    good = GenerationSettings(policy="llada:steps=8", max_tokens=8, block_length=8, early_stop=False)
    bad = good.replace(policy=Broken())
    want = byte_gen.generate([prompts[0]], good)[0]
    done: dict = {}
    for name, p, s in (("good", prompts[0], good), ("bad", prompts[1], bad)):
        byte_gen.submit(p, s, lambda e, name=name: done.setdefault(name, e) if isinstance(e, Completion) else None)
    while len(done) < 2:
        byte_gen.step()
    assert done["bad"].finish_reason == "error" and done["bad"].stop is None
    assert done["bad"].error == "policy broken failed: IndexError: a bug in a policy"
    assert (done["good"].text, done["good"].nfe, done["good"].error) == (want.text, want.nfe, None)
    with pytest.raises(RuntimeError, match="failed: policy broken failed: IndexError"):
        byte_gen.generate(prompts, [good, bad])
    assert byte_gen.active() == 0 and not byte_gen.engine.has_work()


def test_errors_name_the_setting_at_fault(byte_gen):
    """The engine's words by default (the commands' --gen-length); the API's through the one name table."""
    with pytest.raises(RequestError) as err:
        byte_gen.generate([[5, 9]], GenerationSettings(max_tokens=30, block_length=8))
    assert err.value.field == "block_length" and str(err.value).startswith("gen_length (30) must be a multiple")
    assert str(err.value.renamed(TEXT_NAMES)).startswith("max_tokens (30) must be a multiple of block_length (8)")
    with pytest.raises(RequestError) as err:  # an option a setting overrides: the setting is at fault
        byte_gen.generate([[5, 9]], GenerationSettings(policy="threshold", temperature=5))
    assert err.value.field == "temperature" and "threshold.temperature must be in [0.0, 2.0]" in str(err.value)
    with pytest.raises(RequestError) as err:
        byte_gen.generate([[5, 9]], GenerationSettings(stop=["x"] * 17))
    assert err.value.field == "stop"
