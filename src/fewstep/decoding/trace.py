"""Step traces: per-row steps, as JSON or as a rich rendering.

``generate(..., trace=True)`` records, for every forward, which rows took part, which answer positions
each set and which of them were **revised** (a decoded token replaced by another: a revising policy such
as DMax's ``spd`` keeps its open block mutable); :func:`row_steps` replays that into per-row steps. The text layer's
``Canvas`` events carry the same per request: :class:`StepRecorder` collects them (``fewstep generate``).
:func:`trace_json` / :func:`completions_json` make a JSON document of either (with token strings when
a tokenizer is given) and :func:`render_row` / :func:`render_steps` draw the answer canvas after each
step, the tokens committed at that step highlighted and the revised ones marked apart (another colour
and an underline that stays on a token once revision changed it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fewstep.decoding.pipeline import GenerateOutput
from fewstep.decoding.text import Canvas

MASK_GLYPH = "░"
REVISED_STYLE = "bold black on yellow"  # a decoded token replaced at this step (first commits: black on green)


def row_steps(out: GenerateOutput, row: int) -> list[dict[str, Any]]:
    """The steps of one row: ``{"nfe", "block", "positions", "tokens", "revised"}`` in order."""
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
                    "revised": list(step.get("revised", [[]] * len(step["rows"]))[j]),
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


def _row_doc(prompt_ids, answer, nfe, tokens_per_step, steps, tokenizer, prompt, text, revised) -> dict[str, Any]:
    if tokenizer is not None:
        for s in steps:
            s["text"] = [token_text(tokenizer, t) for t in s["tokens"]]
    row: dict[str, Any] = {
        "prompt_ids": list(prompt_ids),
        "answer_ids": list(answer),
        "nfe": int(nfe),
        "tokens_per_step": list(tokens_per_step),
        "revisions": sum(len(s.get("revised", [])) for s in steps),
        "revised": int(revised),
        "steps": steps,
    }
    if prompt is not None:
        row["prompt"] = prompt
    if text is not None:
        row["answer"] = text
    return row


def trace_json(out: GenerateOutput, tokenizer=None, prompts: list[str] | None = None) -> dict[str, Any]:
    """A JSON-serialisable document of the whole generation and its per-row steps."""
    rows = []
    for r in range(out.sequences.shape[0]):
        answer = out.answers[r].tolist()
        text = tokenizer.decode(answer, skip_special_tokens=True) if tokenizer is not None else None
        prompt = None if prompts is None else prompts[r]
        prompt_ids = out.sequences[r, : out.prompt_length].tolist()
        steps = row_steps(out, r)
        revised = 0 if out.revised is None else out.revised[r]
        rows.append(
            _row_doc(prompt_ids, answer, out.nfe[r], out.tokens_per_step[r], steps, tokenizer, prompt, text, revised)
        )
    return {"policy": out.policy, "cache": out.cache, "prompt_length": out.prompt_length, "rows": rows}


class StepRecorder:
    """An ``on_event`` hook for the text layer (with ``canvas=True``): every request's steps, in order."""

    def __init__(self, then: Callable[[Any], None] | None = None):
        self.steps: dict[Any, list[dict[str, Any]]] = {}
        self.then = then

    def __call__(self, event: Any) -> None:
        if isinstance(event, Canvas):
            steps = self.steps.setdefault(event.id, [])
            if not steps or steps[-1]["nfe"] < event.nfe:
                tokens = [event.tokens[p] for p in event.committed]
                step = {"nfe": event.nfe, "block": event.block, "positions": list(event.committed), "tokens": tokens}
                steps.append({**step, "revised": list(event.revised)})
        if self.then is not None:
            self.then(event)


def completions_json(
    comps, recorder: StepRecorder, policy: str, cache: str, tokenizer=None, prompts=None
) -> dict[str, Any]:
    """:func:`trace_json`'s document for the text layer's completions (prompt ids as given, not padded)."""
    rows = []
    for i, c in enumerate(comps):
        answer = c.row.answer if c.row is not None else c.token_ids
        prompt = None if prompts is None else prompts[i]
        prompt_ids = c.row.prompt if c.row is not None else []
        steps = [dict(s) for s in recorder.steps.get(c.id, [])]
        rows.append(_row_doc(prompt_ids, answer, c.nfe, c.tokens_per_step, steps, tokenizer, prompt, c.text, c.revised))
    length = max((len(r["prompt_ids"]) for r in rows), default=0)
    return {"policy": policy, "cache": cache, "prompt_length": length, "rows": rows}


def render_row(out: GenerateOutput, row: int, tokenizer=None, mask_id: int | None = None, console=None) -> None:
    """Print the answer canvas of ``row`` after each of its steps (rich); new tokens highlighted."""
    render_steps(row_steps(out, row), out.answers.shape[1], tokenizer, mask_id, console)


def render_steps(
    steps: list[dict[str, Any]], length: int, tokenizer=None, mask_id: int | None = None, console=None
) -> None:
    """Print an answer canvas of ``length`` positions after each of ``steps`` (rich): first commits on green,
    revisions (a decoded token replaced) on yellow with ``~N`` in the step's header, and every token that a
    revision changed stays underlined."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    canvas: list[int | None] = [None] * length
    ever: set[int] = set()  # positions whose token a revision changed at least once
    for step in steps:
        new, revised = set(step["positions"]), set(step.get("revised", ()))
        ever |= revised
        for p, t in zip(step["positions"], step["tokens"]):
            canvas[p] = t
        text = Text()
        head = f"step {step['nfe']:>3}  block {step['block']}  +{len(new - revised):<3} "
        text.append(head + (f"~{len(revised):<3} " if ever else ""), style="bold cyan")
        for p, t in enumerate(canvas):
            if t is None or t == mask_id:
                text.append(MASK_GLYPH, style="dim")
            elif p in revised:
                text.append(token_text(tokenizer, t), style=REVISED_STYLE)
            elif p in new:
                text.append(token_text(tokenizer, t), style="bold black on green")
            else:
                text.append(token_text(tokenizer, t), style="underline" if p in ever else "")
            if tokenizer is None:
                text.append(" ")
        console.print(text)
