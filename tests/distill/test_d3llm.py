"""d3LLM: trajectory rollouts (record format, retries, resume, shards), the masker, the loss's numeric
properties, the curricula, and ``fewstep distill --method d3llm`` (LoRA, Dream shift, SIGKILL resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from array import array
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fewstep
from fewstep.cli import main
from fewstep.distill import build_objective, objective_class, recipe_for
from fewstep.distill import rollout as ro
from fewstep.distill.d3llm import (
    ALWAYS,
    NEVER,
    PAPER_MAX_LENGTH,
    D3LLMObjective,
    D3LLMRecipe,
    Span,
    attach_trajectories,
    block_size_at,
    commit_rank,
    curriculum_epoch,
    d3llm_loss,
    mask_ratio_floor,
    parse_block_sizes,
    rank_table,
    select_span,
    teacher_policy,
    trajectory_views,
)
from fewstep.eval.benchmarks import TASKS, Task, register_task
from fewstep.train.objective import SpecialIds
from tests.killpoint import killed_at

REPO = Path(__file__).resolve().parents[2]
IDS = SpecialIds(mask=50, eos=2, pad=2)


def _records(folder) -> dict[str, dict]:
    out = {}
    for f in ro.shard_files(folder):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            rec.pop("seconds")
            assert rec["id"] not in out
            out[rec["id"]] = rec
    return out


def _trajectories(teacher, out, records, **kw):
    cfg = ro.RolloutConfig(
        out_dir=str(out),
        model=str(teacher),
        prompts="arith",
        policy=teacher_policy("llada", 32),
        gen_length=32,
        batch_size=kw.pop("batch_size", 4),
        keep="all",
        verifier=kw.pop("verifier", "arith"),
        early_stop=False,
        trajectory=True,
        attempts=kw.pop("attempts", 5),
    )
    model, tok = fewstep.load_model(teacher), fewstep.load_tokenizer(teacher)
    return ro.run_rollout(cfg, model, tok, records, progress=False, **kw)


@pytest.fixture(scope="module")
def retry_verifier():
    """Accepts a prompt at its second verification (attempt 1), the prompts with an even id never."""
    seen: dict[str, int] = {}

    def verify(rec, response):
        seen[rec["id"]] = seen.get(rec["id"], 0) + 1
        return int(rec["id"].rsplit("-", 1)[-1]) % 2 == 1 and seen[rec["id"]] >= 2

    register_task(Task("test-second-try", "math", "stand-in", load=list, extract=lambda r, resp: resp, check=verify))
    yield "test-second-try", seen
    TASKS.pop("test-second-try")


@pytest.fixture(scope="module")
def trajectory_rollouts(arith_teacher, tmp_path_factory):
    """A trajectory rollout of 12 arith prompts by the random tiny teacher (every attempt rejected)."""
    out = tmp_path_factory.mktemp("trajectories")
    records, _ = ro.load_prompts("arith", limit=12)
    _trajectories(arith_teacher, out, records)
    return out


# -- rollouts --------------------------------------------------------------------------------------------


def test_trajectory_records(trajectory_rollouts, arith_teacher):
    recs = _records(trajectory_rollouts)
    tok = fewstep.load_tokenizer(arith_teacher)
    assert len(recs) == 12
    for r in recs.values():
        assert sorted(r["commit_rank"]) == list(range(32))  # one commit per forward, every position
        assert r["nfe"] == 32 and r["positions_per_forward"] == 1.0 and r["tokens_per_forward"] <= 1.0
        assert r["prompt_tokens"] == len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        assert tok.decode(r["response_ids"], skip_special_tokens=True).strip() == r["response"].strip()
        # the random teacher never passes: five attempts, the last one kept
        assert r["correct"] is False and r["attempt"] == 4 and r["temperature"] == pytest.approx(0.4)
    manifest = json.loads((trajectory_rollouts / "rollout.json").read_text())
    assert manifest["config"]["trajectory"] is True and manifest["config"]["attempts"] == 5
    assert manifest["summary"]["mean_nfe"] == 5 * 32  # every attempt's forwards


def test_retries_stop_at_the_first_accepted_attempt(arith_teacher, tmp_path, retry_verifier):
    name, seen = retry_verifier
    records, _ = ro.load_prompts("arith", limit=6)
    s = _trajectories(arith_teacher, tmp_path / "r", records, verifier=name)
    recs = _records(tmp_path / "r")
    for i, r in recs.items():
        odd = int(i.rsplit("-", 1)[-1]) % 2 == 1
        assert (r["attempt"], r["correct"]) == ((1, True) if odd else (4, False))
        assert r["temperature"] == pytest.approx(0.1 * r["attempt"])
        assert seen[i] == r["attempt"] + 1
    assert s["prompts"] == 6 and s["accuracy"] == 0.5
    assert s["mean_nfe"] == 32 * (3 * 2 + 3 * 5) / 6


def test_trajectory_greedy_attempt_is_the_teachers_one_token_decode(arith_teacher, tmp_path):
    """Attempt 0 is the teacher's greedy low-confidence decode at steps = gen_length, through generate."""
    records, _ = ro.load_prompts("arith", limit=3)
    _trajectories(arith_teacher, tmp_path / "g", records, verifier=None, attempts=5)
    tok, model = fewstep.load_tokenizer(arith_teacher), fewstep.load_model(arith_teacher)
    for r in _records(tmp_path / "g").values():
        assert r["attempt"] == 0 and r["correct"] is None  # no verifier: one attempt
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        out = fewstep.generate(model, [prompt], teacher_policy("llada", 32), gen_length=32, block_length=32)
        assert commit_rank(out.decode_step[0].tolist()) == r["commit_rank"]
        assert out.sequences[0, len(prompt) :].tolist()[: len(r["response_ids"])] == r["response_ids"]


def test_trajectory_rollouts_shard_and_resume(arith_teacher, tmp_path, trajectory_rollouts):
    records, _ = ro.load_prompts("arith", limit=12)
    for rank in (0, 1):
        _trajectories(arith_teacher, tmp_path / "two", records, rank=rank, world=2)
    assert _records(tmp_path / "two") == _records(trajectory_rollouts)

    class Crash(Exception):
        pass

    def crash(k):
        if k == 1:
            raise Crash

    with pytest.raises(Crash):
        _trajectories(arith_teacher, tmp_path / "run", records, on_batch=crash)
    seen = []
    _trajectories(arith_teacher, tmp_path / "run", records, on_batch=seen.append)
    assert seen == [2]
    assert _records(tmp_path / "run") == _records(trajectory_rollouts)


def test_trajectory_mode_validation():
    with pytest.raises(ValueError, match="no early stop"):
        ro.RolloutConfig(out_dir="o", model="m", prompts="arith", keep="all", trajectory=True)
    with pytest.raises(ValueError, match="attempts"):
        ro.RolloutConfig(out_dir="o", model="m", prompts="arith", keep="all", attempts=0)
    plain = ro.RolloutConfig(out_dir="o", model="m", prompts="arith", keep="all")
    assert "trajectory" not in plain.identity()  # folders written before trajectory mode still resume
    with pytest.raises(ValueError, match="full-attention"):
        teacher_policy("llada2", 64)
    with pytest.raises(ValueError, match="one commit per forward"):
        commit_rank([1, 1, 2])
    with pytest.raises(ValueError, match="early stop"):
        commit_rank([1, 0, 2])


def test_rollout_cli_trajectory(arith_teacher, tmp_path, capsys):
    out = tmp_path / "cli"
    base = ["rollout", "--model", str(arith_teacher), "--prompts", "arith", "--out", str(out), "--no-progress"]
    assert main([*base, "--limit", "2", "--trajectory", "--attempts", "2", "--threads", "1"]) == 0
    assert "trajectories (2 attempts)" in capsys.readouterr().out
    cfg = json.loads((out / "rollout.json").read_text())["config"]
    assert cfg["policy"] == teacher_policy("llada", 32) and cfg["keep"] == "all" and not cfg["early_stop"]
    assert all(r["attempt"] == 1 and len(r["commit_rank"]) == 32 for r in _records(out).values())
    with pytest.raises(SystemExit) as exc:  # argparse rejects it: --attempts takes an integer >= 1
        main([*base, "--limit", "2", "--trajectory", "--attempts", "0"])
    assert exc.value.code == 2
    assert "--attempts" in capsys.readouterr().err


# -- masker ----------------------------------------------------------------------------------------------


def test_select_span_and_snapshot():
    # P 10, response+EOS 35 (R), b 8: K = 4; blocks 0..3 are [P + 8k, P + 8k + 8), block 4 runs to the end
    assert select_span(10, 45, 96, 8, 3, 0.0, 64) == Span(34, 42, 32)
    assert select_span(10, 45, 96, 8, 4, 0.0, 64) == Span(42, 96, 63)  # capped at S - 1
    assert select_span(10, 45, 96, 16, 1, 0.3, 64) == Span(26, 42, 16 + int(0.7 * 16))
    assert select_span(10, 45, 96, 8, 1, 0.5, None).snapshot is None
    with pytest.raises(ValueError, match="outside"):
        select_span(10, 45, 96, 8, 5, 0.5, 64)


def test_rank_table_offsets():
    pi = [3, 0, 2, 1]
    t = rank_table(pi, 12, 5)
    assert t.tolist() == [NEVER] * 5 + pi + [ALWAYS] * 3
    assert rank_table(pi, 12, 5, past_canvas="clean").tolist() == [NEVER] * 5 + pi + [NEVER] * 3
    # the official absolute indexing: a trajectory prompt of 3 tokens read at the training row's positions
    ref = rank_table(pi, 12, 5, trajectory_prompt_length=3, reference_offsets=True)
    assert ref.tolist() == [NEVER] * 3 + pi + [ALWAYS] * 5
    assert rank_table(pi, 6, 5, trajectory_prompt_length=3, reference_offsets=True) is None  # too long: fallback
    assert rank_table(None, 12, 5) is None


def test_views_are_complementary_with_clean_prefix_and_masked_future():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (3, 24), generator=g)
    # teacher blocks of 8: the first 8 answer positions are committed by forwards 0..7, the next by 8..15
    pis = [torch.cat([torch.randperm(8, generator=g), 8 + torch.randperm(8, generator=g)]).tolist() for _ in range(3)]
    ranks = torch.stack([rank_table(pi, 24, 8) for pi in pis])
    spans = [Span(8, 16, 3), None, Span(12, 24, None)]
    u = torch.rand(3, 24, generator=g)
    v = trajectory_views(ids, spans, ranks, mask_id=IDS.mask, ratios=[0.5, 0.5, 0.5], fallback_uniforms=u)
    assert not (v.mask & v.mask_rev).any()
    for i, span in enumerate(spans):
        if span is None:
            assert torch.equal(v.noisy[i], ids[i]) and torch.equal(v.noisy_rev[i], ids[i])
            assert not v.mask[i].any() and not v.mask_rev[i].any()
            continue
        a, e = span.start, span.end
        assert (v.mask[i, a:e] | v.mask_rev[i, a:e]).all() and not (v.mask[i] | v.mask_rev[i])[:a].any()
        assert torch.equal(v.noisy[i, :a], ids[i, :a]) and torch.equal(v.noisy_rev[i, :a], ids[i, :a])
        assert (v.noisy[i, e:] == IDS.mask).all() and (v.noisy_rev[i, e:] == IDS.mask).all()
        assert not v.mask[i, e:].any() and not v.mask_rev[i, e:].any()  # the future is input only
    # row 0: the teacher had committed exactly the positions of rank <= 3 at snapshot 3
    assert torch.equal(v.mask[0, 8:16], ranks[0, 8:16] > 3) and int((~v.mask[0, 8:16]).sum()) == 4
    # row 2 (no trajectory): Bernoulli masks at p = (1 - 1e-3) * 0.5 + 1e-3
    assert torch.equal(v.mask[2, 12:24], u[2, 12:24] < 0.5005)


def test_rows_do_not_depend_on_their_batch():
    obj = D3LLMObjective(IDS, 40, D3LLMRecipe(block_sizes="8,16"))
    ex = [
        {"prompt_ids": [5, 6, 7], "response_ids": list(range(10, 10 + n)), "rank": array("i", range(20))}
        for n in (4, 12, 19)
    ]
    ex[1].pop("rank")  # a row without trajectory
    batch = obj.collate(ex, torch.Generator().manual_seed(0))
    views, _ = obj.cut_views(batch, step=3, max_steps=10)
    for i in range(3):
        alone = {k: v[i : i + 1] for k, v in batch.items()}
        v1, _ = obj.cut_views(alone, step=3, max_steps=10)
        assert torch.equal(v1.noisy[0], views.noisy[i]) and torch.equal(v1.mask_rev[0], views.mask_rev[i])
    assert batch["full_lengths"].tolist() == [3 + 4 + 1, 3 + 12 + 1, 3 + 19 + 1]


# -- loss ------------------------------------------------------------------------------------------------


def _case(seed=0, v=30, b=2, n=16):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (b, n), generator=g)
    mask = torch.rand(b, n, generator=g) < 0.5
    mask[:, :2] = False
    mask_rev = ~mask
    mask_rev[:, :2] = False
    return torch.randn(b, n, v, generator=g), torch.randn(b, n, v, generator=g), labels, mask, mask_rev


def test_loss_formula_per_model():
    z, z2, y, m, m2 = _case()
    ce = torch.nn.functional.cross_entropy(z[m], y[m])
    ce2 = torch.nn.functional.cross_entropy(z2[m2], y[m2])

    def ent(logits, mask):
        sel = mask & (logits.argmax(-1) == y)
        p = torch.softmax(logits[sel] / 0.5, -1)
        return -(p * torch.log(p + 1e-12)).sum(-1).mean(), int(sel.sum())

    (h, n), (h2, n2) = ent(z, m), ent(z2, m2)
    assert n > 0 and n2 > 0
    llada = d3llm_loss(z, z2, y, m, m2, entropy_weight=2.0, entropy_views="first")
    torch.testing.assert_close(llada.total, (ce + ce2 + 2.0 * h) / 4)
    assert llada.num_correct == n and llada.num_correct_rev == 0 and float(llada.entropy_rev) == 0
    dream = d3llm_loss(z, z2, y, m, m2, entropy_weight=1.0, entropy_views="both")
    torch.testing.assert_close(dream.total, (ce + ce2 + h + h2) / 4)
    # LLaDA's entropy ignores view 2: only view 2's CE moves when view 2's logits change
    bumped = z2 + 3.0 * torch.nn.functional.one_hot(y, z2.shape[-1])
    a, b = d3llm_loss(z, bumped, y, m, m2), d3llm_loss(z, z2, y, m, m2)
    torch.testing.assert_close(a.entropy, b.entropy)
    assert float(a.ce_rev) < float(b.ce_rev)


def test_loss_zero_entropy_limit_and_empty_views():
    _, _, y, m, m2 = _case(v=20)
    sharp = 200.0 * torch.nn.functional.one_hot(y, 20).float()  # certain and correct everywhere
    out = d3llm_loss(sharp, sharp, y, m, m2, entropy_views="both")
    assert float(out.total) < 1e-6 and out.num_correct == int(m.sum()) and out.num_correct_rev == int(m2.sum())
    wrong = 200.0 * torch.nn.functional.one_hot((y + 1) % 20, 20).float()  # certain and wrong: CE only
    bad = d3llm_loss(wrong, wrong, y, m, m2, entropy_views="both")
    assert bad.num_correct == 0 and float(bad.entropy) == 0 and float(bad.total) == pytest.approx(100.0, rel=1e-4)
    z = torch.randn(2, 16, 20, requires_grad=True)
    empty = d3llm_loss(z, z, y, torch.zeros_like(m), m2)
    assert torch.isfinite(empty.total) and float(empty.ce.detach()) == 0
    empty.total.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_entropy_term_lowers_the_entropy_of_correct_predictions():
    z, z2, y, m, m2 = _case(seed=3)
    z = z + 2.0 * torch.nn.functional.one_hot(y, z.shape[-1])  # most masked positions predicted correctly
    sel = m & (z.argmax(-1) == y)
    assert int(sel.sum()) >= 4

    def entropy_after_a_step(weight: float) -> float:
        zz = z.clone().requires_grad_(True)
        d3llm_loss(zz, z2, y, m, m2, entropy_weight=weight).total.backward()
        assert zz.grad[~(m | m2)].abs().max() == 0  # no gradient off the loss positions
        p = torch.softmax((zz - 0.5 * zz.grad).detach()[sel] / 0.5, -1)
        return float(-(p * p.log()).sum(-1).mean())

    assert entropy_after_a_step(2.0) < entropy_after_a_step(0.0)


class _Shifted(torch.nn.Module):
    """A Dream-style model (token i predicted at i - 1) that returns fixed logits."""

    logit_shift = 1

    def __init__(self, logits):
        super().__init__()
        self.z = logits

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.z})()


def test_dream_objective_uses_next_token_logits():
    z, _, y, m, m2 = _case(v=60, n=12)
    views = type("V", (), {"noisy": y, "noisy_rev": y, "mask": m, "mask_rev": m2})()
    obj = build_objective("d3llm", "dream", IDS, 12, per_sequence=False)
    total, _ = obj.views_loss(_Shifted(z), y, views)
    shifted = torch.cat([z[:, :1], z[:, :-1]], dim=1)
    want = d3llm_loss(shifted, shifted, y, m, m2, entropy_weight=1.0, entropy_views="both")
    torch.testing.assert_close(total, want.total)


# -- curricula and recipes -------------------------------------------------------------------------------


def test_curricula_are_pure_functions_of_the_step():
    obj = build_objective("d3llm", "llada", IDS, 384)
    sizes = [obj.curricula(t, 600)[0] for t in range(600)]
    floors = [obj.curricula(t, 600)[1] for t in range(600)]
    assert sizes[0] == 16 and sizes[-1] == 32 and sizes == sorted(sizes)
    assert floors[0] == 0.0 and floors == sorted(floors) and floors[-1] < 0.8
    assert obj.curricula(137, 600) == obj.curricula(137, 600)  # no hidden state: a resumed run continues them
    assert curriculum_epoch(300, 600, 6) == 3.0 and block_size_at(3.0, parse_block_sizes("16,16,24,24,32,32")) == 24
    assert mask_ratio_floor(600, 600) == 0.8 and mask_ratio_floor(5, 0) == 0.0
    with pytest.raises(ValueError, match="positive integers"):
        parse_block_sizes("16,x")


def test_recipes_are_the_official_runs():
    llada, dream = recipe_for("d3llm", "llada"), recipe_for("d3llm", "dream")
    assert (llada.lr, llada.epochs, llada.schedule, llada.warmup_steps) == (2e-5, 6.0, "constant", 0)
    assert (dream.lr, dream.epochs, dream.schedule, dream.warmup_for(100)) == (2e-5, 3.0, "cosine", 5)
    obj = build_objective("d3llm", "llada", IDS, PAPER_MAX_LENGTH["llada"])
    assert type(obj) is D3LLMObjective is objective_class("d3llm", "llada")
    r = obj.recipe
    assert r.block_sizes == (16, 16, 24, 24, 32, 32) and r.max_mask_ratio == 0.8
    assert (r.entropy_weight, r.entropy_views, r.past_canvas, r.temperature) == (2.0, "first", "masked", 0.5)
    d = build_objective("d3llm", "dream", IDS, PAPER_MAX_LENGTH["dream"]).recipe
    assert (d.block_sizes, d.entropy_weight, d.entropy_views, d.past_canvas) == ((16, 24, 32), 1.0, "both", "clean")
    with pytest.raises(ValueError, match="no d3llm recipe for 'llada2'"):
        recipe_for("d3llm", "llada2")


def test_attach_trajectories_joins_on_ids():
    examples = [{"prompt_ids": [1], "response_ids": array("i", [7, 8])} for _ in range(3)]
    records = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    trajs = [{"id": "c", "commit_rank": [1, 0, 2], "prompt_tokens": 4}, {"id": "a", "commit_rank": [0, 1, 2]}]
    counts = attach_trajectories(examples, records, trajs)
    assert counts == {"with_trajectory": 2, "fallback": 1, "retokenized": 0}
    assert list(examples[2]["rank"]) == [1, 0, 2] and examples[2]["rank_prompt_length"] == 4
    assert "rank" not in examples[1]
    with pytest.raises(ValueError, match="twice"):
        attach_trajectories(examples, records, [*trajs, trajs[0]])
    own = [{"prompt_ids": [1], "response_ids": array("i", [7, 9])}]
    counts = attach_trajectories(own, [{"commit_rank": [0, 1], "response_ids": [7, 8]}])
    assert counts["retokenized"] == 1 and list(own[0]["response_ids"]) == [7, 8]  # the teacher's exact tokens


# -- fewstep distill --method d3llm ----------------------------------------------------------------------


def _distill(teacher, data, out, *extra):
    return [
        "distill", "--method", "d3llm", "--model", str(teacher), "--data", str(data), "--out", str(out),
        "--batch-size", "4", "--lr", "1e-3", "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


def test_distill_d3llm_lora(arith_teacher, trajectory_rollouts, tmp_path):
    out = tmp_path / "d3"
    assert main([*_distill(arith_teacher, trajectory_rollouts, out, "--lora-r", "4"), "--max-steps", "3"]) == 0
    info = json.loads((out / "training.json").read_text())
    hp = info["objective_hparams"]
    assert info["method"] == "d3llm" and info["steps"] == 3 and info["finetune"] == "lora"
    assert hp["block_sizes"] == [16, 16, 24, 24, 32, 32] and hp["entropy_views"] == "first"
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["block_size"] for r in log] == [16.0, 24.0, 32.0]  # epochs 0, 2, 4 of the list spread over 3 steps
    assert all(r["loss"] > 0 for r in log)
    assert "d3LLM" in (out / "README.md").read_text()
    base, student = fewstep.load_model(arith_teacher), fewstep.load_model(out)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in student.state_dict().items())


def test_distill_d3llm_refusals(arith_teacher, arith_rollouts, tmp_path, capsys):
    out = tmp_path / "x"
    assert main([*_distill(arith_teacher, arith_rollouts, out), "--max-steps", "1"]) == 2
    assert "no training record has a teacher trajectory" in capsys.readouterr().err
    dp = ["distill", "--method", "dparallel", "--model", str(arith_teacher), "--data", str(arith_rollouts)]
    assert main([*dp, "--out", str(out), "--trajectories", str(arith_rollouts), "--max-steps", "1"]) == 2
    assert "--trajectories applies to --method d3llm" in capsys.readouterr().err
    llada2 = REPO / "tests" / "fixtures" / "llada2-tiny-a"
    assert main(_distill(llada2, arith_rollouts, out, "--tokenizer", str(arith_teacher))) == 2
    assert "no d3llm recipe for 'llada2'" in capsys.readouterr().err


def test_distill_d3llm_joins_separate_trajectories(arith_teacher, arith_rollouts, trajectory_rollouts, tmp_path):
    out = tmp_path / "j"
    extra = ("--trajectories", str(trajectory_rollouts), "--lora-r", "2", "--max-steps", "1")
    assert main(_distill(arith_teacher, arith_rollouts, out, *extra)) == 0  # 12 of 48 ids have a trajectory


def test_sigkill_and_resume_reach_the_uninterrupted_state(arith_teacher, trajectory_rollouts, tmp_path):
    extra = ["--lora-r", "4", "--max-steps", "6", "--save-every", "2", "--log-every", "1"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main(_distill(arith_teacher, trajectory_rollouts, ref, *extra)) == 0
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "fewstep", *_distill(arith_teacher, trajectory_rollouts, out, *extra)]
    killed = subprocess.run(killed_at({"rename_to": "step-000004"}, *cmd[3:]), env=env, stdout=subprocess.DEVNULL)
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(x) for x in (f / "train_log.jsonl").read_text().splitlines()] for f in (ref, out)]
    assert [(r["loss"], r["block_size"], r["mask_ratio"]) for r in logs[0]] == [
        (r["loss"], r["block_size"], r["mask_ratio"]) for r in logs[1]
    ]


def test_dream_teacher_commits_the_lowest_entropy_mask_of_the_block_each_forward():
    """Dream's trajectory teacher: one commit per forward, the block's lowest-entropy masked position
    (entropy of the un-tempered next-token softmax, log(p + 1e-8)), blocks left to right."""
    dream = fewstep.load_model(REPO / "tests" / "fixtures" / "dream-tiny-a")
    prompt, g_len, block = list(range(3, 13)), 16, 8
    out = fewstep.generate(dream, [prompt], teacher_policy("dream", g_len), gen_length=g_len, block_length=block)
    pi = commit_rank(out.decode_step[0].tolist())
    assert sorted(pi) == list(range(g_len))
    final, mask_id = out.sequences[0], dream.config.mask_token_id
    p = len(prompt)
    for s in range(g_len):
        x = final.clone()
        x[p:][torch.tensor(pi) >= s] = mask_id  # the canvas before forward s
        with torch.no_grad():
            z = dream(input_ids=x[None]).logits[0]
        z = torch.cat([z[:1], z[:-1]])[p:]  # token i predicted at i - 1
        probs = torch.softmax(z, -1)
        h = -(probs * torch.log(probs + 1e-8)).sum(-1)
        lo = (s // block) * block  # the teacher decodes block by block, one token per forward
        cand = [j for j in range(lo, lo + block) if pi[j] >= s]
        assert pi.index(s) == min(cand, key=lambda j: (float(h[j]), j)), f"forward {s}"


def test_distill_d3llm_on_dream(arith_teacher, trajectory_rollouts, tmp_path):
    dream = REPO / "tests" / "fixtures" / "dream-tiny-a"  # vocabulary 512 covers the arith tokenizer's ids
    out = tmp_path / "dream"
    args = _distill(dream, trajectory_rollouts, out, "--tokenizer", str(arith_teacher), "--lora-r", "2")
    assert main([*args, "--max-steps", "2"]) == 0
    info = json.loads((out / "training.json").read_text())
    hp = info["objective_hparams"]
    assert (hp["block_sizes"], hp["entropy_weight"], hp["entropy_views"], hp["past_canvas"]) == (
        [16, 24, 32],
        1.0,
        "both",
        "clean",
    )
    assert info["schedule"] == "cosine"


def test_recorded_command_spells_block_sizes_as_the_flag_takes_them():
    """A model card's command must run again: the window curriculum is written ``4,4,6``, not a tuple repr."""
    import argparse

    from fewstep.commands.distill import command_line
    from fewstep.distill.d3llm import parse_block_sizes

    line = command_line(argparse.Namespace(method="d3llm", block_sizes=(4, 4, 6, 6, 8, 8), seed=0))
    assert "--block-sizes 4,4,6,6,8,8" in line
    assert parse_block_sizes(line.split("--block-sizes ")[1].split()[0]) == (4, 4, 6, 6, 8, 8)
