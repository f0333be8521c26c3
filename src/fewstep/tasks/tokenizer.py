"""Moved to :mod:`fewstep.models.tokenizer` (tokenizer helpers sit below training and the CLI); kept as an alias."""

from fewstep.models.tokenizer import (  # noqa: F401
    SPECIAL_TOKENS,
    build_word_tokenizer,
    eot_token_id,
    save_tokenizer,
    special_ids,
)
