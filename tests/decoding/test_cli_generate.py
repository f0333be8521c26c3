"""`fewstep generate` end to end on the tiny LLaDA fixture plus a tiny tokenizer built here."""

from __future__ import annotations

import json
import shutil

import pytest

import fewstep
from fewstep.cli import main
from tests.parity.fixtures import DEFAULT_DIRS, model, oracles

LLADA = DEFAULT_DIRS[0]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The fixture checkpoint plus a word-level tokenizer: "w<i>" is token i, specials read from the config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((LLADA / "config.json").read_text())
    special = oracles(LLADA)["special_ids"]
    names = {
        cfg["eos_token_id"]: "<|endoftext|>",
        special["eot"]: "<|eot_id|>",
        cfg["mask_token_id"]: "<|mdm_mask|>",
    }
    free = [i for i in range(cfg["vocab_size"]) if i not in names and i >= 100]
    names[free[-1]], names[free[-2]], names[free[-3]] = "<|startoftext|>", "<|user|>", "<|assistant|>"
    vocab = {names.get(i, f"▁w{i}"): i for i in range(cfg["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        mask_token="<|mdm_mask|>",
        additional_special_tokens=["<|eot_id|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = TEMPLATE
    d = tmp_path_factory.mktemp("tiny-llada")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(LLADA / f, d / f)
    fast.save_pretrained(d)
    return d


def words(ids):
    return " ".join(f"w{i}" for i in ids)


def run_cli(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_answer_nfe_and_json_match_the_api(model_dir, capsys):
    prompt = oracles(LLADA)["prompts"]["p1"]
    code, out, _ = run_cli(
        capsys, "--model", model_dir, "--prompt", words(prompt), "--no-chat-template", "--gen-length", 64,
        "--block-length", 16, "--policy", "threshold:0.9", "--cache", "dual", "--json",
    )  # fmt: skip
    assert code == 0
    doc = json.loads(out)
    m = model(LLADA)
    eot = oracles(LLADA)["special_ids"]["eot"]
    ref = fewstep.generate(
        m, [prompt], "threshold:0.9", gen_length=64, block_length=16, cache="dual", early_stop=True,
        eos_ids=(m.config.eos_token_id, eot),
    )  # fmt: skip
    answer = ref.answers[0].tolist()
    cut = next(i for i, t in enumerate(answer) if t in (m.config.eos_token_id, eot))
    (res,) = doc["results"]
    assert res["answer"] == words(answer[:cut])
    assert res["nfe"] == int(ref.nfe[0]) < 64  # early stop is on by default in the CLI
    assert res["positions_per_forward"] == pytest.approx(float(ref.positions_per_forward[0]))
    assert res["tokens_per_forward"] == pytest.approx(cut / int(ref.nfe[0]))  # answer tokens before the EOS
    assert doc["policy"] == "threshold" and doc["cache"] == "dual" and doc["seconds"] > 0


def test_human_output_and_trace(model_dir, capsys, tmp_path):
    p = oracles(LLADA)["prompts"]
    trace_file = tmp_path / "trace.json"
    code, out, _ = run_cli(
        capsys, "--model", model_dir, "--prompt", words(p["p1"]), "--prompt", words(p["p2"][:6]),
        "--gen-length", 32, "--block-length", 8, "--policy", "entropy:0.5", "--trace", "--trace-json", trace_file,
    )  # fmt: skip
    assert code == 0
    assert "NFE " in out and "tokens/forward" in out and "positions/forward" in out and "tokens/s" in out
    assert "step   1  block 0" in out and "░" in out  # the canvas, masks still visible at step 1
    doc = json.loads(trace_file.read_text())
    assert len(doc["rows"]) == 2 and doc["policy"] == "entropy"
    row = doc["rows"][0]
    bos = fewstep.load_tokenizer(model_dir).bos_token_id
    assert row["prompt_ids"][0] == bos  # the chat template was applied
    assert sum(len(s["positions"]) for s in row["steps"]) == sum(row["tokens_per_step"])
    assert [s["nfe"] for s in row["steps"]] == list(range(1, row["nfe"] + 1))
    assert all(len(s["text"]) == len(s["tokens"]) for s in row["steps"])


def test_prompt_ids_without_tokenizer(capsys):
    prompt = oracles(LLADA)["prompts"]["p2"]
    code, out, _ = run_cli(
        capsys, "--model", LLADA, "--prompt-ids", " ".join(map(str, prompt)), "--gen-length", 32,
        "--block-length", 8, "--policy", "llada:steps=16", "--no-early-stop", "--json",
    )  # fmt: skip
    assert code == 0
    res = json.loads(out)["results"][0]
    ref = fewstep.generate(model(LLADA), [prompt], "llada:steps=16", gen_length=32, block_length=8)
    assert res["nfe"] == 16
    eos = model(LLADA).config.eos_token_id
    ids = ref.answers[0].tolist()
    assert res["answer"] == " ".join(map(str, ids[: ids.index(eos)] if eos in ids else ids))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "nope"], "unknown policy 'nope'"),
        (["--policy", "threshold:2"], r"threshold.threshold must be in [0.0, 1.0]"),
        (["--gen-length", "30", "--block-length", "8"], "gen_length (30) must be a multiple of block_length (8)"),
        (["--prompt-ids", "1 x"], "--prompt-ids expects space-separated integers"),
        (["--prompt-ids", "1 99999"], "input_ids must be token ids in [0, 511]"),
        (["--seed", str(2**70)], "seed must be an integer <= 18446744073709551615"),  # the server's check too
        (["--cfg-scale", "nan"], "cfg_scale must be a finite number"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, message):
    base = ["--model", str(LLADA)] + ([] if "--prompt-ids" in argv else ["--prompt-ids", "1 2 3"])
    code, _, err = run_cli(capsys, *base, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_model_and_tokenizer(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--model", tmp_path / "nope", "--prompt-ids", "1")
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "--model", LLADA, "--prompt", "hello")
    assert code == 2 and "--prompt-ids" in err  # no tokenizer in the fixture folder: says what to do


def test_help_lists_policies(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for name in ("llada", "threshold", "factor", "entropy", "entropy-dream", "cad", "dream"):
        assert f"  {name}: " in out
    assert "--trace-json" in out and "--cache" in out


def test_cpu_generation_is_deterministic_under_seed(model_dir, capsys):
    argv = ["--model", model_dir, "--prompt-ids", "5 6 7", "--policy", "threshold:threshold=0.9,temperature=1",
            "--gen-length", 16, "--block-length", 8, "--seed", 3, "--json"]  # fmt: skip
    a = json.loads(run_cli(capsys, *argv)[1])["results"]
    b = json.loads(run_cli(capsys, *argv)[1])["results"]
    assert a == b


def test_default_model_is_the_shipped_teacher(capsys):
    """No --model: the embedded teacher answers (a correct, verified derivation); a wrong name lists the
    shipped ones."""
    from fewstep.tasks import verify

    prompt = "3 + 4 - 2 + 8 - 1 ?"
    code, out, _ = run_cli(capsys, "--prompt", prompt, "--gen-length", 64, "--no-chat-template", "--json")
    assert code == 0
    answer = json.loads(out)["results"][0]["answer"]
    assert verify(prompt, answer).correct, answer
    code, _, err = run_cli(capsys, "--model", "no-such-model", "--prompt-ids", "1")
    assert code == 2 and "shipped models: teacher" in err


def test_shipped_model_names_resolve_in_every_command(tmp_path):
    """`--model teacher` works wherever a checkpoint folder does; a folder of that name wins."""
    from fewstep.assets import resolve_model, shipped_models

    shipped = dict(shipped_models())
    assert resolve_model("teacher") == shipped["teacher"] and resolve_model("dparallel") == shipped["dparallel"]
    (tmp_path / "teacher").mkdir()
    assert resolve_model(str(tmp_path / "teacher")) == tmp_path / "teacher"
    with pytest.raises(
        FileNotFoundError, match="shipped models: teacher, cd4lm, d3llm, dmax, dparallel, dparallel-control"
    ):
        resolve_model("no-such")
