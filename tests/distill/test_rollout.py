"""`fewstep rollout`: prompt sources, chat rendering, verifiers and keep modes, process slices, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import fewstep
from fewstep.cli import main
from fewstep.decoding.text import cut_at_stop
from fewstep.distill import rollout as ro
from fewstep.eval.benchmarks import TASKS, Task, prompt_records, register_task
from tests.killpoint import killed_at

REPO = Path(__file__).resolve().parents[2]


def _records(folder) -> dict[str, dict]:
    """Records of every shard by id, without the timing field (the only non-deterministic one)."""
    out = {}
    for f in ro.shard_files(folder):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            rec.pop("seconds")
            assert rec["id"] not in out, f"record {rec['id']} written twice"
            out[rec["id"]] = rec
    return out


def _run(teacher, out, records, **kw):
    cfg = ro.RolloutConfig(
        out_dir=str(out),
        model=str(teacher),
        prompts="arith",
        gen_length=kw.pop("gen_length", 32),
        batch_size=kw.pop("batch_size", 8),
        keep=kw.pop("keep", "all"),
        verifier=kw.pop("verifier", "arith"),
        **{k: kw.pop(k) for k in list(kw) if k in ("policy", "seed", "sort_by_length")},
    )
    model, tok = fewstep.load_model(teacher), fewstep.load_tokenizer(teacher)
    return ro.run_rollout(cfg, model, tok, records, progress=False, **kw)


@pytest.fixture(scope="module")
def parity_verifier():
    """A deterministic stand-in verifier (even ids are 'correct'), to exercise the keep modes: a task of the
    benchmark registry, as every verifier is."""
    even = lambda rec, resp: int(rec["id"].rsplit("-", 1)[-1]) % 2 == 0  # noqa: E731
    register_task(Task("test-even-id", "math", "stand-in", load=list, extract=lambda r, resp: resp, check=even))
    yield "test-even-id"
    TASKS.pop("test-even-id")


def test_prompt_sources(tmp_path):
    recs, verifier = ro.load_prompts("arith", limit=10)
    assert verifier == "arith" and len(recs) == 10 and len({r["prompt"] for r in recs}) == 10
    assert all(r["id"].startswith("arith-train-") and r["gold"] for r in recs)
    f = tmp_path / "p.jsonl"
    f.write_text('{"question": "1 + 2 ?", "gold": "3"}\n\n{"question": "2 + 2 ?", "id": "x"}\n')
    recs, verifier = ro.load_prompts(str(f), prompt_field="question")
    assert verifier is None and [r["id"] for r in recs] == ["1", "x"] and recs[0]["prompt"] == "1 + 2 ?"
    f.write_text('{"prompt": "1 + 2 ?"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected an object with a string field 'prompt'"):
        ro.load_prompts(str(f))
    with pytest.raises(FileNotFoundError, match="neither a prompt set"):
        ro.load_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="--protocol"):
        ro.load_prompts(str(f), protocol="dparallel")


class ChatTok:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_render_prompt_with_and_without_chat_template():
    rec = {"id": "1", "prompt": "1 + 2 ?"}
    assert ro.render_prompt(rec, ChatTok()) == "<user>1 + 2 ?</user><assistant>"
    assert ro.render_prompt(rec, ChatTok(), "off") == "1 + 2 ?"
    assert ro.render_prompt({**rec, "raw": True, "gen_prefix": " So"}, ChatTok()) == "1 + 2 ? So"
    conv = {**rec, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
    assert ro.render_prompt(conv, ChatTok()) == "<system>s</system><user>q</user><assistant>"
    plain = object()
    assert ro.render_prompt(rec, plain) == "1 + 2 ?"
    with pytest.raises(ValueError, match="no chat template"):
        ro.render_prompt(conv, plain)
    with pytest.raises(ValueError, match="no chat template"):
        ro.render_prompt(rec, plain, "on")
    assert cut_at_stop("abc Question: more", ["Question:", "zz"]) == "abc "


def test_keep_modes_verdicts_stats_and_batch_independence(arith_teacher, tmp_path, parity_verifier):
    records, _ = ro.load_prompts("arith", limit=20)
    kept = {}
    for keep, bs in (("all", 8), ("correct", 3), ("incorrect", 20)):
        s = _run(arith_teacher, tmp_path / keep, records, keep=keep, verifier=parity_verifier, batch_size=bs)
        kept[keep] = _records(tmp_path / keep)
        assert s["prompts"] == 20 and s["kept"] == len(kept[keep]) and s["acceptance"] == len(kept[keep]) / 20
        assert s["accuracy"] == 0.5 and s["mean_nfe"] == 32.0  # llada, one token per step, no EOS from a random model
    assert set(kept["correct"]) | set(kept["incorrect"]) == set(kept["all"])
    assert not set(kept["correct"]) & set(kept["incorrect"])
    assert all(r["correct"] for r in kept["correct"].values())
    assert not any(r["correct"] for r in kept["incorrect"].values())
    # the same answer for a prompt whatever the batch it was decoded in
    for keep in ("correct", "incorrect"):
        for i, r in kept[keep].items():
            assert r == kept["all"][i]
    r = next(iter(kept["all"].values()))
    keys = {"id", "prompt", "response", "correct", "question", "nfe", "finished", "gold"}
    assert set(r) >= keys | {"tokens_per_forward", "positions_per_forward"}
    assert r["nfe"] == 32 and r["positions_per_forward"] == 1.0 and r["tokens_per_forward"] <= 1.0
    manifest = json.loads((tmp_path / "all" / "rollout.json").read_text())
    assert manifest["summary"]["kept"] == 20 and manifest["config"]["keep"] == "all"


def test_processes_take_disjoint_slices_and_together_equal_one_process(arith_teacher, tmp_path):
    lengths = [5, 3, 9, 3, 7, 1, 4]
    parts = [ro.process_order(lengths, True, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(7))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    records, _ = ro.load_prompts("arith", limit=14)
    _run(arith_teacher, tmp_path / "one", records, batch_size=4)
    for rank in (0, 1):  # the two processes of a 2-process run, one after the other
        _run(arith_teacher, tmp_path / "two", records, batch_size=4, rank=rank, world=2)
    shards = ro.shard_files(tmp_path / "two")
    assert [s.name for s in shards] == ["shard-00000-of-00002.jsonl", "shard-00001-of-00002.jsonl"]
    ids = [{json.loads(x)["id"] for x in s.read_text().splitlines()} for s in shards]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert _records(tmp_path / "two") == _records(tmp_path / "one")


def test_crash_after_a_batch_and_torn_write_lose_and_repeat_nothing(arith_teacher, tmp_path):
    records, _ = ro.load_prompts("arith", limit=24)
    _run(arith_teacher, tmp_path / "ref", records, batch_size=4)

    class Crash(Exception):
        pass

    def crash_at_3(k):
        if k == 2:
            raise Crash

    with pytest.raises(Crash):
        _run(arith_teacher, tmp_path / "run", records, batch_size=4, on_batch=crash_at_3)
    index = json.loads((tmp_path / "run" / "shard-00000-of-00001.progress.json").read_text())
    assert index["batches_done"] == 3
    with open(tmp_path / "run" / "shard-00000-of-00001.jsonl", "a") as fh:  # a batch appended, index not updated
        fh.write('{"id": "arith-train-999999", "prompt": "torn')
    seen = []
    s = _run(arith_teacher, tmp_path / "run", records, batch_size=4, on_batch=seen.append)
    assert seen == [3, 4, 5]  # only the missing batches were generated
    assert _records(tmp_path / "run") == _records(tmp_path / "ref")
    assert s["prompts"] == 24 and s["kept"] == 24


def _cmd(teacher, out, *extra):
    return [
        sys.executable, "-m", "fewstep", "rollout", "--model", str(teacher), "--prompts", "arith", "--out", str(out),
        "--limit", "96", "--batch-size", "2", "--keep", "incorrect", "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


def test_sigkill_and_restart_lose_no_record_and_write_none_twice(arith_teacher, tmp_path):
    assert main(_cmd(arith_teacher, tmp_path / "ref")[3:]) == 0
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    index = tmp_path / "run" / "shard-00000-of-00001.progress.json"
    # SIGKILL as the progress file is about to record a 4th batch: 3 batches done, every time
    rule = {"replace_json": [index.name, "batches_done", 4]}
    killed = subprocess.run(killed_at(rule, *_cmd(arith_teacher, tmp_path / "run")[3:]), env=env)
    assert killed.returncode == -signal.SIGKILL
    done = json.loads(index.read_text())["batches_done"]
    assert done == 3
    out = subprocess.run(_cmd(arith_teacher, tmp_path / "run"), env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert _records(tmp_path / "run") == _records(tmp_path / "ref")
    assert len(_records(tmp_path / "ref")) == 96
    summary = json.loads((tmp_path / "run" / "rollout.json").read_text())["summary"]
    assert summary["prompts"] == 96 and summary["kept"] == 96


def test_cli_errors_are_one_line(arith_teacher, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1 + 2 ?"}\n')
    base = ["rollout", "--model", str(arith_teacher), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--prompts", str(f), "--keep", "correct"]) == 2
    assert "needs a verifier" in capsys.readouterr().err
    assert main([*base, "--prompts", "arith", "--verifier", "nope"]) == 2
    assert "unknown verifier 'nope'" in capsys.readouterr().err
    assert main([*base, "--prompts", "arith", "--limit", "4", "--gen-length", "128"]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err
    f.write_text('{"prompt": "1 + zebra ?"}\n')
    assert main([*base, "--prompts", str(f)]) == 2
    assert "outside the tokenizer's vocabulary" in capsys.readouterr().err
    assert main([*base, "--prompts", "arith", "--limit", "4", "--keep", "all"]) == 0
    capsys.readouterr()
    assert main([*base, "--prompts", "arith", "--limit", "4", "--keep", "all", "--seed", "1"]) == 2
    assert "other settings" in capsys.readouterr().err


@dataclass(frozen=True)
class FakePrompt:
    messages: tuple | None = None
    text: str | None = None
    gen_prefix: str = ""
    stop: tuple = ()


class FakeTask:
    """The evaluation harness's task interface (extract / check / prompt), as ``fewstep.eval.benchmarks.Task``."""

    name = "fake"

    @staticmethod
    def extract(record, response):
        words = [w for w in response.replace("$", " ").split() if w.lstrip("-").isdigit()]
        return words[-1] if words else None

    @staticmethod
    def check(record, extracted):
        return extracted == record["target"]

    @staticmethod
    def prompt(record, protocol=None):
        if protocol == "raw":
            return FakePrompt(text=f"Q: {record['question']}\nA:", stop=("Q:",))
        return FakePrompt(messages=({"role": "user", "content": f"Question: {record['question']}"},), gen_prefix="So")


def test_evaluation_task_hook():
    verify = ro.task_verifier(FakeTask())
    assert verify({"gold": "12"}, "it is 12") and not verify({"gold": "12"}, "it is 13")
    assert verify({"target": "7"}, "7 apples") and not verify({"target": "7"}, "none")
    rows = [{"id": 0, "question": "2 + 5?", "target": "7"}]
    chat = prompt_records(rows, FakeTask())
    assert chat[0]["messages"] == [{"role": "user", "content": "Question: 2 + 5?"}] and chat[0]["gen_prefix"] == "So"
    assert ro.render_prompt(chat[0], ChatTok()) == "<user>Question: 2 + 5?</user><assistant>So"
    raw = prompt_records(rows, FakeTask(), "raw")
    assert raw[0]["raw"] and raw[0]["stop"] == ["Q:"] and raw[0]["id"] == "0"
    assert ro.render_prompt(raw[0], ChatTok()) == "Q: 2 + 5?\nA:"
    # GSM8K is a prompt set and a verifier through the benchmark registry
    recs, verifier = ro.load_prompts("gsm8k", limit=2, protocol="cd4lm")
    assert verifier == "gsm8k" and len(recs) == 2 and recs[0]["raw"]
    assert ro.get_verifier("gsm8k")(recs[0], f"The answer is \\boxed{{{recs[0]['target']}}}")
