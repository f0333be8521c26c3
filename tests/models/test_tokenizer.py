"""``fewstep.load_tokenizer``: offline AutoTokenizer loading of LLaDA- and Dream-style folders."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import fewstep

SPECIAL = {
    "content": None,
    "special": True,
    "lstrip": False,
    "rstrip": False,
    "normalized": False,
    "single_word": False,
}


def _added(tokens: dict[str, int]) -> dict[str, dict]:
    return {str(i): {**SPECIAL, "content": t} for t, i in tokens.items()}


def test_llada_style_folder_gets_its_mask_token(tmp_path):
    """LLaDA's tokenizer does not register ``<|mdm_mask|>`` as mask token; fewstep sets it from config.json."""
    vocab = {"<|endoftext|>": 0, "<|eot_id|>": 1, "<|mdm_mask|>": 2, "hello": 3, "world": 4, "[UNK]": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    specials = {"<|endoftext|>": 0, "<|eot_id|>": 1, "<|mdm_mask|>": 2}
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "added_tokens_decoder": _added(specials),
            }
        )
    )
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llada", "mask_token_id": 2}))
    t = fewstep.load_tokenizer(tmp_path)
    assert t.mask_token_id == 2 and t.eos_token_id == 0
    ids = t("hello world", add_special_tokens=False).input_ids
    assert ids == [3, 4] and t.decode(ids) == "hello world"


def test_dream_style_folder_without_remote_code(tmp_path):
    """A Dream folder names a remote tokenizer class; its vocab.json/merges.txt load as Qwen2's tokenizer."""
    vocab = {"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3, "<|im_start|>": 4, "<|im_end|>": 5, "<|mask|>": 6, "Ġ": 7}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "DreamTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "mask_token": "<|mask|>",
                "added_tokens_decoder": _added({"<|endoftext|>": 3, "<|im_start|>": 4, "<|im_end|>": 5, "<|mask|>": 6}),
            }
        )
    )
    t = fewstep.load_tokenizer(tmp_path)
    assert t.mask_token_id == 6 and t.eos_token_id == 3
    assert t("ab a<|im_end|>").input_ids == [2, 7, 0, 5]


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        fewstep.load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fewstep.load_tokenizer(tmp_path / "absent")
