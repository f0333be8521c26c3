"""The task registry: each benchmark with its records, stable ids, answer extraction and checking, and the
prompts it lends to distillation.

A task is either a *math* task (the answer is extracted and compared in-process) or a *code* task
(the extracted code becomes a test program that runs in the sandbox). ``fewstep score``, ``fewstep
eval``, ``fewstep sweep``, the lm-eval adapter and the rollouts of distillation (``fewstep rollout
--prompts`` / ``--verifier``: :mod:`fewstep.distill.rollout`) all go through :func:`get_task`, so a
benchmark is registered once (:func:`register_task`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from fewstep.eval import answers, code, datasets
from fewstep.eval.protocols import PROTOCOLS, Protocol, get_protocol

Record = dict[str, Any]


@dataclass(frozen=True)
class TrainPrompts:
    """The prompts a task lends to distillation (``fewstep rollout --prompts NAME``).

    ``load(limit, seed, protocol)`` returns prompt records: ``id``, ``prompt`` (the question text) and
    whatever the task's verifier reads (``gold``, ``target``, ...); optionally ``messages`` (chat turns,
    rendered with the tokenizer's chat template instead of ``prompt``), ``raw`` (True: never apply a chat
    template), ``gen_prefix`` (text the answer starts with) and ``stop`` (strings the response is cut at).
    ``protocol`` picks a prompt format where the task has several (None: its default).
    """

    description: str
    load: Callable[[int | None, int, str | None], list[Record]] = field(repr=False)


@dataclass
class Task:
    """One benchmark.

    ``load`` returns every record that may be scored (each with a stable ``id``); ``eval_split``
    filters the subset that ``fewstep eval`` generates for by default (the papers' test split).
    ``extract(record, response)`` returns the extracted answer or code (None when nothing usable was
    found); math tasks then use ``check(record, extracted)``, code tasks ``program(record, extracted)``.
    """

    name: str
    kind: str  # "math" or "code"
    description: str
    load: Callable[[], list[dict[str, Any]]] = field(repr=False)
    extract: Callable[[dict[str, Any], str], str | None] = field(repr=False)
    check: Callable[[dict[str, Any], str], bool] | None = field(default=None, repr=False)
    program: Callable[[dict[str, Any], str], str] | None = field(default=None, repr=False)
    gold: Callable[[dict[str, Any]], str] | None = field(default=None, repr=False)
    eval_split: Callable[[dict[str, Any]], bool] | None = field(default=None, repr=False)
    # judge(record, response) -> (extracted, passed, reason): replaces extract + check for tasks whose
    # verdict needs the whole response (the embedded task verifies every step of the derivation)
    judge: Callable[[dict[str, Any], str], tuple[str | None, bool, str]] | None = field(default=None, repr=False)
    train: TrainPrompts | None = field(default=None, repr=False)  # prompts for rollouts (distillation)
    aliases: tuple[str, ...] = ()  # other names get_task accepts (``math`` for ``math500``)

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        """Every scorable record, in file order."""
        return self.load()

    @cached_property
    def _by_id(self) -> dict[str, dict[str, Any]]:
        return {str(r["id"]): r for r in self.records}

    def get(self, record_id: Any) -> dict[str, Any] | None:
        """The record with this id (``12`` and ``"12"`` are the same id), or None."""
        return self._by_id.get(str(record_id))

    def eval_records(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The records ``fewstep eval`` runs by default (the papers' test split), first ``limit`` of them."""
        rows = [r for r in self.records if self.eval_split is None or self.eval_split(r)]
        return rows if limit is None else rows[:limit]

    @property
    def protocols(self) -> dict[str, Protocol]:
        return PROTOCOLS.get(self.name, {})

    def prompt(self, record: dict[str, Any], protocol: str | None = None):
        """The :class:`~fewstep.eval.protocols.Prompt` for ``record`` under ``protocol`` (default: the task's default)."""
        return get_protocol(self.name, protocol)(record)

    @property
    def verifies(self) -> bool:
        """True when answers are checked in-process (a ``judge`` or a ``check``): a rollout verifier."""
        return self.judge is not None or self.check is not None


def prompt_records(rows: list[Record], task: Any, protocol: str | None = None) -> list[Record]:
    """Prompt records (:class:`TrainPrompts`) from benchmark rows through a task's prompt protocol (chat
    messages or raw text, generation prefix and stop strings, as :meth:`Task.prompt` builds them)."""
    out = []
    for row in rows:
        p = task.prompt(row, protocol)
        rec = {**row, "id": str(row.get("id", len(out)))}
        if p.messages is not None:
            rec["messages"] = [dict(m) for m in p.messages]
            rec["prompt"] = p.messages[-1]["content"]
        else:
            rec["prompt"], rec["raw"] = p.text, True
        if p.gen_prefix:
            rec["gen_prefix"] = p.gen_prefix
        if p.stop:
            rec["stop"] = list(p.stop)
        out.append(rec)
    return out


def _gsm8k_check(record: dict[str, Any], extracted: str) -> bool:
    return answers.gsm8k_equal(extracted, record["target"])


def _math_check(record: dict[str, Any], extracted: str) -> bool:
    return answers.math_equal(extracted, record["answer"])


def _mbpp_extract(record: dict[str, Any], response: str) -> str | None:
    solution = code.mbpp_solution(record, response)
    return solution if solution.strip() else None


def _humaneval_extract(record: dict[str, Any], response: str) -> str | None:
    solution = code.humaneval_solution(record, response)
    return solution if f"def {record['entry_point']}(" in solution else None  # the prompt alone has no body


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task to the registry (the embedded synthetic task registers itself this way)."""
    TASKS[task.name] = task
    return task


def _gsm8k_train(limit: int | None, seed: int, protocol: str | None = None) -> list[Record]:
    rows = datasets.load_gsm8k("train")
    return prompt_records(rows if limit is None else rows[:limit], get_task("gsm8k"), protocol)


register_task(
    Task(
        "gsm8k",
        "math",
        "GSM8K test (1,319 grade-school word problems); ids are 0-based line numbers of test.jsonl",
        load=lambda: datasets.load_gsm8k("test"),
        extract=lambda r, resp: answers.extract_gsm8k(resp),
        check=_gsm8k_check,
        gold=lambda r: r["target"],
        train=TrainPrompts("GSM8K train split (7,473), prompted as --protocol (evaluation harness)", _gsm8k_train),
    )
)
register_task(
    Task(
        "math500",
        "math",
        "MATH-500 (500 competition problems, Lightman et al.); ids are unique_id",
        load=datasets.load_math500,
        extract=lambda r, resp: answers.extract_math(resp),
        check=_math_check,
        gold=lambda r: r["answer"],
        aliases=("math",),
    )
)
register_task(
    Task(
        "humaneval",
        "code",
        "HumanEval (164 Python functions); ids are task_id",
        load=datasets.load_humaneval,
        extract=_humaneval_extract,
        program=code.humaneval_test_program,
    )
)
register_task(
    Task(
        "mbpp",
        "code",
        "MBPP full set (974 problems; fewstep eval uses the test split, task_ids 11-510); ids are task_id",
        load=lambda: datasets.load_mbpp("all"),
        extract=_mbpp_extract,
        program=code.mbpp_test_program,
        eval_split=lambda r: r["task_id"] in datasets.MBPP_SPLITS["test"],
    )
)
register_task(
    Task(
        "mbpp-sanitized",
        "code",
        "MBPP sanitized (427 hand-verified problems); ids are task_id",
        load=lambda: datasets.load_mbpp_sanitized("all"),
        extract=_mbpp_extract,
        program=code.mbpp_test_program,
    )
)


EMBEDDED_TEST_SIZE = 512  # the test set `fewstep task` writes by default (seed 0)
#: Prompts drawn from the embedded task's train split for a rollout without ``--limit``.
EMBEDDED_TRAIN_PROMPTS = 8192


def _register_embedded() -> None:
    """The embedded synthetic task (``fewstep.tasks``), scored by its own step-by-step verifier."""
    from fewstep.eval.protocols import Prompt, Protocol, register_protocol
    from fewstep.tasks import arith

    def load() -> list[dict[str, Any]]:
        return [p.to_json() for p in arith.generate_problems("test", EMBEDDED_TEST_SIZE, seed=0)]

    def train(limit: int | None, seed: int, protocol: str | None = None) -> list[Record]:
        if protocol is not None:
            raise ValueError("the arith prompt set has a single prompt format (no --protocol)")
        problems = arith.generate_problems("train", EMBEDDED_TRAIN_PROMPTS if limit is None else limit, seed=seed)
        return [{"id": p.id, "prompt": p.prompt, "gold": p.gold} for p in problems]

    def judge(record: dict[str, Any], response: str) -> tuple[str | None, bool, str]:
        verdict = arith.verify(record["prompt"], response)
        return verdict.answer, verdict.correct, "correct" if verdict.correct else verdict.reason

    register_task(
        Task(
            arith.NAME,
            "math",
            f"embedded synthetic task: {EMBEDDED_TEST_SIZE} held-out +/- expressions (seed 0), every step verified; "
            "ids are arith-test-NNNNNN",
            load=load,
            extract=lambda r, resp: arith.extract_answer(resp),
            check=lambda r, extracted: extracted == r["gold"],
            gold=lambda r: r["gold"],
            judge=judge,
            train=TrainPrompts(
                f"the embedded task's train split (distinct prompts, generated with --seed; {EMBEDDED_TRAIN_PROMPTS} "
                "unless --limit)",
                train,
            ),
        )
    )
    register_protocol(
        Protocol(
            "plain",
            arith.NAME,
            "the prompt as raw text (the tiny models are trained without a chat template)",
            "fewstep embedded task",
            lambda r: Prompt(text=r["prompt"]),
        )
    )


_register_embedded()


def get_task(name: str) -> Task:
    """The registered task ``name`` (or one of its ``aliases``); ValueError (one line, listing the known
    names) otherwise."""
    task = TASKS.get(name) or next((t for t in TASKS.values() if name in t.aliases), None)
    if task is None:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
    return task
