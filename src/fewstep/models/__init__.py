"""Native LLaDA, Dream, LLaDA2-MoE and SDAR models, checkpoint loading/saving and the KV cache."""

from fewstep.models.base import DiffusionLM, KVCache, ModelOutput
from fewstep.models.dream import DreamConfig, DreamModel
from fewstep.models.llada import LLaDAConfig, LLaDAModel
from fewstep.models.llada2 import LLaDA2Config, LLaDA2Model
from fewstep.models.loading import (
    build_model,
    checkpoint_block_length,
    load_model,
    load_tokenizer,
    read_config,
    save_model,
)
from fewstep.models.sdar import SDARConfig, SDARModel

__all__ = [
    "DiffusionLM",
    "DreamConfig",
    "DreamModel",
    "KVCache",
    "LLaDA2Config",
    "LLaDA2Model",
    "LLaDAConfig",
    "LLaDAModel",
    "ModelOutput",
    "SDARConfig",
    "SDARModel",
    "build_model",
    "checkpoint_block_length",
    "load_model",
    "load_tokenizer",
    "read_config",
    "save_model",
]
