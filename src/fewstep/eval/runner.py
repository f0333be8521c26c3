"""`fewstep eval` as a library: generate through the text layer, score, measure speed, resume.

Layout of an output folder::

    DIR/config.json     the settings the records belong to (a resumed run must match them)
    DIR/records.jsonl   one line per record, appended batch by batch (fsync'd), never rewritten
    DIR/summary.json    accuracy + speed, recomputed from records.jsonl at the end of every run

A run killed at any moment (even SIGKILL) resumes from ``records.jsonl``: a torn last line is
dropped, records already there are neither regenerated nor duplicated.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fewstep.eval.benchmarks import Task, get_task
from fewstep.eval.protocols import get_protocol
from fewstep.eval.sandbox import Limits, Sandbox
from fewstep.eval.scoring import score

# Settings that change what is generated: a resumed run must use the same ones.
IDENTITY_KEYS = (
    "model",
    "task",
    "protocol",
    "policy",
    "cache",
    "gen_length",
    "block_length",
    "batch_size",
    "dtype",
    "early_stop",
    "eos_fill",
    "seed",
)
# the value an identity key had before it existed (a config.json written then lacks it)
IDENTITY_DEFAULTS = {"eos_fill": False}


@dataclass
class EvalSettings:
    """Everything ``fewstep eval`` needs besides the model itself."""

    model: str
    task: str
    policy: str = "threshold:0.9"
    cache: str = "none"
    protocol: str | None = None
    gen_length: int = 256
    block_length: int | None = None  # None: 32 (at most gen_length), or a block-diffusion model's block size
    batch_size: int = 1
    limit: int | None = None
    out: str = "eval-out"
    device: str | None = None
    dtype: str | None = None
    early_stop: bool = True
    eos_fill: bool = False  # d3LLM's end-of-text stop: everything after the first EOS at once (no forward)
    seed: int | None = None
    baseline: str | None = None  # an earlier eval folder (or its summary.json) to compute the speedup against
    workers: int = 2
    timeout: float = 10.0
    progress: bool = True

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IDENTITY_KEYS}


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Complete records of a records.jsonl; a torn last line (killed mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    records = []
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{lineno}: corrupt record line; move the file away to start over") from None
    return records


def _check_identity(out: Path, settings: EvalSettings) -> None:
    cfg_path = out / "config.json"
    mine = settings.identity()
    if cfg_path.exists():
        theirs = json.loads(cfg_path.read_text())
        diff = [k for k in IDENTITY_KEYS if theirs.get(k, IDENTITY_DEFAULTS.get(k)) != mine[k]]
        if diff:
            k = diff[0]
            raise ValueError(
                f"{out} holds a run with {k}={theirs.get(k)!r}, not {mine[k]!r}; "
                "resume with the same settings or choose another --out"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(json.dumps(mine, indent=2) + "\n")


def _device_and_dtype(settings: EvalSettings) -> tuple[str, str]:
    import torch

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = settings.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    return device, dtype


def run_eval(settings: EvalSettings, *, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Generate and score the pending records of ``settings.task``, then write and return the summary."""
    from fewstep.decoding import parse_policy
    from fewstep.decoding.engine import default_block_length
    from fewstep.decoding.text import TextGenerator
    from fewstep.models import checkpoint_block_length, load_model, load_tokenizer

    task = get_task(settings.task)
    protocol = get_protocol(task.name, settings.protocol)
    settings.protocol = protocol.name
    parse_policy(settings.policy)  # a bad spec fails before anything is loaded
    device, dtype = _device_and_dtype(settings)
    settings.device, settings.dtype = device, dtype
    if settings.block_length is None:
        settings.block_length = default_block_length(checkpoint_block_length(settings.model), settings.gen_length)
    if settings.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    out = Path(settings.out)
    _check_identity(out, settings)
    rec_path = out / "records.jsonl"
    done = {str(r["id"]) for r in _read_records(rec_path)}
    targets = task.eval_records(settings.limit)
    pending = [r for r in targets if str(r["id"]) not in done]

    if pending:
        if model is None:
            model = load_model(settings.model, dtype=dtype, device=device)
        if tokenizer is None:
            tokenizer = load_tokenizer(settings.model)
        gen = TextGenerator(model, tokenizer, max_batch=settings.batch_size)
        sandbox = Sandbox(Limits(timeout=settings.timeout)) if task.kind == "code" else None
        bar = _progress(settings.progress, task.name)
        with rec_path.open("a", encoding="utf-8") as sink, bar as p:
            tid = p.add_task(task.name, total=len(targets), completed=len(targets) - len(pending)) if p else None
            for start in range(0, len(pending), settings.batch_size):
                batch = pending[start : start + settings.batch_size]
                lines = _run_batch(task, protocol, batch, gen, settings, sandbox)
                sink.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
                sink.flush()
                os.fsync(sink.fileno())
                if p is not None:
                    p.advance(tid, len(batch))
    summary = summarize_run(task, out, settings)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _run_batch(task: Task, protocol, batch, gen, settings: EvalSettings, sandbox) -> list[dict]:
    """One batch through the text layer (stop strings cut the text only: NFE is the engine's), scored."""
    from fewstep.decoding.text import GenerationSettings

    prompts = [protocol(r) for r in batch]
    same = {k: getattr(settings, k) for k in ("policy", "block_length", "cache", "early_stop", "eos_fill")}
    base = GenerationSettings(max_tokens=settings.gen_length, chat=False, cancel_at_stop=False, **same)
    seed = settings.seed  # row i of a batch uses seed + i, as fewstep.generate(seed=int) does
    per = [base.replace(stop=p.stop, seed=None if seed is None else seed + i) for i, p in enumerate(prompts)]
    outs = gen.generate([p.render(gen.tokenizer) for p in prompts], per)
    responses = [p.gen_prefix + o.text for p, o in zip(prompts, outs)]
    scored = score(task, list(zip(batch, responses)), sandbox=sandbox, workers=settings.workers)
    return [
        {
            "id": rec["id"],
            "response": responses[i],
            "extracted": s.extracted,
            "passed": s.passed,
            "reason": s.reason,
            **o.stats(),
        }
        for i, (rec, s, o) in enumerate(zip(batch, scored, outs))
    ]


def _load_baseline(path: str) -> dict[str, Any]:
    p = Path(path)
    p = p / "summary.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"baseline summary not found: {p}")
    return json.loads(p.read_text())


def parallelism(recs: list[dict[str, Any]], path: Path | str = "records.jsonl") -> dict[str, float | None]:
    """The two parallelism figures of a set of records, pooled as d3LLM's harness pools TPF (sums over the
    records, then one ratio): ``tokens_per_forward`` = answer tokens before the first EOS / NFE and
    ``positions_per_forward`` = committed positions / NFE. Records of a fewstep older than these figures
    (``tokens_per_step`` only) are refused with a one-line error: TPF cannot be recovered from them."""
    old = next((r for r in recs if "tokens_per_forward" not in r), None)
    if old is not None:
        raise ValueError(
            f"{path}: record {old.get('id')!r} has no tokens_per_forward (written by an older fewstep); "
            "re-run it into a new --out"
        )
    nfe = sum(r["nfe"] for r in recs)
    if not nfe:
        return {"tokens_per_forward": None, "positions_per_forward": None}
    tokens = sum(round(r["tokens_per_forward"] * r["nfe"]) for r in recs)
    positions = sum(r["positions_per_forward"] * r["nfe"] for r in recs)
    return {"tokens_per_forward": tokens / nfe, "positions_per_forward": positions / nfe}


def summarize_run(task: Task, out: Path, settings: EvalSettings) -> dict[str, Any]:
    """Accuracy and speed over the records of this run's target set, from records.jsonl."""
    wanted = {str(r["id"]) for r in task.eval_records(settings.limit)}
    recs = [r for r in _read_records(out / "records.jsonl") if str(r["id"]) in wanted]
    n = len(recs)
    correct = sum(bool(r["passed"]) for r in recs)
    gen_seconds = sum(r["latency_s"] for r in recs)  # = total generation time (latency is per batch / rows)
    tokens = sum(r["gen_tokens"] for r in recs)
    summary: dict[str, Any] = {
        "task": task.name,
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "mean_nfe": statistics.fmean(r["nfe"] for r in recs) if recs else None,
        **parallelism(recs, out / "records.jsonl"),
        "latency_per_sample_s": gen_seconds / n if n else None,
        "tokens_per_s": tokens / gen_seconds if gen_seconds > 0 else None,
        "mean_gen_tokens": tokens / n if n else None,
        "speedup": None,
        "nfe_reduction": None,
        "baseline": None,
        "complete": n == len(wanted),
        **{k: v for k, v in asdict(settings).items() if k in (*IDENTITY_KEYS, "device", "limit")},
        "torch": _torch_version(),
        "gpu": _gpu_name(settings.device),
        "host": platform.node(),
    }
    if settings.baseline:
        base = _load_baseline(settings.baseline)
        summary["baseline"] = str(settings.baseline)
        if base.get("latency_per_sample_s") and summary["latency_per_sample_s"]:
            summary["speedup"] = base["latency_per_sample_s"] / summary["latency_per_sample_s"]
        if base.get("mean_nfe") and summary["mean_nfe"]:
            summary["nfe_reduction"] = base["mean_nfe"] / summary["mean_nfe"]
        for key in ("device", "dtype", "batch_size", "gpu"):
            if base.get(key) != summary.get(key):
                summary.setdefault("warnings", []).append(
                    f"baseline {key} {base.get(key)!r} differs from this run's {summary.get(key)!r}: the speedup compares unlike runs"
                )
    return summary


def _torch_version() -> str:
    import torch

    return torch.__version__


def _gpu_name(device: str | None) -> str | None:
    import torch

    if device and str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return None


def _progress(enabled: bool, label: str):
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"eval {label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
