"""The task's word-level tokenizer: saved as stock HF files, loaded by AutoTokenizer, exact round trip."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

import fewstep
from fewstep.models.tokenizer import SPECIAL_TOKENS, build_word_tokenizer, special_ids
from fewstep.tasks.arith import ArithConfig, generate


def test_round_trip_through_autotokenizer(tmp_path):
    cfg = ArithConfig()
    build_word_tokenizer(cfg.vocabulary(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    for tok in (AutoTokenizer.from_pretrained(str(tmp_path)), fewstep.load_tokenizer(tmp_path)):
        ids = special_ids(tok)
        assert ids == {"pad": 0, "eos": 2, "eot": 3, "mask": 4}
        assert tok.convert_ids_to_tokens([ids["mask"], ids["eos"], ids["eot"], ids["pad"]]) == [
            SPECIAL_TOKENS["mask_token"],
            SPECIAL_TOKENS["eos_token"],
            SPECIAL_TOKENS["eot_token"],
            SPECIAL_TOKENS["pad_token"],
        ]
        assert len(tok) == 5 + len(cfg.vocabulary())
        for p in generate("test", 50, seed=0):
            for text in (p.prompt, p.response):
                enc = tok(text, add_special_tokens=False).input_ids
                assert len(enc) == len(text.split())  # one word, one token
                assert tok.unk_token_id not in enc
                assert tok.decode(enc) == text
        # special tokens are atomic and dropped by skip_special_tokens
        enc = tok("1 + 1 = 2 #### 2 <|endoftext|> <|mdm_mask|>", add_special_tokens=False).input_ids
        assert enc[-2:] == [ids["eos"], ids["mask"]]
        assert tok.decode(enc, skip_special_tokens=True) == "1 + 1 = 2 #### 2"
        assert tok("banana", add_special_tokens=False).input_ids == [tok.unk_token_id]


def test_rejects_words_with_spaces(tmp_path):
    import pytest

    with pytest.raises(ValueError):
        build_word_tokenizer(["a b"])
