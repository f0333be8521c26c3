"""Prompt protocols: how each seed paper turns a benchmark record into the model's input.

A protocol builds a :class:`Prompt` (chat messages for instruct checkpoints, or raw text), the
``gen_prefix`` the answer starts with, and the stop strings the paper cuts the answer at. Rendering
with a tokenizer's chat template is the separate, small step :meth:`Prompt.render`. The exact
strings come from the papers' evaluation code (``algorithms.md`` §3.9 and §4.9, lm-evaluation-harness
task files); ``docs/evaluation.md`` lists every protocol with its source.

Names: ``dparallel`` (dParallel on LLaDA: lm-eval tasks inside the chat template; the default),
``dparallel-dream`` (dParallel on Dream), ``cd4lm`` (CD4LM: raw text, no chat template),
``fastdllm-5shot`` (GSM8K 5-shot, Fast-dLLM) and ``completion`` (HumanEval plain completion for base
models).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from fewstep.eval import datasets

# The text layer (``fewstep.decoding.text``) is imported where it is used: it pulls in torch, and
# ``fewstep.eval`` (the sandbox and scoring above all) must import without it.


@dataclass(frozen=True)
class Prompt:
    """The model input for one record.

    Exactly one of ``messages`` (chat turns; apply the tokenizer's chat template) and ``text`` (raw
    prompt, no template) is set. ``gen_prefix`` is appended after the rendered prompt: the model
    continues it, and scoring sees ``gen_prefix + generated text``. ``stop``: cut the generated text
    at the first of these strings.
    """

    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None
    gen_prefix: str = ""
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.text is None):
            raise ValueError("a Prompt has either chat messages or raw text")

    @property
    def chat(self) -> bool:
        return self.messages is not None

    def render(self, tokenizer: Any = None) -> str:
        """The prompt string: the chat template applied to the messages (or the raw text), plus ``gen_prefix``."""
        from fewstep.decoding.text import has_chat_template, render

        if self.messages is not None and not has_chat_template(tokenizer):
            raise ValueError("this prompt protocol uses a chat template, but the tokenizer has none")
        prompt = self.text if self.messages is None else list(self.messages)
        return render(tokenizer, prompt, chat=self.messages is not None, prefix=self.gen_prefix)


@dataclass(frozen=True)
class Protocol:
    """A named way of prompting one task."""

    name: str
    task: str
    description: str
    source: str
    build: Callable[[dict[str, Any]], Prompt] = field(repr=False)

    def __call__(self, record: dict[str, Any]) -> Prompt:
        return self.build(record)


def _user(content: str, **kw: Any) -> Prompt:
    return Prompt(messages=({"role": "user", "content": content},), **kw)


# ----------------------------------------------------------------------------------------- strings

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CD4LM_MATH_SYSTEM = (
    "You are a math expert. You will be given a question to solve. Solve it step by step. "
    "Wrap the final answer in a \\boxed{}. \nRespond in the following format:\n<reasoning>\nYour reasoning here\n"
    "</reasoning>\n<answer>\n\\boxed{...}\n</answer>"
)
CODE_INSTRUCTION = "Write a solution to the following problem and make sure that it passes the tests:\n"
CD4LM_CODE_FORMAT = (
    "First, reason about the solution step-by-step. Then, write the code.\nRespond in the following format:\n"
    "<reasoning>\nYour reasoning here\n</reasoning>\n<answer>\n```python\n{what}\n```\n</answer>"
)
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")
HUMANEVAL_COMPLETION_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_FEWSHOT_IDS = (2, 3, 4)  # the MBPP paper's 3-shot prompt (lm-eval's mbpp task)
GSM8K_FEWSHOT_SEED = 1234  # lm-eval's default few-shot seed


# ------------------------------------------------------------------------------------------- gsm8k


def _gsm8k_dparallel(r: dict[str, Any]) -> Prompt:
    return _user(f"Question: {r['question']}\nAnswer: {BOXED_INSTRUCTION}", stop=GSM8K_STOP)


def _gsm8k_dream(r: dict[str, Any]) -> Prompt:
    return _user(f"Q: {r['question']}\nA: Let's think step by step.", stop=("Q:", "</s>", "<|im_end|>"))


def _math_cd4lm(question: str) -> Prompt:
    return Prompt(text=f"{CD4LM_MATH_SYSTEM}\n\n{question}\n\n")


@cache
def _gsm8k_fewshot_draws() -> dict[int, tuple[int, ...]]:
    """lm-eval's default sampler: one ``Random(1234).sample(train, 5)`` draw per test record, in test order."""
    train_size = len(datasets.load_gsm8k("train"))
    test_size = len(datasets.load_gsm8k("test"))
    rnd = random.Random(GSM8K_FEWSHOT_SEED)
    return {i: tuple(rnd.sample(range(train_size), 5)) for i in range(test_size)}


@cache
def _gsm8k_train() -> list[dict[str, Any]]:
    return datasets.load_gsm8k("train")


def _gsm8k_5shot(r: dict[str, Any]) -> Prompt:
    train = _gsm8k_train()
    shots = [train[i] for i in _gsm8k_fewshot_draws()[r["id"]]]
    context = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return Prompt(text=f"{context}Question: {r['question']}\nAnswer:", stop=GSM8K_STOP)


# ------------------------------------------------------------------------------------------- math


@cache
def _minerva_exemplars() -> list[dict[str, str]]:
    with datasets.data_path("prompts/minerva_math_4shot.json").open(encoding="utf-8") as f:
        return json.load(f)["exemplars"]


def _minerva_question(problem: str) -> str:
    return f"Problem:\n{problem}\n\nSolution:"


def _math_dparallel(r: dict[str, Any]) -> Prompt:
    shots = "".join(f"{_minerva_question(e['problem'])} {e['solution']}\n\n" for e in _minerva_exemplars())
    return _user(shots + _minerva_question(r["problem"]), stop=("Problem:",))


def _math_dream(r: dict[str, Any]) -> Prompt:
    return _user(_minerva_question(r["problem"]), stop=("Problem:",))


# -------------------------------------------------------------------------------------------- code


def _humaneval_dparallel(r: dict[str, Any]) -> Prompt:
    return _user(f"{CODE_INSTRUCTION}```python\n{r['prompt']}\n```\n ")


def _humaneval_dream(r: dict[str, Any]) -> Prompt:
    return _user(
        f"{CODE_INSTRUCTION}```python\n{r['prompt']}\n```\n",
        gen_prefix=f"Here is the completed function:\n```python\n{r['prompt']}\n",
        stop=HUMANEVAL_COMPLETION_STOP,
    )


def _humaneval_cd4lm(r: dict[str, Any]) -> Prompt:
    what = f"The complete implementation  of the {r['entry_point']} function"  # two spaces, as in CD4LM
    return Prompt(text=f"{CODE_INSTRUCTION}{r['prompt']}\n\n{CD4LM_CODE_FORMAT.format(what=what)}")


def _humaneval_completion(r: dict[str, Any]) -> Prompt:
    return Prompt(text=r["prompt"], stop=HUMANEVAL_COMPLETION_STOP)


def _mbpp_text(r: dict[str, Any]) -> str:
    return r["text"] if "text" in r else r["prompt"]


def _mbpp_question(r: dict[str, Any]) -> str:
    t = r["test_list"]
    return (
        f"You are an expert Python programmer, and here is your task: {_mbpp_text(r)} "
        f"Your code should pass these tests:\n\n{t[0]}\n{t[1]}\n{t[2]}\n[BEGIN]\n"
    )


@cache
def _mbpp_fewshot() -> list[dict[str, Any]]:
    by_id = {r["task_id"]: r for r in datasets.load_mbpp("prompt")}
    return [by_id[i] for i in MBPP_FEWSHOT_IDS]


def _mbpp_dparallel(r: dict[str, Any]) -> Prompt:
    shots = "\n\n".join(f"{_mbpp_question(s)}{s['code']}\n[DONE]" for s in _mbpp_fewshot())
    return _user(f"{shots}\n\n{_mbpp_question(r)}", stop=("[DONE]",))


def _mbpp_dream(r: dict[str, Any]) -> Prompt:
    t = r["test_list"]
    return _user(
        f"You are an expert Python programmer, and here is your task:\n{_mbpp_text(r)}\n"
        f"Your code should pass these tests:\n{t[0]}\n{t[1]}\n{t[2]}",
        gen_prefix="Here is the completed function:\n```python\n",
        stop=("```",),
    )


def _mbpp_cd4lm(r: dict[str, Any]) -> Prompt:
    t = r["test_list"]
    what = "The complete implementation of the function"
    return Prompt(
        text=f"{CODE_INSTRUCTION}{_mbpp_text(r)} Your code should pass these tests:\n\n{t[0]}\n{t[1]}\n{t[2]}\n\n"
        f"{CD4LM_CODE_FORMAT.format(what=what)}",
        stop=("[DONE]",),
    )


# ---------------------------------------------------------------------------------------- registry

_DP = "dParallel (arXiv 2509.26488) LLaDA evaluation: lm-eval 0.4.8"
_DPD = "dParallel Dream evaluation (forked lm-eval 0.4.8, --apply_chat_template)"
_CD = "CD4LM evaluation (evaluation/dllm_eval, no chat template)"

_SPECS: list[tuple[str, str, str, str, Callable[[dict[str, Any]], Prompt]]] = [
    (
        "gsm8k",
        "dparallel",
        "0-shot, chat: 'Question: {q}\\nAnswer: Please reason step by step, ... \\boxed{}.'",
        f"{_DP} gsm8k",
        _gsm8k_dparallel,
    ),
    (
        "gsm8k",
        "dparallel-dream",
        "0-shot CoT, chat: 'Q: {q}\\nA: Let's think step by step.'",
        f"{_DPD} gsm8k_cot_zeroshot",
        _gsm8k_dream,
    ),
    (
        "gsm8k",
        "cd4lm",
        "0-shot, raw text: math-expert system text + question",
        _CD,
        lambda r: _math_cd4lm(r["question"]),
    ),
    (
        "gsm8k",
        "fastdllm-5shot",
        "5-shot, raw text: lm-eval gsm8k, exemplars drawn from train with seed 1234",
        "Fast-dLLM llada/eval_gsm8k.sh (lm-eval gsm8k, 5-shot)",
        _gsm8k_5shot,
    ),
    ("math500", "dparallel", "4-shot Minerva prompt inside the chat template", f"{_DP} minerva_math", _math_dparallel),
    (
        "math500",
        "dparallel-dream",
        "0-shot, chat: 'Problem:\\n{p}\\n\\nSolution:'",
        f"{_DPD} minerva_math (0-shot)",
        _math_dream,
    ),
    (
        "math500",
        "cd4lm",
        "0-shot, raw text: math-expert system text + problem",
        _CD,
        lambda r: _math_cd4lm(r["problem"]),
    ),
    (
        "humaneval",
        "dparallel",
        "0-shot, chat: 'Write a solution ... tests:\\n```python\\n{prompt}\\n```\\n '",
        f"{_DP} humaneval (instruct prompt)",
        _humaneval_dparallel,
    ),
    (
        "humaneval",
        "dparallel-dream",
        "0-shot, chat + answer prefix 'Here is the completed function:\\n```python\\n{prompt}\\n'",
        f"{_DPD} humaneval_instruct",
        _humaneval_dream,
    ),
    ("humaneval", "cd4lm", "0-shot, raw text with <reasoning>/<answer> format", _CD, _humaneval_cd4lm),
    (
        "humaneval",
        "completion",
        "raw prompt (signature + docstring), for base models",
        "lm-eval humaneval (base models)",
        _humaneval_completion,
    ),
]
for _task in ("mbpp", "mbpp-sanitized"):
    _SPECS += [
        (
            _task,
            "dparallel",
            "3-shot (task_ids 2, 3, 4) lm-eval mbpp context inside the chat template",
            f"{_DP} mbpp",
            _mbpp_dparallel,
        ),
        (
            _task,
            "dparallel-dream",
            "0-shot, chat + answer prefix 'Here is the completed function:\\n```python\\n'",
            f"{_DPD} mbpp_instruct",
            _mbpp_dream,
        ),
        (_task, "cd4lm", "0-shot, raw text with <reasoning>/<answer> format", _CD, _mbpp_cd4lm),
    ]

PROTOCOLS: dict[str, dict[str, Protocol]] = {}
for _task, _name, _desc, _src, _fn in _SPECS:
    PROTOCOLS.setdefault(_task, {})[_name] = Protocol(_name, _task, _desc, _src, _fn)

DEFAULT_PROTOCOL = "dparallel"


def register_protocol(protocol: Protocol) -> None:
    """Add a protocol (e.g. for a task registered by another package)."""
    PROTOCOLS.setdefault(protocol.task, {})[protocol.name] = protocol


def get_protocol(task: str, name: str | None = None) -> Protocol:
    """The protocol ``name`` of ``task`` (the task's default when None)."""
    table = PROTOCOLS.get(task, {})
    if name is None:
        name = DEFAULT_PROTOCOL if DEFAULT_PROTOCOL in table else next(iter(table), None)
    if name not in table:
        known = ", ".join(table) or "none"
        raise ValueError(f"unknown prompt protocol {name!r} for task {task!r} (known: {known})")
    return table[name]
