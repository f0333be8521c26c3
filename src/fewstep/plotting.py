"""Small matplotlib helpers shared by the demo and the sweep plots."""

from __future__ import annotations

NFE_TICKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256, 512, 1024)


def log_nfe_axis(ax, lo: float, hi: float, label: str = "mean NFE per answer (log scale)") -> None:
    """A log-scale NFE x axis from ``lo`` to ``hi`` with plain-number ticks (2, 4, 8, ... not 2x10^0)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(FixedLocator([t for t in NFE_TICKS if lo <= t <= hi]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)
