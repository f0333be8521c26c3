"""A word-level Hugging Face tokenizer for a closed vocabulary (the embedded task's words).

The result is a stock ``tokenizers`` model saved as ``tokenizer.json`` + ``tokenizer_config.json``
and loaded back with ``AutoTokenizer`` / :func:`fewstep.load_tokenizer` like any checkpoint's
tokenizer; there is no tokenizer class of fewstep's own. Words are split on whitespace and decoded
joined by single spaces. Special tokens follow LLaDA's names: ``<|endoftext|>`` (EOS, pads answers
to the generation length), ``<|eot_id|>`` (EOT, exposed as ``tokenizer.eot_token_id``),
``<|mdm_mask|>`` (the diffusion mask, ``tokenizer.mask_token_id``), plus ``<|pad|>`` for left-padding
prompts in a batch and ``<|unk|>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<|pad|>",
    "unk_token": "<|unk|>",
    "eos_token": "<|endoftext|>",
    "eot_token": "<|eot_id|>",
    "mask_token": "<|mdm_mask|>",
}


def build_word_tokenizer(words: Iterable[str], folder: str | os.PathLike | None = None):
    """A fast tokenizer whose vocabulary is the special tokens (ids 0-4) then ``words`` in order.

    With ``folder`` it is also saved there (``tokenizer.json``, ``tokenizer_config.json``), in a form
    that transformers 4.x and 5.x both load with ``AutoTokenizer.from_pretrained(folder)``.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    vocab: dict[str, int] = {t: i for i, t in enumerate(specials)}
    for w in words:
        if not w or any(c.isspace() for c in w):
            raise ValueError(f"vocabulary words must be non-empty and contain no whitespace, got {w!r}")
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    named = {k: v for k, v in SPECIAL_TOKENS.items() if k != "eot_token"}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, extra_special_tokens={"eot_token": SPECIAL_TOKENS["eot_token"]}, **named
    )
    if folder is not None:
        save_tokenizer(tok, folder)
    return tok


def save_tokenizer(tok, folder: str | os.PathLike) -> None:
    """``save_pretrained`` plus a portable ``tokenizer_config.json`` (stock fast-tokenizer class)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    eot = getattr(tok, "eot_token", None)
    if eot:
        cfg["extra_special_tokens"] = {"eot_token": eot}
        cfg.pop("eot_token", None)
    cfg["model_max_length"] = 4096
    cfg["clean_up_tokenization_spaces"] = False
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def eot_token_id(tok) -> int | None:
    """The end-of-turn id of a tokenizer: ``tok.eot_token_id`` if registered, else LLaDA's / Qwen's EOT."""
    tid = getattr(tok, "eot_token_id", None)
    if tid is not None:
        return int(tid)
    vocab = tok.get_vocab()
    for name in ("<|eot_id|>", "<|im_end|>"):
        if name in vocab:
            return int(vocab[name])
    return None


def special_ids(tok) -> dict[str, int | None]:
    """``{"mask", "eos", "eot", "pad"}`` ids of a tokenizer (pad falls back to EOS, as in LLaDA)."""
    eos = tok.eos_token_id
    return {
        "mask": tok.mask_token_id,
        "eos": eos,
        "eot": eot_token_id(tok),
        "pad": tok.pad_token_id if tok.pad_token_id is not None else eos,
    }
