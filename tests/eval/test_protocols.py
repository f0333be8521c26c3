"""Prompt protocols: the exact strings of the papers' evaluations, and chat-template rendering."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from fewstep.decoding.text import cut_at_stop
from fewstep.eval import protocols
from fewstep.eval.benchmarks import TASKS, get_task
from fewstep.eval.protocols import Prompt, get_protocol


class FakeChatTokenizer:
    """Renders like LLaDA's template (always appends the assistant header)."""

    chat_template = "llada-like"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert tokenize is False
        out = "<|startoftext|>"
        for m in messages:
            out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_every_task_has_a_default_protocol_that_builds():
    for name in ("gsm8k", "math500", "humaneval", "mbpp", "mbpp-sanitized"):
        task = get_task(name)
        assert "dparallel" in task.protocols
        for proto in task.protocols.values():
            prompt = proto(task.records[0])
            assert isinstance(prompt, Prompt) and (prompt.text or prompt.messages)


def test_gsm8k_strings():
    rec = get_task("gsm8k").records[0]
    q = rec["question"]
    p = get_protocol("gsm8k")(rec)
    assert p.messages == (
        {
            "role": "user",
            "content": f"Question: {q}\nAnswer: Please reason step by step, and put your final answer within \\boxed{{}}.",
        },
    )
    assert p.stop == ("Question:", "</s>", "<|im_end|>")
    dream = get_protocol("gsm8k", "dparallel-dream")(rec)
    assert dream.messages[0]["content"] == f"Q: {q}\nA: Let's think step by step."
    cd = get_protocol("gsm8k", "cd4lm")(rec)
    assert cd.messages is None
    assert cd.text == (
        "You are a math expert. You will be given a question to solve. Solve it step by step. Wrap the final "
        "answer in a \\boxed{}. \nRespond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
        f"<answer>\n\\boxed{{...}}\n</answer>\n\n{q}\n\n"
    )


def test_gsm8k_5shot_follows_lm_eval_sampler():
    task = get_task("gsm8k")
    p0 = get_protocol("gsm8k", "fastdllm-5shot")(task.records[0])
    assert p0.text.count("Question: ") == 6 and p0.text.endswith(f"Question: {task.records[0]['question']}\nAnswer:")
    samplers = pytest.importorskip("lm_eval.api.samplers")
    from fewstep.eval import datasets

    train = datasets.load_gsm8k("train")
    sampler = samplers.ContextSampler(train, rnd=1234)
    for rec in task.records[:3]:
        shots = sampler.sample(5)
        expected = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        assert get_protocol("gsm8k", "fastdllm-5shot")(rec).text.startswith(expected)


def _lm_eval_task_file(*parts):
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        pytest.skip("lm-eval is not installed")
    return Path(spec.origin).parent.joinpath("tasks", *parts)


def _literal_function_result(path: Path, name: str):
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.literal_eval(fn.body[0].value)


def test_mbpp_3shot_exemplars_match_lm_eval():
    lm = _literal_function_result(_lm_eval_task_file("mbpp", "utils.py"), "list_fewshot_samples")
    ours = protocols._mbpp_fewshot()
    assert [r["task_id"] for r in ours] == [d["task_id"] for d in lm] == [2, 3, 4]
    for a, b in zip(ours, lm):
        assert (a["code"], a["test_list"]) == (b["code"], b["test_list"])
    rec = get_task("mbpp").get(11)
    content = get_protocol("mbpp")(rec).messages[0]["content"]
    first = (
        f"You are an expert Python programmer, and here is your task: {lm[0]['text']} Your code should pass these "
        f"tests:\n\n{lm[0]['test_list'][0]}\n{lm[0]['test_list'][1]}\n{lm[0]['test_list'][2]}\n[BEGIN]\n{lm[0]['code']}\n[DONE]"
    )
    assert content.startswith(first)
    assert content.endswith(f"{rec['test_list'][2]}\n[BEGIN]\n")
    assert content.count("[DONE]") == 3


def test_minerva_exemplars_match_lm_eval():
    lm = _literal_function_result(_lm_eval_task_file("minerva_math", "utils.py"), "list_fewshot_samples")
    ours = protocols._minerva_exemplars()
    assert [(e["problem"], e["solution"]) for e in ours] == [(d["problem"], d["solution"]) for d in lm]
    rec = get_task("math500").records[0]
    content = get_protocol("math500")(rec).messages[0]["content"]
    assert content.startswith(f"Problem:\n{lm[0]['problem']}\n\nSolution: {lm[0]['solution']}\n\nProblem:\n")
    assert content.endswith(f"Problem:\n{rec['problem']}\n\nSolution:")


def test_code_strings():
    rec = get_task("humaneval").get("HumanEval/0")
    p = get_protocol("humaneval")(rec)
    assert p.messages[0]["content"] == (
        "Write a solution to the following problem and make sure that it passes the tests:\n"
        f"```python\n{rec['prompt']}\n```\n "
    )
    dream = get_protocol("humaneval", "dparallel-dream")(rec)
    assert dream.gen_prefix == f"Here is the completed function:\n```python\n{rec['prompt']}\n"
    cd = get_protocol("humaneval", "cd4lm")(rec)
    assert "The complete implementation  of the has_close_elements function" in cd.text
    assert get_protocol("humaneval", "completion")(rec).text == rec["prompt"]
    srec = get_task("mbpp-sanitized").records[0]
    assert srec["prompt"] in get_protocol("mbpp-sanitized", "cd4lm")(srec).text


def test_render_applies_the_chat_template_then_the_prefix():
    rec = get_task("humaneval").get("HumanEval/0")
    p = get_protocol("humaneval", "dparallel-dream")(rec)
    text = p.render(FakeChatTokenizer())
    assert text.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWrite a solution")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n" + p.gen_prefix)
    raw = get_protocol("humaneval", "cd4lm")(rec)
    assert raw.render() == raw.text
    with pytest.raises(ValueError, match="chat template"):
        p.render(None)


def test_cut_at_stop_and_unknown_protocol():
    assert cut_at_stop("answer 5\nQuestion: next", ("Question:", "</s>")) == "answer 5\n"
    assert cut_at_stop("no stop", ("[DONE]",)) == "no stop"
    with pytest.raises(ValueError, match="unknown prompt protocol"):
        get_protocol("gsm8k", "nope")
    assert set(TASKS) >= {"gsm8k", "math500", "humaneval", "mbpp", "mbpp-sanitized"}


def test_answer_prefix_protocols_score_end_to_end():
    """With a gen_prefix, scoring sees prefix + generated text; the gold completions must pass."""
    from fewstep.eval.scoring import score

    he = get_task("humaneval")
    rec = he.get("HumanEval/2")
    p = get_protocol("humaneval", "dparallel-dream")(rec)
    he_resp = p.gen_prefix + cut_at_stop(rec["canonical_solution"] + "\n```\nThis works.", p.stop)
    mb = get_task("mbpp")
    mrec = mb.get(11)
    q = get_protocol("mbpp", "dparallel-dream")(mrec)
    mb_resp = q.gen_prefix + cut_at_stop(mrec["code"] + "\n```\nDone.", q.stop)
    assert [s.passed for s in score(he, [(rec, he_resp)])] == [True]
    assert [s.passed for s in score(mb, [(mrec, mb_resp)])] == [True]
