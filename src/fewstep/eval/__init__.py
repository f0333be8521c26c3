"""fewstep.eval: benchmarks, prompt protocols, answer extraction, the code sandbox, eval and sweeps.

* :mod:`fewstep.eval.datasets`: loaders of the shipped GSM8K, MATH-500, HumanEval and MBPP files.
* :mod:`fewstep.eval.benchmarks`: the benchmark registry (:func:`get_task`), ids, extraction, checking and the
  prompts it lends to distillation's rollouts.
* :mod:`fewstep.eval.embedded`: accuracy and speed of a decoding policy on the embedded task (:func:`evaluate_policy`).
* :mod:`fewstep.eval.protocols`: the papers' prompt protocols (:func:`get_protocol`).
* :mod:`fewstep.eval.sandbox`: :class:`Sandbox`, isolated execution of generated code.
* :mod:`fewstep.eval.scoring`: :func:`score` responses (``fewstep score``).
* :mod:`fewstep.eval.runner` / :mod:`fewstep.eval.sweep`: ``fewstep eval`` and ``fewstep sweep``.

See docs/evaluation.md.
"""

from fewstep.eval.benchmarks import TASKS, Task, get_task, register_task
from fewstep.eval.protocols import Prompt, get_protocol
from fewstep.eval.sandbox import Limits, RunResult, Sandbox
from fewstep.eval.scoring import ScoredRecord, Summary, score, summarize

__all__ = [
    "TASKS",
    "Limits",
    "Prompt",
    "RunResult",
    "Sandbox",
    "ScoredRecord",
    "Summary",
    "Task",
    "get_protocol",
    "get_task",
    "register_task",
    "score",
    "summarize",
]
