"""The loss curve PNG of a training run (matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence


def plot_loss(history: Sequence[dict[str, float]], path: str | os.PathLike, title: str = "training loss") -> None:
    """Loss against optimiser step (log scale), a moving average over it, and the LR on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    k = max(1, len(loss) // 50)
    smooth = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=1, label="loss")
    ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"moving average ({k} points)")
    if min(loss) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if "lr" in history[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [h["lr"] for h in history], color="tab:orange", lw=1, alpha=0.8, label="learning rate")
        ax2.set_ylabel("learning rate", color="tab:orange")
        ax2.tick_params(axis="y", colors="tab:orange")
        ax2.set_ylim(bottom=0)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
