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


@pytest.mark.parametrize("d", BLOCK_DIRS, ids=lambda d: d.name)
def test_eval_cli_runs(d, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(d / f, ckpt / f)
    for f in TOKENIZER.glob("tokenizer*.json"):
        shutil.copy(f, ckpt / f.name)
    out = tmp_path / "run"
    args = ["eval", "--model", str(ckpt), "--task", "arith", "--limit", "2", "--gen-length", "16"]
    main([*args, "--policy", "sdar", "--cache", "prefix", "--out", str(out), "--no-progress"])
    summary = json.loads((out / "summary.json").read_text())
    assert len((out / "records.jsonl").read_text().splitlines()) == 2
    assert summary
