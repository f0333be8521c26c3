"""Parity-suite collection rules.

A fixture directory without oracles of some kind (e.g. a Dream fixture has no loss oracles) simply
contributes no items. pytest would report such an empty parametrisation as a *skip*; the parity suite's
only allowed skips are the ``tie_break_dependent`` sampler cases, so empty parametrisations are
deselected instead.
"""

from __future__ import annotations


def pytest_collection_modifyitems(config, items):
    empty = [
        item
        for item in items
        if any(
            m.name == "skip" and str(m.kwargs.get("reason", "")).startswith("got empty parameter set")
            for m in item.iter_markers()
        )
    ]
    if empty:
        config.hook.pytest_deselected(items=empty)
        items[:] = [item for item in items if item not in empty]
