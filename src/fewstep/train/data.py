"""Prompt/response JSONL -> tokenized examples for the trainer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_jsonl(
    path: str | os.PathLike, fields: tuple[str, ...] = ("prompt", "response"), limit: int | None = None
) -> list[dict[str, Any]]:
    """Records of a JSONL file (blank lines skipped, at most ``limit``); ValueError with the line number
    for bad JSON, a line that is not an object, or a missing / non-string field of ``fields``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    out = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{n}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            missing = [f for f in fields if not isinstance(rec, dict) or not isinstance(rec.get(f), str)]
            if missing:
                names = ", ".join(repr(f) for f in missing)
                raise ValueError(
                    f"{path}:{n}: expected an object with a string field{'s' * (len(missing) > 1)} {names}"
                )
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def tokenize_pairs(records: list[dict[str, Any]], tokenizer: Any, chunk: int = 8192) -> list[dict[str, Any]]:
    """``{"prompt_ids", "response_ids"}`` per record, without special tokens (the objective adds EOS).

    Tokenizes in chunks and keeps only the ids (as compact ``array('i')``), so memory stays small
    for large files.
    """
    from array import array

    unk = getattr(tokenizer, "unk_token_id", None)
    examples = []
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        prompts = tokenizer([r["prompt"] for r in part], add_special_tokens=False)["input_ids"]
        responses = tokenizer([r["response"] for r in part], add_special_tokens=False)["input_ids"]
        for i, (p, r) in enumerate(zip(prompts, responses), start):
            if not p:
                raise ValueError(f"record {i + 1}: empty prompt")
            if unk is not None and (unk in p or unk in r):
                raise ValueError(
                    f"record {i + 1}: words outside the tokenizer's vocabulary "
                    f"({records[i]['prompt']!r} -> {records[i]['response']!r}); use a matching tokenizer"
                )
            examples.append({"prompt_ids": array("i", p), "response_ids": array("i", r)})
    return examples


def hash_files(files: list[Path] | list[str]) -> str:
    """The first 16 hex digits of the SHA-256 of the files' bytes, in order (identifies a run's data)."""
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]
