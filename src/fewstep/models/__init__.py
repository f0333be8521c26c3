"""Native LLaDA and Dream models, checkpoint loading/saving and the KV cache."""

from fewstep.models.base import DiffusionLM, KVCache, ModelOutput
from fewstep.models.dream import DreamConfig, DreamModel
from fewstep.models.llada import LLaDAConfig, LLaDAModel
from fewstep.models.loading import build_model, load_model, load_tokenizer, read_config, save_model

__all__ = [
    "DiffusionLM",
    "DreamConfig",
    "DreamModel",
    "KVCache",
    "LLaDAConfig",
    "LLaDAModel",
    "ModelOutput",
    "build_model",
    "load_model",
    "load_tokenizer",
    "read_config",
    "save_model",
]
