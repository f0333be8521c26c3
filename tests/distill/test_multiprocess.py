"""Data-parallel distillation: 2 CPU processes (gloo, torchrun) follow the 1-process loss trajectory.

The trainer builds the same global batch in every process and each process takes its rows, so with
per-sequence loss normalisation (``fewstep distill``'s default) the loss and its gradient do not
depend on how the global batch is split into processes and micro-batches. A token mean over a
micro-batch (``--loss-normalization batch``) does depend on it; the split test below shows both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fewstep
from fewstep.cli import main
from fewstep.distill.cd4lm import CD4LMObjective, CD4LMRecipe
from fewstep.distill.dparallel import DParallelObjective, DParallelRecipe
from fewstep.models.tokenizer import special_ids
from fewstep.train.data import read_jsonl, tokenize_pairs
from fewstep.train.objective import SpecialIds
from fewstep.train.trainer import seeded

REPO = Path(__file__).resolve().parents[2]


def _examples(teacher, rollouts):
    tok = fewstep.load_tokenizer(teacher)
    ids = special_ids(tok)
    recs = [r for f in sorted(Path(rollouts).glob("shard-*.jsonl")) for r in read_jsonl(f)]
    return tokenize_pairs(recs, tok), SpecialIds(ids["mask"], ids["eos"], ids["pad"])


def _loss_and_grads(model, obj, batch, parts):
    """Loss and gradients of a batch computed as ``parts`` equal micro-batches (as the trainer accumulates)."""
    model.zero_grad()
    rows = next(iter(batch.values())).shape[0]
    size, total = rows // parts, 0.0
    for p in range(parts):
        micro = {k: v[p * size : (p + 1) * size] for k, v in batch.items()}
        loss, _ = obj.loss(model, micro, step=0, max_steps=10, teacher=model)
        (loss / parts).backward()
        total += float(loss.detach()) / parts
    return total, [q.grad.clone() for q in model.parameters()]


@pytest.mark.parametrize("method", ["dparallel", "cd4lm"])
def test_per_sequence_losses_do_not_depend_on_the_split(arith_teacher, arith_rollouts, method):
    examples, ids = _examples(arith_teacher, arith_rollouts)
    model = fewstep.load_model(arith_teacher).train().requires_grad_(True)
    got = {}
    for per_sequence in (True, False):
        if method == "dparallel":
            obj = DParallelObjective(ids, 49, DParallelRecipe(block_size=16), per_sequence=per_sequence)
        else:
            obj = CD4LMObjective(ids, 49, CD4LMRecipe(), per_sequence=per_sequence)
        batch = obj.collate(examples[:8], seeded(0, 1, 0))
        got[per_sequence] = [_loss_and_grads(model, obj, batch, parts) for parts in (1, 2, 8)]
    for loss, grads in got[True][1:]:
        assert loss == pytest.approx(got[True][0][0], rel=1e-5)
        for a, b in zip(grads, got[True][0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a token mean over the micro-batch changes with the split (why per-sequence is the default): by far
    # more than the float noise of the per-sequence split
    noise = max(abs(got[True][2][0] - got[True][0][0]), 1e-7 * abs(got[True][0][0]))
    assert abs(got[False][2][0] - got[False][0][0]) > 20 * noise


WORKER = """
import json, sys
from fewstep.cli import main
for argv in json.loads(sys.argv[1]):
    assert main(argv) == 0, argv
"""


def test_two_gloo_processes_follow_the_single_process_trajectory(arith_teacher, arith_rollouts, tmp_path):
    runs = {
        "dparallel": ["--method", "dparallel", "--lora-r", "4", "--lr", "3e-3"],
        "cd4lm": ["--method", "cd4lm", "--lr", "3e-3", "--warmup-steps", "1"],
    }

    def argv(name, procs):
        return [
            "distill", *runs[name], "--model", str(arith_teacher), "--data", str(arith_rollouts),
            "--out", str(tmp_path / f"{name}-{procs}"), "--batch-size", "8", "--max-steps", "4",
            "--log-every", "1", "--save-every", "100", "--threads", "1", "--no-progress",
        ]  # fmt: skip

    for name in runs:  # one process: micro-batch = the global batch of 8
        assert main(argv(name, 1)) == 0
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    # --standalone: torchrun's own store binds a free port itself (a port probed here and released could be
    # taken by a parallel test before torchrun binds it)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(script), json.dumps([argv(name, 2) for name in runs]),
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "x2" in out.stdout  # really two processes
    for name in runs:
        one, two = tmp_path / f"{name}-1", tmp_path / f"{name}-2"
        la = [json.loads(x) for x in (one / "train_log.jsonl").read_text().splitlines()]
        lb = [json.loads(x) for x in (two / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3, 4]
        for ra, rb in zip(la, lb):
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), name
            assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4), name
        assert len({round(r["loss"], 4) for r in la}) == 4  # the loss moves: the comparison is not vacuous
        wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
