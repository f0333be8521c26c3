"""Sequential certainty convergence: how sure a model is, step by step, of the tokens it will commit.

dParallel (Chen et al., arXiv 2509.26488, section 3) motivates certainty forcing with one measurement:
decode with one token per forward, and at every step take, over the positions that are still masked
and whose final token is correct, the probability the model gives that final token *now*. If the
confidence of a token only rises when its turn comes (the curve climbs along the block as its
neighbours are committed), the model converges to certainty sequentially, and committing many tokens
per forward must cost accuracy; certainty forcing trains the whole block to be confident at once.

:func:`certainty_trace` decodes once with ``llada:steps=gen_length`` through :func:`fewstep.generate`
and replays the run from its ``decode_step`` output: the canvas before forward ``s`` is the final
answer with every position committed at a forward ``>= s`` masked, so one forward of that canvas gives
exactly the distributions the decoder saw (no second generation loop). :func:`block_curves` and
:func:`lag_curve` reduce the trace, :func:`plot_certainty` draws both. ``python -m
fewstep.eval.certainty`` measures a checkpoint on the embedded task and writes the figure and a JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class CertaintyTrace:
    """One decoding at one token per forward, replayed.

    * ``prob`` [N, S, G]: at forward ``s`` (0-based), the probability of position ``g``'s final token;
      NaN where ``g`` was committed before that forward;
    * ``top`` [N, S, G]: whether the final token is the argmax at that forward (False where committed);
    * ``decode_step`` [N, G]: the (1-based) forward that committed each position;
    * ``answers`` [N, G]: the final tokens; ``eos`` [N, G]: where they are EOS (padding);
    * ``correct`` [N]: rows whose whole answer is correct (the caller's verifier).
    """

    prob: torch.Tensor
    top: torch.Tensor
    decode_step: torch.Tensor
    answers: torch.Tensor
    eos: torch.Tensor
    correct: torch.Tensor
    gen_length: int
    block_length: int

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length


@torch.no_grad()
def certainty_trace(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    gen_length: int,
    block_length: int,
    correct=None,
    batch_size: int = 64,
) -> CertaintyTrace:
    """Decode ``prompts`` (token lists) at one token per forward and record every step's confidence.

    ``correct(i, answer_ids) -> bool`` marks the rows whose answer is right (default: every row).
    """
    from fewstep.decoding import generate

    mask_id = int(model.config.mask_token_id)
    eos_id = int(model.config.eos_token_id)
    parts = []
    for lo in range(0, len(prompts), batch_size):
        chunk = [list(map(int, p)) for p in prompts[lo : lo + batch_size]]
        out = generate(
            model,
            chunk,
            f"llada:steps={gen_length}",
            gen_length=gen_length,
            block_length=block_length,
            early_stop=False,
        )
        if not bool((out.nfe == gen_length).all()):
            raise RuntimeError("the replay needs exactly one committed token per forward")
        parts.append(_replay(model, chunk, out.answers, out.decode_step, mask_id))
        for i, ans in enumerate(out.answers.tolist()):
            parts[-1]["correct"].append(True if correct is None else bool(correct(lo + i, ans)))
    answers = torch.cat([p["answers"] for p in parts])
    return CertaintyTrace(
        prob=torch.cat([p["prob"] for p in parts]),
        top=torch.cat([p["top"] for p in parts]),
        decode_step=torch.cat([p["decode_step"] for p in parts]),
        answers=answers,
        eos=answers == eos_id,
        correct=torch.tensor([c for p in parts for c in p["correct"]], dtype=torch.bool),
        gen_length=gen_length,
        block_length=block_length,
    )


def _replay(model, prompts: list[list[int]], answers: torch.Tensor, decode_step: torch.Tensor, mask_id: int) -> dict:
    """Forward ``s`` sees the answer with every position committed at a forward >= ``s`` masked."""
    n, g = answers.shape
    width = max(len(p) for p in prompts)
    pad = int(model.config.pad_token_id if model.config.pad_token_id is not None else mask_id)
    ids = torch.full((n, width), pad, dtype=torch.long)
    am = torch.zeros((n, width + g), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        am[i, width - len(p) :] = 1
    answers, decode_step = answers.cpu(), decode_step.cpu()
    prob = torch.full((n, g, g), math.nan)
    top = torch.zeros((n, g, g), dtype=torch.bool)
    for s in range(1, g + 1):
        masked = decode_step >= s
        canvas = torch.cat([ids, torch.where(masked, mask_id, answers)], 1).to(model.device)
        logits = model.denoise(canvas, am.to(model.device) if not bool(am.all()) else None).logits[:, width:]
        logits = logits.float().cpu()
        logits[..., mask_id] = -math.inf  # the decoder never predicts the mask token
        p = torch.softmax(logits, -1)
        final = p.gather(-1, answers[..., None]).squeeze(-1)
        prob[:, s - 1] = torch.where(masked, final, math.nan)
        top[:, s - 1] = masked & (logits.argmax(-1) == answers)
    return {"prob": prob, "top": top, "decode_step": decode_step, "answers": answers, "correct": []}


def _select(trace: CertaintyTrace, tokens: str) -> torch.Tensor:
    """[N, G] positions that count: correct rows, answer tokens (``"answer"``) or EOS padding (``"eos"``)."""
    kind = ~trace.eos if tokens == "answer" else trace.eos
    return kind & trace.correct[:, None]


def block_curves(trace: CertaintyTrace, tokens: str = "answer") -> dict[str, Any]:
    """Per block, over the forwards that decode it (one token each, ``block_length`` of them): the mean
    confidence and the argmax-agreement of that block's still-masked positions, and how many there are.

    ``confidence[k][j]`` is the mean at the ``j``-th forward of block ``k`` (None where no position counts).
    """
    b, keep = trace.block_length, _select(trace, tokens)
    conf, agree, count = [], [], []
    for k in range(trace.num_blocks):
        cols = slice(k * b, (k + 1) * b)
        c_row, a_row, n_row = [], [], []
        for j in range(b):
            s = k * b + j
            p = trace.prob[:, s, cols]
            sel = keep[:, cols] & ~torch.isnan(p)
            n = int(sel.sum())
            n_row.append(n)
            c_row.append(float(p[sel].mean()) if n else None)
            a_row.append(float(trace.top[:, s, cols][sel].float().mean()) if n else None)
        conf.append(c_row)
        agree.append(a_row)
        count.append(n_row)
    return {"tokens": tokens, "confidence": conf, "argmax_agrees": agree, "count": count}


def lag_curve(trace: CertaintyTrace, tokens: str = "answer", max_lag: int | None = None) -> dict[str, Any]:
    """Mean confidence against the number of forwards left before the position is committed
    (0: the forward that commits it), over the counted positions, lags ``0..max_lag``."""
    max_lag = trace.block_length - 1 if max_lag is None else max_lag
    keep = _select(trace, tokens)
    s = torch.arange(trace.gen_length)[None, :, None]
    lag = trace.decode_step[:, None, :] - 1 - s  # [N, S, G]
    conf, agree, count = [], [], []
    for d in range(max_lag + 1):
        sel = (lag == d) & keep[:, None, :] & ~torch.isnan(trace.prob)
        n = int(sel.sum())
        count.append(n)
        conf.append(float(trace.prob[sel].mean()) if n else None)
        agree.append(float(trace.top[sel].float().mean()) if n else None)
    return {
        "tokens": tokens,
        "lag": list(range(max_lag + 1)),
        "confidence": conf,
        "argmax_agrees": agree,
        "count": count,
    }


def example(trace: CertaintyTrace) -> dict[str, Any] | None:
    """One correct row (the one with the longest answer, first on ties): ``prob`` [S][G] with None where
    committed, and its answer length (non-EOS tokens)."""
    lengths = torch.where(trace.correct, (~trace.eos).sum(-1), -1)
    if not bool(trace.correct.any()):
        return None
    i = int(lengths.argmax())
    rows = [[None if math.isnan(v) else round(v, 4) for v in step] for step in trace.prob[i].tolist()]
    return {"row": i, "answer_tokens": int(lengths[i]), "prob": rows}


def summary(trace: CertaintyTrace) -> dict[str, Any]:
    """Everything the figure shows, JSON-serialisable."""
    return {
        "n_rows": int(trace.correct.numel()),
        "n_correct": int(trace.correct.sum()),
        "gen_length": trace.gen_length,
        "block_length": trace.block_length,
        "blocks": block_curves(trace, "answer"),
        "blocks_eos": block_curves(trace, "eos"),
        "lag": lag_curve(trace, "answer"),
        "lag_eos": lag_curve(trace, "eos"),
        "example": example(trace),
    }


def plot_certainty(result: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Three panels. Left: per block, the mean confidence of its still-masked correct answer tokens
    against the step inside the block (the dParallel figure). Middle: mean confidence and argmax
    agreement against the forwards left until the token is committed. Right: one answer's confidence
    map (position x step), blank once a position is committed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16.5, 4.4), dpi=110)
    _block_panel(axes[0], result)
    _lag_panel(axes[1], result)
    _example_panel(fig, axes[2], result)
    fig.suptitle(title or "sequential certainty convergence (dParallel): 1 token per forward, correct answers")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _block_panel(ax, result: dict[str, Any], min_count: int = 20) -> None:
    import matplotlib.pyplot as plt

    blocks, b = result["blocks"], result["block_length"]
    nb = len(blocks["confidence"])
    cmap = plt.get_cmap("viridis")
    for k, (conf, count) in enumerate(zip(blocks["confidence"], blocks["count"])):
        pts = [(j + 1, c) for j, (c, n) in enumerate(zip(conf, count)) if c is not None and n >= min_count]
        if len(pts) >= 2:
            ax.plot(*zip(*pts), marker="o", ms=2.5, lw=1.5, color=cmap(k / max(nb - 1, 1)), label=f"block {k + 1}")
    ax.set_xlabel(f"step inside the block (1 token per forward, {b} per block)")
    ax.set_ylabel("mean p(final token), still-masked positions")
    ax.set_ylim(0, 1.02)
    ax.set_title("answer tokens still masked, per block")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")


def _lag_panel(ax, result: dict[str, Any], min_count: int = 20) -> None:
    for key, label, style in (("lag", "answer tokens", "-"), ("lag_eos", "EOS padding", "--")):
        lag = result[key]
        rows = [(d, c, a) for d, c, a, n in zip(lag["lag"], lag["confidence"], lag["argmax_agrees"], lag["count"])]
        rows = [r for r, n in zip(rows, lag["count"]) if r[1] is not None and n >= min_count]
        if rows:
            d, c, a = zip(*rows)
            ax.plot(d, c, ls=style, marker="o", ms=2.5, color="tab:blue", label=f"{label}: mean p(final)")
            ax.plot(d, a, ls=style, marker="s", ms=2.5, color="tab:orange", label=f"{label}: argmax = final")
    ax.set_xlabel("forwards left until the position is committed")
    ax.set_ylim(0, 1.02)
    ax.set_title("confidence against distance to commitment")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")


def _example_panel(fig, ax, result: dict[str, Any]) -> None:
    ex = result.get("example")
    if ex is None:
        ax.axis("off")
        return
    grid = torch.tensor([[math.nan if v is None else v for v in step] for step in ex["prob"]])
    length = ex["answer_tokens"]
    im = ax.imshow(grid[:, : length + 1].T.numpy(), aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1)
    for k in range(1, result["gen_length"] // result["block_length"]):
        ax.axvline(k * result["block_length"] - 0.5, color="white", lw=0.6, alpha=0.6)
    ax.set_xlabel("forward (step)")
    ax.set_ylabel("answer position")
    ax.set_title(f"one answer ({length} tokens + EOS): p(final token) while masked")
    fig.colorbar(im, ax=ax, fraction=0.046)


def measure_task(model, tokenizer, problems, *, gen_length: int, block_length: int, batch_size: int = 64) -> dict:
    """:func:`summary` of the teacher on embedded-task problems, correctness by :func:`fewstep.tasks.verify`."""
    from fewstep.tasks import verify

    prompts = [tokenizer(p.prompt, add_special_tokens=False).input_ids for p in problems]

    def correct(i: int, answer: list[int]) -> bool:
        return verify(problems[i].prompt, tokenizer.decode(answer, skip_special_tokens=False)).correct

    trace = certainty_trace(
        model, prompts, gen_length=gen_length, block_length=block_length, correct=correct, batch_size=batch_size
    )
    return summary(trace)


def main(argv: list[str] | None = None) -> int:
    """``python -m fewstep.eval.certainty``: the figure and JSON for a checkpoint on the embedded task."""
    from fewstep.assets import resolve_model
    from fewstep.models import load_model, load_tokenizer
    from fewstep.tasks import BLOCK_LENGTH, GEN_LENGTH, generate_problems

    ap = argparse.ArgumentParser(prog="python -m fewstep.eval.certainty", description=main.__doc__)
    ap.add_argument("--model", default="teacher", help="checkpoint folder or shipped model name")
    ap.add_argument("--n", type=int, default=256, help="held-out problems")
    ap.add_argument("--out", default="certainty.png", help="PNG path (the JSON goes beside it)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    model, tok = load_model(folder), load_tokenizer(folder)
    problems = generate_problems("test", args.n, seed=0)
    result = measure_task(
        model, tok, problems, gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, batch_size=args.batch_size
    )
    out = Path(args.out)
    plot_certainty(result, out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['n_correct']}/{result['n_rows']} correct; figure {out}, data {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
