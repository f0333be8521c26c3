"""Save checkpoints as drop-in replacements of the folder they were trained from.

A student (``fewstep distill``), a merged adapter (``fewstep merge-lora``) or a checkpoint written while
training is saved *as its base folder is*: ``config.json`` keeps every key of the base's (``auto_map``
included; only what training changed differs), every non-weight file of the base folder is copied
unchanged (remote-code ``configuration_*.py`` / ``modeling_*.py``, ``generation_config.json``, tokenizer
files, chat template), and the weights are sharded with the base's own file names and key grouping
when the base is sharded. Only the weights, the model card (``README.md``) and the recommended decoding
(``decoding.json``: :func:`write_decoding`, :func:`read_decoding`) are fewstep's own. So a student of
LLaDA-8B-Instruct loads with ``trust_remote_code=True`` and is served by engines that read the original
layout, exactly like its base.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

#: A checkpoint's recommended decoding, beside its config.json: what ``fewstep generate``, ``fewstep serve``
#: and ``fewstep rollout`` use for the settings their command line leaves unset.
DECODING = "decoding.json"
#: The settings ``decoding.json`` may hold, with their JSON types.
DECODING_KEYS: dict[str, type] = {
    "policy": str,
    "gen_length": int,
    "block_length": int,
    "cache": str,
    "early_stop": bool,
}
#: Files of a base folder that are not copied: the weights (written anew), the model card and the
#: recommended decoding (fewstep's own) and fewstep's run artefacts, which describe the base, not the student.
NOT_COPIED = frozenset(
    {
        "config.json",
        "model.safetensors.index.json",
        "README.md",
        DECODING,
        "training.json",
        "train_log.jsonl",
        "loss.png",
    }
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
INDEX = "model.safetensors.index.json"


def base_folder_of(model: torch.nn.Module) -> Path | None:
    """The checkpoint folder ``model`` was loaded from (``fewstep.load_model`` records it), if any."""
    path = getattr(model, "checkpoint_path", None)
    return Path(path) if path and Path(path).is_dir() else None


def merged_config(
    model: torch.nn.Module, base_config: dict[str, Any] | None, stored: torch.dtype, complete: bool = False
) -> dict[str, Any]:
    """The base's config.json with only what differs in ``model.config`` changed, and the stored dtype.

    ``complete`` also adds the keys fewstep's config writes that the base lacks (a config built from a
    preset or a partial config.json, as in pretraining); a base checkpoint folder keeps exactly its keys.
    """
    now = model.config.to_dict()
    if base_config is None:
        cfg = now
    else:
        # Compare against the base as fewstep's config class writes it, so that representation
        # differences (defaults filled in, lists vs tuples) do not count as changes.
        native = type(model.config).from_dict(dict(base_config)).to_dict()
        cfg = {**now, **base_config} if complete else dict(base_config)
        cfg.update({k: v for k, v in now.items() if native.get(k) != v})
    cfg["torch_dtype"] = str(stored).removeprefix("torch.")
    return cfg


def copy_base_files(base: Path, folder: Path) -> list[str]:
    """Copy every non-weight file of ``base`` into ``folder`` unchanged; the names copied."""
    copied = []
    for f in sorted(base.iterdir()):
        weights = f.name.endswith(_WEIGHT_SUFFIXES) or f.name.endswith(".index.json")  # shards and their indexes
        if f.is_file() and f.name not in NOT_COPIED and not weights:
            shutil.copy2(f, folder / f.name)
            copied.append(f.name)
    return copied


def shard_plan(
    tensors: dict[str, torch.Tensor], base: Path | None, max_shard_bytes: int | None
) -> dict[str, list[str]] | None:
    """File name -> keys: the base's own sharding when it is sharded and holds the same keys, else shards
    of at most ``max_shard_bytes``; None for a single ``model.safetensors``."""
    if base is not None and (base / INDEX).is_file() and max_shard_bytes is None:
        weight_map = json.loads((base / INDEX).read_text()).get("weight_map", {})
        if set(weight_map) == set(tensors):
            plan: dict[str, list[str]] = {}
            for key, fname in weight_map.items():
                plan.setdefault(fname, []).append(key)
            return plan
    if max_shard_bytes is None:
        return None
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": keys for i, keys in enumerate(shards)}


def write_weights(tensors: dict[str, torch.Tensor], folder: Path, plan: dict[str, list[str]] | None) -> None:
    """``model.safetensors``, or the shards of ``plan`` and their ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    for stale in [*folder.glob("model*.safetensors"), folder / INDEX]:
        stale.unlink(missing_ok=True)
    if plan is None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    for fname, keys in plan.items():
        save_file({k: tensors[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: f for f, keys in plan.items() for k in keys}}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def save_checkpoint(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    base: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> list[str]:
    """Write ``model`` (or ``state_dict`` with ``model``'s config and key names) as a HF folder.

    ``base`` (default: the folder ``model`` was loaded from) is mirrored: its config keys, its non-weight
    files and its sharding. Without a base folder, ``model.source_config`` (the config.json a model was
    built from, set by ``fewstep pretrain``) supplies the keys to keep. Returns the names copied from base.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_dir = Path(base) if base is not None else base_folder_of(model)
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {}
    for k, p in state.items():
        t = p.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[model.checkpoint_key(k)] = t.contiguous().cpu()
    copied = (
        copy_base_files(base_dir, folder) if base_dir is not None and base_dir.resolve() != folder.resolve() else []
    )
    stored = next(iter(tensors.values())).dtype
    if base_dir is not None:
        cfg = merged_config(model, json.loads((base_dir / "config.json").read_text()), stored)
    else:
        cfg = merged_config(model, getattr(model, "source_config", None), stored, complete=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_weights(tensors, folder, shard_plan(tensors, base_dir, max_shard_bytes))
    return copied


def cast_weights(folder: str | os.PathLike, dtype: torch.dtype) -> None:
    """Re-save a folder's floating-point weights (single file or shards) in ``dtype``; config records it."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {str(folder)!r}")
    for f in files:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(f)).items()}
        save_file(tensors, str(f), metadata={"format": "pt"})
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        index.setdefault("metadata", {})["total_size"] = sum(
            sum(v.numel() * v.element_size() for v in load_file(str(f)).values()) for f in files
        )
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _checked_decoding(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """``settings`` if every key is one of :data:`DECODING_KEYS` with its type; ValueError (one line) otherwise."""
    for key, value in settings.items():
        kind = DECODING_KEYS.get(key)
        if kind is None:
            raise ValueError(f"{where}: unknown decoding setting {key!r} (known: {', '.join(DECODING_KEYS)})")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where}: {key} must be a JSON {kind.__name__}, got {value!r}")
    return settings


def write_decoding(folder: str | os.PathLike, **settings: Any) -> Path:
    """Write a checkpoint's recommended decoding (``policy``, ``gen_length``, ``block_length``, ``cache``,
    ``early_stop``; the ones given) to ``folder/decoding.json``; returns its path."""
    path = Path(folder) / DECODING
    path.write_text(json.dumps(_checked_decoding(dict(settings), str(path)), indent=2) + "\n")
    return path


def read_decoding(folder: str | os.PathLike) -> dict[str, Any]:
    """The recommended decoding of a checkpoint folder (``decoding.json``), or ``{}`` without one."""
    path = Path(folder) / DECODING
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must hold a JSON object of decoding settings")
    return _checked_decoding(settings, str(path))


def recommended(folder: str | os.PathLike, given: dict[str, Any], fallback: dict[str, Any]) -> dict[str, Any]:
    """For each setting of ``fallback``: the ``given`` value when it is set (not None), else the checkpoint's
    recommendation (:func:`read_decoding`), else the ``fallback`` (the command's own default)."""
    rec = read_decoding(folder)
    return {k: given[k] if given.get(k) is not None else rec.get(k, default) for k, default in fallback.items()}
