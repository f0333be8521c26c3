"""Distillation objectives, one module per paper: ``dparallel`` (certainty forcing), ``cd4lm`` (DSCD).

``objective_class(method)`` maps a ``fewstep distill --method`` name to its ``Objective`` subclass
(imported lazily, so importing this package stays cheap).
"""

from __future__ import annotations

METHODS = ("dparallel", "cd4lm")


def objective_class(method: str) -> type:
    """The ``Objective`` subclass of a distillation method (``"dparallel"`` or ``"cd4lm"``)."""
    if method == "dparallel":
        from fewstep.distill.dparallel import DParallelObjective

        return DParallelObjective
    if method == "cd4lm":
        from fewstep.distill.cd4lm import CD4LMObjective

        return CD4LMObjective
    raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(METHODS)}")
