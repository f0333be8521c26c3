"""Step traces: per-row replay of ``GenerateOutput.trace``, as JSON or as a rich rendering.

``generate(..., trace=True)`` records, for every forward, which rows took part and which answer
positions each committed. :func:`row_steps` replays that into per-row steps; :func:`trace_json` makes a
JSON document of it (with token strings when a tokenizer is given) and :func:`render_row` draws the
answer canvas after each step, the tokens committed at that step highlighted.
"""

from __future__ import annotations

from typing import Any

from fewstep.decoding.pipeline import GenerateOutput

MASK_GLYPH = "░"


def row_steps(out: GenerateOutput, row: int) -> list[dict[str, Any]]:
    """The steps of one row: ``{"nfe", "block", "positions", "tokens"}`` in order."""
    if out.trace is None:
        raise ValueError("this output has no trace: call generate(..., trace=True)")
    steps = []
    for step in out.trace:
        if row in step["rows"]:
            j = step["rows"].index(row)
            steps.append(
                {
                    "nfe": len(steps) + 1,
                    "block": step["block"],
                    "positions": step["positions"][j],
                    "tokens": step["tokens"][j],
                }
            )
    return steps


# byte-level / sentencepiece markers -> what they stand for
_MARKERS = str.maketrans({"Ġ": " ", "▁": " ", "Ċ": "↵", "\n": "↵", "ĉ": "⇥"})


def token_text(tokenizer, token: int) -> str:
    """A readable string for one token: its vocabulary string with word-start markers shown as spaces
    (so consecutive tokens read as text), or its id without a tokenizer."""
    if tokenizer is None:
        return str(token)
    piece = tokenizer.convert_ids_to_tokens(int(token))
    return str(piece if piece is not None else token).translate(_MARKERS)


def trace_json(out: GenerateOutput, tokenizer=None, prompts: list[str] | None = None) -> dict[str, Any]:
    """A JSON-serialisable document of the whole generation and its per-row steps."""
    rows = []
    for r in range(out.sequences.shape[0]):
        answer = out.answers[r].tolist()
        steps = row_steps(out, r)
        if tokenizer is not None:
            for s in steps:
                s["text"] = [token_text(tokenizer, t) for t in s["tokens"]]
        row: dict[str, Any] = {
            "prompt_ids": out.sequences[r, : out.prompt_length].tolist(),
            "answer_ids": answer,
            "nfe": int(out.nfe[r]),
            "tokens_per_step": out.tokens_per_step[r],
            "steps": steps,
        }
        if prompts is not None:
            row["prompt"] = prompts[r]
        if tokenizer is not None:
            row["answer"] = tokenizer.decode(answer, skip_special_tokens=True)
        rows.append(row)
    return {"policy": out.policy, "cache": out.cache, "prompt_length": out.prompt_length, "rows": rows}


def render_row(out: GenerateOutput, row: int, tokenizer=None, mask_id: int | None = None, console=None) -> None:
    """Print the answer canvas of ``row`` after each of its steps (rich); new tokens highlighted."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    G = out.answers.shape[1]
    canvas: list[int | None] = [None] * G
    for step in row_steps(out, row):
        new = set(step["positions"])
        for p, t in zip(step["positions"], step["tokens"]):
            canvas[p] = t
        text = Text()
        text.append(f"step {step['nfe']:>3}  block {step['block']}  +{len(new):<3} ", style="bold cyan")
        for p, t in enumerate(canvas):
            if t is None or t == mask_id:
                text.append(MASK_GLYPH, style="dim")
            elif p in new:
                text.append(token_text(tokenizer, t), style="bold black on green")
            else:
                text.append(token_text(tokenizer, t))
            if tokenizer is None:
                text.append(" ")
        console.print(text)
