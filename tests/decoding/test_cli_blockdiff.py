"""`fewstep generate` and `fewstep eval` run on the block-diffusion fixtures (LLaDA2-MoE, SDAR)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import fewstep
from fewstep.cli import main
from tests.parity.fixtures import BLOCK_DIRS, model, oracles

TOKENIZER = Path(fewstep.__file__).parent / "assets" / "models" / "dparallel"  # 34 words: inside both vocabularies


@pytest.mark.parametrize("d", BLOCK_DIRS, ids=lambda d: d.name)
def test_generate_cli_equals_generate(d, capsys):
    prompt = next(iter(oracles(d)["prompts"].values()))
    ids = " ".join(map(str, prompt))
    args = ["generate", "--model", str(d), "--prompt-ids", ids, "--policy", "llada2", "--cache", "prefix"]
    main([*args, "--gen-length", "16", "--block-length", "8", "--dtype", "float32", "--device", "cpu", "--json"])
    got = json.loads(capsys.readouterr().out)["results"][0]
    want = fewstep.generate(
        model(d), [prompt], "llada2", gen_length=16, block_length=8, cache="prefix", early_stop=True
    )
    assert got["nfe"] == int(want.nfe[0])
    answer = want.answers[0].tolist()
    eos = model(d).config.eos_token_id
    answer = answer[: answer.index(eos)] if eos in answer else answer
    assert got["answer"].split() == [str(t) for t in answer if t != eos]


def _with_tokenizer(d: Path, folder: Path) -> Path:
    """The fixture's weights and config with a tokenizer whose words both fixtures' vocabularies hold."""
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(d / f, folder / f)
    for f in TOKENIZER.glob("tokenizer*.json"):
        shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.parametrize("d", BLOCK_DIRS, ids=lambda d: d.name)
def test_eval_cli_is_generate_with_the_models_block(d, tmp_path):
    """`fewstep eval` decodes with the model's own block size by default; each record's text and NFE are
    what fewstep.generate gives its prompt alone."""
    from fewstep.decoding.text import render
    from fewstep.eval import get_protocol, get_task

    ckpt, out = _with_tokenizer(d, tmp_path / "ckpt"), tmp_path / "run"
    args = ["eval", "--model", str(ckpt), "--task", "arith", "--limit", "3", "--gen-length", "12"]
    assert main([*args, "--policy", "threshold:0.5", "--cache", "prefix", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["block_length"] == model(d).block_length and summary["n"] == 3
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    tok, m = fewstep.load_tokenizer(ckpt), model(d)
    protocol, task = get_protocol("arith", None), get_task("arith")
    for rec, problem in zip(records, task.eval_records(3)):
        ids = tok(render(tok, protocol(problem).text), add_special_tokens=False)["input_ids"]
        want = fewstep.generate(
            m, [ids], "threshold:0.5", gen_length=12, cache="prefix", tokenizer=tok, early_stop=True
        )
        assert rec["nfe"] == int(want.nfe[0])
        answer = want.answers[0].tolist()
        stops = fewstep.decoding.stop_ids(m, tok)
        cut = next((i for i, t in enumerate(answer) if t in stops), len(answer))
        assert rec["response"] == tok.decode(answer[:cut], skip_special_tokens=True)


@pytest.mark.parametrize("d", BLOCK_DIRS, ids=lambda d: d.name)
def test_sweep_cli_runs(d, tmp_path):
    ckpt, out = _with_tokenizer(d, tmp_path / "ckpt"), tmp_path / "sweep"
    args = ["sweep", "--model", str(ckpt), "--task", "arith", "--policy", "threshold", "--values", "0.3,0.9"]
    args += ["--baseline-policy", "llada2" if "llada2" in d.name else "sdar", "--gen-length", "8", "--limit", "2"]
    assert main([*args, "--cache", "prefix", "--out", str(out), "--no-progress"]) == 0
    points = json.loads((out / "sweep.json").read_text())["models"][str(ckpt)]["points"]
    assert [p["n"] for p in points] == [2, 2, 2]
    nfe = [p["mean_nfe"] for p in points[1:]]
    assert nfe[0] <= nfe[1]  # a lower threshold commits more per step
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("d", BLOCK_DIRS, ids=lambda d: d.name)
def test_lm_eval_generate_until_and_no_loglikelihood(d, tmp_path):
    """The lm-eval adapter on a block model: generate_until is the text layer's answer (the model's own block
    size), loglikelihood refuses with a reason instead of returning a number that is not the model's ELBO."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from fewstep.eval.lm_eval import FewstepLM

    ckpt = _with_tokenizer(d, tmp_path / "ckpt")
    lm = FewstepLM(pretrained=str(ckpt), policy="threshold:0.5", cache="prefix", dtype="float32", device="cpu")
    prompt = "3 + 4 - 1 ?"
    req = Instance("generate_until", {}, (prompt, {"until": ["="], "max_gen_toks": 12}), 0)
    (text,) = lm.generate_until([req])
    tok, m = lm.tokenizer, model(d)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    want = fewstep.generate(m, [ids], "threshold:0.5", gen_length=12, cache="prefix", tokenizer=tok, early_stop=True)
    answer = want.answers[0].tolist()
    stops = fewstep.decoding.stop_ids(m, tok)
    cut = next((i for i, t in enumerate(answer) if t in stops), len(answer))
    assert text == tok.decode(answer[:cut], skip_special_tokens=True).split("=")[0]
    with pytest.raises(NotImplementedError, match="block-diffusion"):
        lm.loglikelihood([Instance("loglikelihood", {}, (prompt, " 6"), 0)])
