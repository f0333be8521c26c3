"""The ``fewstep`` lm-evaluation-harness model, offline: local YAML tasks over local JSONL, a tiny model.

The model is the tiny random LLaDA of ``tests/eval/conftest.py`` (the embedded task's word tokenizer)
with its weights redrawn at a larger scale, so that its predictions are sharp and context dependent:
its "correct" continuation is its own greedy one. Generation must be exactly what
:func:`fewstep.generate` gives for the same prompts and settings; the Monte Carlo likelihood must
converge to the exact ELBO and pick the greedy continuation of a multiple-choice question.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import fewstep
from fewstep.eval.lm_eval import FewstepLM, exact_elbo, mask_counts, mc_log_likelihood, mc_loss_samples
from fewstep.eval.lm_eval.__main__ import lm_eval_argv
from fewstep.tasks import arith

lm_eval = pytest.importorskip("lm_eval")

GEN_LENGTH, BLOCK = 16, 8
UNTIL = ["="]
# One end-of-turn token after the messages stands for an assistant header (the tokenizer's vocabulary is closed).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<|eot_id|>{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint with redrawn weights (std 1/sqrt(fan_in), head x3) and a chat template."""
    from fewstep.models.loading import save_model

    d = tmp_path_factory.mktemp("sharp-tiny")
    model = fewstep.load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(
                    torch.randn(p.shape, generator=g) * (3.0 if name == "ff_out.weight" else 1.0) / p.shape[1] ** 0.5
                )
            else:
                p.fill_(1.0)
    save_model(model, d)
    for f in tiny_model_dir.glob("tok*"):
        shutil.copy(f, d / f.name)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def loaded(model_dir):
    return fewstep.load_model(model_dir), fewstep.load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def problems():
    return arith.generate_problems("test", 6, seed=0)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, problems):
    """A generate_until task over six embedded-task problems (local JSONL + YAML)."""
    d = tmp_path_factory.mktemp("lm-eval-tasks")
    data = d / "arith.jsonl"
    data.write_text("".join(json.dumps(p.to_json()) + "\n" for p in problems))
    (d / "fewstep_arith_gen.yaml").write_text(
        f"task: fewstep_arith_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{gold}}"\n'
        f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n  max_gen_toks: {GEN_LENGTH}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return d


def task_manager(*dirs):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(d) for d in dirs], include_defaults=False)


def reference(model, tok, prompts: list[str], policy: str, chat: bool = False):
    """What fewstep.generate gives for each prompt alone, cut and decoded as the adapter documents."""
    out = []
    for text in prompts:
        if chat:
            text = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        ids = tok(text, add_special_tokens=False)["input_ids"]
        gen = fewstep.generate(
            model, [ids], policy, gen_length=GEN_LENGTH, block_length=BLOCK, tokenizer=tok, early_stop=True
        )
        answer = gen.answers[0].tolist()
        stops = fewstep.decoding.stop_ids(model, tok)
        cut = next((i for i, t in enumerate(answer) if t in stops), len(answer))
        raw = tok.decode(answer[:cut], skip_special_tokens=True)
        out.append((raw.split(UNTIL[0])[0], raw, int(gen.nfe[0])))
    return out


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_generate_until_is_fewstep_generate(model_dir, loaded, problems, task_dir, tmp_path, chat):
    model, tok = loaded
    stats = tmp_path / "stats.jsonl"
    lm = FewstepLM(
        pretrained=str(model_dir), policy="threshold:0.5", block_length=BLOCK, batch_size=4, stats_path=str(stats)
    )
    res = lm_eval.simple_evaluate(
        model=lm, tasks=["fewstep_arith_gen"], task_manager=task_manager(task_dir), apply_chat_template=chat
    )
    samples = sorted(res["samples"]["fewstep_arith_gen"], key=lambda s: s["doc_id"])
    ref = reference(model, tok, [p.prompt for p in problems], "threshold:0.5", chat=chat)
    # batches of 4 left-padded prompts give each prompt exactly what it gets alone
    assert [s["resps"][0][0] for s in samples] == [r[0] for r in ref]
    assert any(raw != cut for cut, raw, _ in ref), "the stop string should cut at least one answer"
    if chat:  # the template really reached the model
        assert ref != reference(model, tok, [p.prompt for p in problems], "threshold:0.5")
    # per-request NFE, in the stats file, the adapter's summary and lm-eval's results config
    by_doc = {s["doc_id"]: s for s in lm.generation_stats}
    assert [by_doc[i]["nfe"] for i in range(len(problems))] == [r[2] for r in ref]
    # NFE is per request: it varies, and early stop ends some requests before the full length
    assert len({r[2] for r in ref}) > 1 and any(r[2] < GEN_LENGTH for r in ref)
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    assert sorted(x["nfe"] for x in lines) == sorted(r[2] for r in ref)
    assert all(x["latency_s"] > 0 and x["batch_rows"] in (2, 4) for x in lines)
    info = res["config"]["fewstep"]
    assert info["generate_until"]["mean_nfe"] == pytest.approx(sum(r[2] for r in ref) / len(ref))
    assert info["policy_spec"] == "threshold:0.5" and info["batch_size"] == 4


def greedy_and_worst(model, tok, prompt: str, length: int = 2) -> tuple[str, str]:
    """The model's greedy continuation (LLaDA's one-token-per-step decode) and the continuation made
    of the least likely word at each position given the prompt."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    greedy = fewstep.generate(model, [ids], f"llada:steps={length}", gen_length=length, block_length=length).answers[0]
    x = torch.tensor([ids + [model.config.mask_token_id] * length])
    logits = model.denoise(x, None, logits_start=len(ids), logits_end=len(ids) + length).logits[0]
    n_special = len(tok.all_special_tokens)  # the word tokenizer puts its special tokens first
    worst = logits[:, n_special : len(tok)].argmin(-1) + n_special
    return tok.decode(greedy.tolist()), tok.decode(worst.tolist())


def test_loglikelihood_picks_the_greedy_continuation(model_dir, loaded, problems, tmp_path):
    model, tok = loaded
    docs = []
    for i, p in enumerate(problems[:4]):
        good, bad = greedy_and_worst(model, tok, p.prompt)
        docs.append({"prompt": p.prompt, "choices": [good, bad] if i % 2 else [bad, good], "answer": 0 if i % 2 else 1})
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "fewstep_arith_mc.yaml").write_text(
        f"task: fewstep_arith_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_choice: choices\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n"
    )
    lm = FewstepLM(pretrained=str(model_dir), mc_num=32, mc_batch_size=16)
    res = lm_eval.simple_evaluate(model=lm, tasks=["fewstep_arith_mc"], task_manager=task_manager(tmp_path))
    assert res["results"]["fewstep_arith_mc"]["acc,none"] == 1.0
    for s in res["samples"]["fewstep_arith_mc"]:
        greedy = [r[0][1] for r in s["resps"]]
        assert greedy[s["target"]] and not greedy[1 - s["target"]]  # LLaDA's is_greedy check
    assert lm.likelihood_stats["requests"] == 8


def test_mc_estimate_converges_to_the_exact_elbo(loaded, problems):
    model, tok = loaded
    prompt = tok(problems[0].prompt, add_special_tokens=False)["input_ids"]
    answer = tok("3 + 4", add_special_tokens=False)["input_ids"]
    exact = exact_elbo(model, prompt, answer)
    samples = mc_loss_samples(
        model, prompt, answer, mc_num=512, batch_size=16, generator=torch.Generator().manual_seed(0)
    )
    se = float(samples.std()) / len(samples) ** 0.5
    assert abs(-float(samples.mean()) - exact) < 4 * se
    assert se < 0.05 * abs(exact)  # the comparison is tight, not vacuous
    # a one-token answer is always fully masked: the estimate is exactly log p(token | prompt, mask)
    one = answer[:1]
    logits = model.denoise(torch.tensor([[*prompt, model.config.mask_token_id]]), None, logits_start=len(prompt)).logits
    assert mc_log_likelihood(model, prompt, one, mc_num=4, batch_size=4) == pytest.approx(
        float(logits[0, 0].log_softmax(-1)[one[0]]), abs=1e-5
    )


def test_dream_likelihood_uses_the_shifted_logits():
    """Dream predicts position i from the logits at i - 1; the estimator takes that from the model."""
    from tests.parity.fixtures import DEFAULT_DIRS, model, oracles

    dream = model(DEFAULT_DIRS[1])
    assert dream.logit_shift == 1
    prompt, answer = oracles(DEFAULT_DIRS[1])["prompts"]["p1"][:6], [7]
    x = torch.tensor([[*prompt, dream.config.mask_token_id]])
    raw = dream(x).logits[0, len(prompt) - 1]  # raw (unshifted) logits of the last prompt position
    assert mc_log_likelihood(dream, prompt, answer, mc_num=2, batch_size=2) == pytest.approx(
        float(raw.float().log_softmax(-1)[7]), abs=1e-5
    )


def test_mask_counts_are_stratified_and_uniform_per_row():
    A, rows = 7, 4
    table = [mask_counts(k, A, rows) for k in range(1, A + 1)]
    for r in range(rows):  # over k ~ U{1..A}, every row's count is uniform on 1..A
        assert sorted(t[r] for t in table) == list(range(1, A + 1))
    assert mask_counts(1, A, rows) == [1, 3, 5, 6]  # offsets round(r * 7 / 4) = 0, 2, 4, 5
    with pytest.raises(ValueError):
        mask_counts(0, A, rows)


def test_launcher_runs_lm_eval_cli(task_dir, tmp_path, monkeypatch):
    """`fewstep lm-eval ...` registers the model and runs lm-eval's own CLI (built-in tasks not indexed here,
    only to save the ~10 s it takes to scan them); ``pretrained=teacher`` names the shipped teacher, resolved
    like every other model argument."""
    import lm_eval.tasks

    from fewstep.cli import main

    class LocalOnly(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            kwargs["include_defaults"] = False
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalOnly)
    out = tmp_path / "out"
    code = main(
        ["lm-eval", "--model_args", f"pretrained=teacher,policy=cad:threshold=0.8;max_tokens=4,cache=dual,block_length={BLOCK}",
         "--tasks", "fewstep_arith_gen", "--include_path", str(task_dir), "--limit", "2", "--batch_size", "2",
         "--output_path", str(out)]
    )  # fmt: skip
    assert code == 0
    (result,) = out.glob("**/results_*.json")
    info = json.loads(result.read_text())["config"]["fewstep"]
    assert info["policy"] == "cad:threshold=0.8,max_tokens=4" and info["cache"] == "dual"
    assert info["generate_until"]["requests"] == 2 and info["pretrained"] == "teacher"


DIST_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
import lm_eval
from lm_eval.tasks import TaskManager
from fewstep.eval.lm_eval import FewstepLM
model_dir, task_dir, out = sys.argv[1:4]
lm = FewstepLM(pretrained=model_dir, policy="threshold:0.5", block_length=8, batch_size=2, stats_path=out + "/stats.jsonl")
tm = TaskManager(include_path=task_dir, include_defaults=False)
res = lm_eval.simple_evaluate(model=lm, tasks=["fewstep_arith_gen"], task_manager=tm)
if res is not None:  # rank 0 gathers every rank's samples
    samples = {s["doc_id"]: s["resps"][0][0] for s in res["samples"]["fewstep_arith_gen"]}
    json.dump({"world_size": lm.world_size, "samples": samples}, open(out + "/rank0.json", "w"))
"""


@pytest.mark.slow
def test_two_processes_under_accelerate_shard_the_documents(model_dir, loaded, problems, task_dir, tmp_path):
    """Two CPU processes (torchrun + accelerate, gloo): each generates its rank's share, rank 0 gets all."""
    import os
    import subprocess
    import sys

    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(
        [*cmd, str(model_dir), str(task_dir), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got["world_size"] == 2
    model, tok = loaded
    ref = reference(model, tok, [p.prompt for p in problems], "threshold:0.5")
    assert [got["samples"][str(i)] for i in range(len(problems))] == [r[0] for r in ref]
    per_rank = [len((tmp_path / f"stats.rank{r}.jsonl").read_text().splitlines()) for r in (0, 1)]
    assert per_rank == [3, 3]


def test_launcher_argv():
    assert lm_eval_argv(["--tasks", "gsm8k"]) == ["lm-eval", "--tasks", "gsm8k", "--model", "fewstep"]
    assert lm_eval_argv(["run", "--model", "hf"], "T") == ["lm-eval", "run", "--model", "hf", "--include_path", "T"]
    assert lm_eval_argv(["ls", "tasks"], "T") == ["lm-eval", "ls", "tasks", "--include_path", "T"]
    assert lm_eval_argv(["--tasks", "x", "--include_path=/mine"], "T")[-2:] == ["--model", "fewstep"]
    assert lm_eval_argv(["run", "--help"], "T") == ["lm-eval", "run", "--help"]


@pytest.mark.parametrize(
    ("task", "protocol", "chat"), [("gsm8k_dparallel", "dparallel", True), ("gsm8k_fewstep", "fastdllm-5shot", False)]
)
def test_shipped_gsm8k_tasks_prompt_like_fewstep_eval(model_dir, task, protocol, chat):
    """fewstep's offline GSM8K task files give lm-eval the prompts of `fewstep eval --protocol ...`."""
    from fewstep.eval import get_protocol, get_task
    from fewstep.eval.lm_eval import TASKS_DIR

    lm = FewstepLM(pretrained=str(model_dir), block_length=BLOCK, gen_length=GEN_LENGTH, batch_size=2)
    res = lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=task_manager(TASKS_DIR), limit=2, apply_chat_template=chat
    )
    records = get_task("gsm8k").eval_records(2)
    for s in res["samples"][task]:
        want = get_protocol("gsm8k", protocol)(records[s["doc_id"]]).render(lm.tokenizer)
        assert s["arguments"][0][0] == want
        assert s["arguments"][0][1]["until"] == ["Question:", "</s>", "<|im_end|>"]
    assert {s["doc_id"] for s in res["samples"][task]} == {0, 1}  # (one sample per document and filter)
    assert "exact_match,flexible-extract" in res["results"][task]


def test_bad_arguments_fail_with_a_clear_message(model_dir, loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="unknown argument"):
        FewstepLM(pretrained=str(model_dir), polcy="threshold")
    with pytest.raises(ValueError, match="cache must be one of"):
        FewstepLM(model=model, tokenizer=tok, cache="full")
    with pytest.raises(ValueError, match="unknown policy"):
        FewstepLM(model=model, tokenizer=tok, policy="bogus:1")
    with pytest.raises(ValueError, match="batch_size auto"):
        FewstepLM(model=model, tokenizer=tok, batch_size="auto")
    with pytest.raises(ValueError, match="multiple of mc_batch_size"):
        FewstepLM(model=model, tokenizer=tok, mc_num=20, mc_batch_size=16)
    lm = FewstepLM(model=model, tokenizer=tok, gen_length=20, block_length=8)
    with pytest.raises(ValueError, match="not a multiple of block_length"):
        lm.generate_until([_Req(("7 - 2 ?", {"until": ["="]}))], disable_tqdm=True)
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([_Req(("7 - 2 ?",))])


class _Req:
    """The part of lm-eval's Instance the adapter reads."""

    def __init__(self, args):
        self.args = args
