"""fewstep inside lm-evaluation-harness: the ``fewstep`` model and LLaDA's Monte Carlo likelihood.

Importing this package registers the ``fewstep`` model with lm-eval (``lm_eval.api.registry``).
Run lm-eval with it through ``fewstep lm-eval ...`` or ``python -m fewstep.eval.lm_eval ...`` (the
same arguments as ``lm-eval``), or from Python::

    import lm_eval
    from fewstep.eval.lm_eval import FewstepLM

    lm = FewstepLM(pretrained="/models/LLaDA-8B-Instruct", policy="threshold:0.9", cache="dual", gen_length=256)
    results = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k"], apply_chat_template=True)
    print(lm.speed_summary())

Task files for GSM8K over the copies shipped in fewstep (no download) live in :data:`TASKS_DIR`:
``gsm8k_fewstep`` (lm-eval's ``gsm8k``) and ``gsm8k_dparallel`` (dParallel's 0-shot ``\\boxed{}``
prompt); the launcher adds that folder to lm-eval's ``--include_path``.

See docs/evaluation.md ("lm-evaluation-harness").
"""

from pathlib import Path

from fewstep.eval.lm_eval.adapter import FewstepLM
from fewstep.eval.lm_eval.likelihood import (
    exact_elbo,
    greedy_suffix_matches,
    mask_counts,
    mc_log_likelihood,
    mc_loss_samples,
)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = [
    "TASKS_DIR",
    "FewstepLM",
    "exact_elbo",
    "greedy_suffix_matches",
    "mask_counts",
    "mc_log_likelihood",
    "mc_loss_samples",
]
