"""Load and save Hugging Face checkpoint folders with fewstep's native models.

``load_model(path)`` reads ``config.json``, picks the family from ``model_type`` (the model classes
declare theirs: :mod:`fewstep.models.families`), builds the module on the ``meta`` device (no memory), allocates it once on the target device
and dtype, and streams the weights in tensor by tensor from the safetensors shards (single
``model.safetensors`` or sharded with ``model.safetensors.index.json``), reading each tensor's bytes
straight into its parameter. The weights are therefore never held twice (no mmap, no staging copy).
``path`` may also name a model shipped with fewstep (:func:`fewstep.assets.resolve_model`). Every
user mistake is a one-line ``ValueError`` / ``FileNotFoundError`` that says how to fix it. Saving lives in
:mod:`fewstep.models.saving` (a checkpoint is written as a drop-in replacement of its base folder).
"""

from __future__ import annotations

import json
import os
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from fewstep.assets import resolve_model
from fewstep.models.base import ConfigFields, DiffusionLM
from fewstep.models.block import attention_block
from fewstep.models.families import architecture_of, families, model_class

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_SAFE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[key]


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's config.json as a dict, with clear errors for a missing folder or file."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist (pass a local checkpoint folder)")
    if not folder.is_dir():
        raise NotADirectoryError(f"{str(folder)!r} is a file; pass the checkpoint folder that holds config.json")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {str(folder)!r}: is this a Hugging Face checkpoint folder?")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_file} is not valid JSON: {exc}") from None


def weight_files(folder: Path) -> dict[str, list[str]]:
    """Map each safetensors file in ``folder`` to the tensor names it should hold."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index} is not a valid safetensors index ({exc})") from None
        files: dict[str, list[str]] = defaultdict(list)
        for key, fname in weight_map.items():
            files[fname].append(key)
        for fname in files:
            if not (folder / fname).is_file():
                raise FileNotFoundError(f"shard {fname} listed in {index.name} is missing from {folder}")
        return dict(files)
    single = folder / "model.safetensors"
    candidates = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if not candidates:
        extra = " (found pytorch_model*.bin: convert it to safetensors first)" if list(folder.glob("*.bin")) else ""
        raise FileNotFoundError(
            f"no weights in {str(folder)!r}: expected model.safetensors or "
            f"model.safetensors.index.json with its shards{extra}"
        )
    return {f.name: [k for k in read_header(f)[0] if k != "__metadata__"] for f in candidates}


def read_header(file: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the byte offset where its data section starts."""
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file} is not a safetensors file (too short)")
        n = struct.unpack("<Q", raw)[0]
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{file} is not a safetensors file (bad header)") from None
    return header, 8 + n


def checkpoint_dtype(folder: Path, files: dict[str, list[str]]) -> torch.dtype:
    """The dtype the checkpoint stores its (floating) tensors in."""
    header, _ = read_header(folder / next(iter(files)))
    for key, meta in header.items():
        if key != "__metadata__" and meta.get("dtype") in _SAFE_DTYPES:
            return _SAFE_DTYPES[meta["dtype"]]
    return torch.float32


def read_into(fh, offset: int, nbytes: int, src_dtype: torch.dtype, dst: torch.Tensor, chunk: int = 64 << 20) -> None:
    """Stream one tensor's bytes from an open file straight into ``dst``.

    Same dtype on the CPU: the bytes are read directly into the parameter's memory (no copy, no mmap, so
    the weights are never resident twice). Otherwise chunks are read, converted and copied.
    """
    flat = dst.view(-1)
    fh.seek(offset)
    if dst.device.type == "cpu" and dst.dtype == src_dtype and dst.is_contiguous():
        view = memoryview(flat.view(torch.uint8).numpy())
        got = fh.readinto(view)
        if got != nbytes:
            raise ValueError(f"truncated safetensors file {fh.name}: expected {nbytes} bytes, got {got}")
        return
    itemsize = torch.empty((), dtype=src_dtype).element_size()
    step = max(chunk // itemsize, 1)
    done = 0
    total = nbytes // itemsize
    while done < total:
        n = min(step, total - done)
        buf = bytearray(n * itemsize)
        if fh.readinto(buf) != len(buf):
            raise ValueError(f"truncated safetensors file {fh.name}")
        flat[done : done + n].copy_(torch.frombuffer(buf, dtype=src_dtype))
        done += n


def check_device_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Fail early, with the fix, when the device is absent or cannot run the dtype."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available; use --device cpu")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU cannot run bfloat16; load with dtype float16 or float32")
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None])
        _ = a @ a
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device {device} cannot run dtype {dtype} ({str(exc).splitlines()[0]}); choose another --dtype"
        ) from None


def build_model(cfg: dict[str, Any] | ConfigFields) -> DiffusionLM:
    """An uninitialised (meta-device) model for a config dict or config object."""
    if isinstance(cfg, dict):
        model_cls = model_class(architecture_of(cfg))
        cfg = model_cls.config_class.from_dict(cfg)
    else:
        model_cls = next(m for m in families().values() if isinstance(cfg, m.config_class))
    with torch.device("meta"):
        return model_cls(cfg)


def checkpoint_block_length(path: str | os.PathLike) -> int | None:
    """The block size of a block-diffusion checkpoint's attention (LLaDA2, SDAR), read from its config
    without loading weights; None for a full-attention model (LLaDA, Dream). Decoding defaults use it."""
    return attention_block(build_model(read_config(resolve_model(path))))


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> DiffusionLM:
    """Load a checkpoint folder of any family (or a shipped model's name) into a native model, in eval mode.

    ``dtype`` None keeps the checkpoint's own dtype. Weights are read tensor by tensor from the shards
    straight into a model allocated once, so peak memory stays close to the weight bytes.
    """
    folder = resolve_model(path)
    cfg = read_config(folder)
    arch = architecture_of(cfg)
    files = weight_files(folder)
    dtype = parse_dtype(dtype) or checkpoint_dtype(folder, files)
    device = torch.device(device)
    check_device_dtype(device, dtype)
    model = build_model(cfg).to(dtype)  # still on the meta device: no memory yet
    model.to_empty(device=device)
    params = checkpoint_tensors(model)
    expected = {model.checkpoint_key(k): k for k in params}
    found = {k for keys in files.values() for k in keys}
    missing = sorted(set(expected) - found)
    unexpected = sorted(k for k in found - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise ValueError(
            f"checkpoint {str(folder)!r} does not match the {arch} architecture of its config.json: " + "; ".join(parts)
        )
    with torch.no_grad():
        for fname, keys in files.items():
            header, data_start = read_header(folder / fname)
            with open(folder / fname, "rb", buffering=0) as fh:
                for key in keys:
                    if key not in expected:
                        continue
                    meta = header.get(key)
                    if meta is None:
                        raise ValueError(f"tensor {key} is listed for {fname} but is not in that file")
                    param = params[expected[key]]
                    if tuple(meta["shape"]) != tuple(param.shape):
                        raise ValueError(
                            f"tensor {key} has shape {list(meta['shape'])} in the checkpoint but the config "
                            f"implies {list(param.shape)}"
                        )
                    if meta["dtype"] not in _SAFE_DTYPES:
                        raise ValueError(f"tensor {key} has unsupported dtype {meta['dtype']} (expected F32/BF16/F16)")
                    start, end = meta["data_offsets"]
                    read_into(fh, data_start + start, end - start, _SAFE_DTYPES[meta["dtype"]], param.data)
    model.eval()
    model.requires_grad_(False)
    model.checkpoint_path = str(folder)
    return model


def checkpoint_tensors(model: DiffusionLM) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint fills: every parameter and every persistent buffer (LLaDA2's ``expert_bias``)."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items()}


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def save_model(
    model: DiffusionLM,
    path: str | os.PathLike,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
    base: str | os.PathLike | None = None,
) -> None:
    """Save a native model as a Hugging Face folder in the official layout (config.json + safetensors),
    as a drop-in replacement of ``base`` (default: the folder it was loaded from); see
    :func:`fewstep.models.saving.save_checkpoint`."""
    from fewstep.models.saving import save_checkpoint

    save_checkpoint(model, path, base=base, dtype=dtype, max_shard_bytes=max_shard_bytes)


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's (or a shipped model's) tokenizer through ``AutoTokenizer`` (offline, no remote code).

    LLaDA's tokenizer does not register its mask token; fewstep sets it from ``config.json`` so that
    ``tokenizer.mask_token_id`` is always the diffusion mask id. Dream folders whose tokenizer needs
    remote code fall back to transformers' Qwen2 tokenizer over the same ``vocab.json``/``merges.txt``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder = resolve_model(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {str(folder)!r}")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers warns that it does not know model_type "llada": we know
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
            raise ValueError(f"could not load the tokenizer in {folder}: {exc}") from None
        from transformers import Qwen2TokenizerFast

        tok = Qwen2TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    cfg_file = folder / "config.json"
    if tok.mask_token is None and cfg_file.is_file():
        mask_id = json.loads(cfg_file.read_text()).get("mask_token_id")
        if mask_id is not None and mask_id < len(tok):
            tok.mask_token = tok.convert_ids_to_tokens(int(mask_id))
    return tok
