"""lm-eval's own API models (``local-completions``, ``local-chat-completions``) against the server.

A local YAML task over the first problems of the embedded ``arith`` test split, scored by the task's
verifier, must give the same accuracy, problem by problem, as ``fewstep eval`` (the library's
:func:`run_eval`) with the same policy and geometry.
"""

from __future__ import annotations

import json

import pytest

from fewstep.assets import resolve_model
from fewstep.eval.runner import EvalSettings, run_eval
from fewstep.tasks import arith

lm_eval = pytest.importorskip("lm_eval")

N, POLICY = 24, "threshold:0.9"  # dparallel gets some problems wrong with it (73.6 %), so the comparison can fail
UTILS = """
from fewstep.tasks import arith


def process_results(doc, results):
    return {"acc": float(arith.verify(doc["prompt"], results[0]).correct)}
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-lm-eval")
    data = d / "arith.jsonl"
    data.write_text("".join(json.dumps(p.to_json()) + "\n" for p in arith.generate_problems("test", 512, seed=0)[:N]))
    (d / "utils.py").write_text(UTILS)
    (d / "fewstep_serve_arith.yaml").write_text(
        f"task: fewstep_serve_arith\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{gold}}"\n'
        "process_results: !function utils.process_results\n"
        "generation_kwargs:\n  until: []\n  max_gen_toks: 64\n  do_sample: false\n"
        f'  policy: "{POLICY}"\n  block_length: 8\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return d


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """``fewstep eval --model dparallel --task arith --policy threshold:0.9 --gen-length 64 --block-length 8 --limit N``."""
    out = tmp_path_factory.mktemp("eval-out")
    settings = EvalSettings(
        model=str(resolve_model("dparallel")),
        task="arith",
        policy=POLICY,
        gen_length=64,
        block_length=8,
        batch_size=8,
        limit=N,
        out=str(out),
        progress=False,
    )
    summary = run_eval(settings)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return summary, {r["id"]: r for r in records}


@pytest.mark.parametrize("model", ["local-completions", "local-chat-completions"])
def test_lm_eval_api_models_match_fewstep_eval(server, task_dir, library, model):
    from lm_eval.tasks import TaskManager

    endpoint = "/v1/chat/completions" if model == "local-chat-completions" else "/v1/completions"
    args = {
        "base_url": server.url + endpoint,
        "model": "dparallel",
        "tokenizer_backend": None,
        "tokenized_requests": False,
        "num_concurrent": 8,
        "max_retries": 1,
    }
    res = lm_eval.simple_evaluate(
        model=model,
        model_args=args,
        tasks=["fewstep_serve_arith"],
        apply_chat_template="chat" in model,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
    )
    summary, records = library
    acc = res["results"]["fewstep_serve_arith"]["acc,none"]
    assert 0 < summary["accuracy"] < 1 and acc == pytest.approx(summary["accuracy"])
    samples = sorted(res["samples"]["fewstep_serve_arith"], key=lambda s: s["doc_id"])
    by_order = [records[p.id] for p in arith.generate_problems("test", 512, seed=0)[:N]]
    assert [s["resps"][0][0] for s in samples] == [r["response"] for r in by_order]
