"""Prompt/response JSONL -> tokenized examples for the trainer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_jsonl(path: str | os.PathLike, fields: tuple[str, ...] = ("prompt", "response")) -> list[dict[str, Any]]:
    """Records of a JSONL file; ValueError (with the line number) for bad JSON or a missing field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    out = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object per line")
            missing = [f for f in fields if not isinstance(rec.get(f), str)]
            if missing:
                raise ValueError(f"{path}:{n}: missing or non-string field(s) {', '.join(missing)}")
            out.append(rec)
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def tokenize_pairs(records: list[dict[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """``{"prompt_ids", "response_ids"}`` per record, without special tokens (the objective adds EOS)."""
    prompts = tokenizer([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r["response"] for r in records], add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    examples = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"record {i + 1}: empty prompt")
        if unk is not None and (unk in p or unk in r):
            raise ValueError(
                f"record {i + 1}: words outside the tokenizer's vocabulary "
                f"({records[i]['prompt']!r} -> {records[i]['response']!r}); use a matching tokenizer"
            )
        examples.append({"prompt_ids": list(p), "response_ids": list(r)})
    return examples
