"""Teacher rollouts: self-distillation data as dParallel uses it (algorithms.md section 3.2).

The teacher answers a prompt set with a chosen decoding policy (batched through the text layer,
:class:`fewstep.decoding.text.TextGenerator`), each answer is checked by the prompt set's verifier where one exists, and
the answers are kept or dropped as configured (``correct``, ``all``, ``incorrect``). The output is a
folder of JSONL shards whose records carry ``prompt`` and ``response`` (what ``fewstep distill``
reads), the verdict and generation statistics.

Prompt sets and verifiers come from the one benchmark registry (:mod:`fewstep.eval.benchmarks`): a task
with training prompts (``Task.train``: the embedded task ``arith``, GSM8K's train split under an
evaluation prompt protocol) is a prompt set, and a task that checks answers in-process (``judge`` or
``extract`` + ``check``) is a verifier (:func:`task_verifier`), so a benchmark is registered once.

Resumability. Each process writes its own shard ``shard-RRRRR-of-WWWWW.jsonl`` and a progress index
``shard-RRRRR-of-WWWWW.progress.json``. After each batch the kept records are appended to the shard
and fsync'ed, then the index (batches done, shard size in bytes, running statistics) is replaced
atomically (temporary file + ``os.replace``). A restarted run truncates the shard to the size the
index recorded (dropping the records of a batch whose index update never happened) and continues
with the next batch: a run killed at any moment (SIGKILL included) loses no finished record and
writes none twice. Sampling seeds are per prompt (``seed + prompt index``), so a regenerated batch
is the batch that was lost, and the results do not depend on the batch size or the number of
processes.

Trajectory rollouts (``trajectory=True``, d3LLM's stage 1: :func:`answer_trajectories`): the teacher
decodes one token per forward, and each record also holds the forward that committed every answer
position (``commit_rank``), retried at rising temperature until the verifier accepts.

Multi-process (``accelerate launch`` / ``torchrun``): prompts are ordered (by token length when
``sort_by_length``, which keeps batches tight) and process ``r`` of ``W`` takes every ``W``-th prompt
starting at ``r`` (a disjoint, balanced slice).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fewstep.decoding.text import encode, has_chat_template, render
from fewstep.eval.benchmarks import TASKS, Record, get_task

Verifier = Callable[[Record, str], bool]
KEEP_MODES = ("correct", "all", "incorrect")
CHAT_MODES = ("auto", "on", "off")
MANIFEST = "rollout.json"

# -- prompt sets and verifiers: the benchmark registry ----------------------------------------------------


def prompt_set_names() -> list[str]:
    """The registered tasks that lend training prompts (``--prompts NAME``)."""
    return sorted(name for name, task in TASKS.items() if task.train is not None)


def verifier_names() -> list[str]:
    """The registered tasks that check answers in-process (``--verifier NAME``), with their aliases."""
    return sorted(n for name, task in TASKS.items() if task.verifies for n in (name, *task.aliases))


def task_verifier(task: Any) -> Verifier:
    """``verify(record, response) -> bool`` of an evaluation task (a registered name or a task object): its
    ``judge``, else its ``extract(record, response)`` then ``check(record, extracted)``. A record's ``gold``
    is copied to the fields the benchmarks' checkers read (``target`` for GSM8K, ``answer`` for MATH) when
    they are absent."""
    if isinstance(task, str):
        task = get_task(task)
    judge = getattr(task, "judge", None)
    if judge is None and getattr(task, "check", None) is None:
        raise ValueError(f"task {getattr(task, 'name', task)!r} has no answer checker (code tasks need a sandbox)")

    def verify(record: Record, response: str) -> bool:
        if "gold" in record:
            record = {"target": record["gold"], "answer": record["gold"], **record}
        if judge is not None:
            return bool(judge(record, response)[1])
        extracted = task.extract(record, response)
        return extracted is not None and bool(task.check(record, extracted))

    return verify


def get_verifier(name: str) -> Verifier:
    """The verifier of the task registered as ``name`` (ValueError listing the known names otherwise)."""
    if name not in verifier_names():
        raise ValueError(f"unknown verifier {name!r} (known: {', '.join(verifier_names())}, none)")
    return task_verifier(name)


# -- prompts -----------------------------------------------------------------------------------------------


def load_prompts(
    source: str, *, limit: int | None = None, seed: int = 0, prompt_field: str = "prompt", protocol: str | None = None
) -> tuple[list[Record], str | None]:
    """Prompt records of a registered prompt set or a JSONL file, and the default verifier name.

    A JSONL line is an object with a string ``prompt_field``; its other fields are kept (a verifier may
    read them). Records without an ``id`` get their 1-based position among the records.
    """
    if source in prompt_set_names():
        task = get_task(source)
        return task.train.load(limit, seed, protocol), task.name if task.verifies else None
    if protocol is not None:
        raise ValueError("--protocol applies to a named prompt set, not to a JSONL file")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts {source!r} are neither a prompt set ({', '.join(prompt_set_names())}) nor a JSONL file"
        )
    from fewstep.train.data import read_jsonl

    records = []
    for i, rec in enumerate(read_jsonl(path, (prompt_field,), limit), 1):
        records.append({**rec, "prompt": rec[prompt_field], "id": str(rec.get("id", i))})
    return records, None


def render_prompt(record: Record, tokenizer: Any, chat: str = "auto") -> str:
    """The exact text the model conditions on: the chat template around the prompt (``chat="on"``, or
    ``"auto"`` when the tokenizer has one and the record is not ``raw``), else the prompt itself; plus
    the record's ``gen_prefix`` (rendered by the text layer, :func:`fewstep.decoding.text.render`)."""
    if chat not in CHAT_MODES:
        raise ValueError(f"chat must be one of {', '.join(CHAT_MODES)}; got {chat!r}")
    messages = record.get("messages")
    use = chat == "on" or (chat == "auto" and has_chat_template(tokenizer) and not record.get("raw"))
    if messages is not None and chat != "off" and not use:
        raise ValueError(f"prompt {record.get('id')!r} is a chat conversation but the tokenizer has no chat template")
    if use and not has_chat_template(tokenizer):
        raise ValueError("--chat-template on, but the tokenizer has no chat template")
    prompt = (messages or record["prompt"]) if use else record["prompt"]
    return render(tokenizer, prompt, chat=use, prefix=record.get("gen_prefix", ""))


# -- the run -----------------------------------------------------------------------------------------------


@dataclass
class RolloutConfig:
    """Settings of a rollout run (what ``rollout.json`` records; a resumed run must match them)."""

    out_dir: str
    model: str
    prompts: str
    policy: str = "llada"
    gen_length: int = 256
    block_length: int = 32
    cache: str = "none"
    batch_size: int = 32
    keep: str = "correct"
    verifier: str | None = None
    limit: int | None = None
    seed: int = 0
    chat: str = "auto"
    early_stop: bool = True
    eos_fill: bool = False  # d3LLM's end-of-text stop (everything after the first EOS at once)
    sort_by_length: bool = True
    prompt_field: str = "prompt"
    protocol: str | None = None
    trajectory: bool = False  # record the teacher's commit order (d3LLM): see answer_trajectories
    attempts: int = 5  # trajectory mode: tries per prompt, at temperature 0.1 x attempt, until verified

    def __post_init__(self) -> None:
        if self.keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_MODES)}; got {self.keep!r}")
        if self.keep != "all" and self.verifier is None:
            raise ValueError(f"--keep {self.keep} needs a verifier, and these prompts have none: pass --keep all")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.chat not in CHAT_MODES:
            raise ValueError(f"chat must be one of {', '.join(CHAT_MODES)}; got {self.chat!r}")
        if self.trajectory and (self.early_stop or self.eos_fill):
            raise ValueError("a trajectory rollout commits every answer position by a forward: no early stop")
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")

    def identity(self) -> dict[str, Any]:
        """The settings that must not change between a run and its resumption."""
        skip = {"out_dir"} if self.trajectory else {"out_dir", "trajectory", "attempts"}
        if not self.eos_fill:
            skip.add("eos_fill")  # a manifest written before the option existed matches a run without it
        return {k: v for k, v in asdict(self).items() if k not in skip}


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}"


def shard_files(folder: str | os.PathLike) -> list[Path]:
    """The JSONL shards of a rollout folder, in rank order."""
    return sorted(Path(folder).glob("shard-*-of-*.jsonl"))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON so a reader (or a crash) sees the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(obj, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _new_stats() -> dict[str, float]:
    return {
        "prompts": 0,
        "kept": 0,
        "correct": 0,
        "verified": 0,
        "nfe": 0,
        "tokens": 0,  # committed positions
        "answer_tokens": 0,  # answer tokens before the first EOS
        "seconds": 0.0,
    }


class ShardWriter:
    """One process's shard and its progress index (see the module docstring for the protocol)."""

    def __init__(self, folder: Path, rank: int, world: int):
        self.path = folder / f"{shard_name(rank, world)}.jsonl"
        self.index = folder / f"{shard_name(rank, world)}.progress.json"
        self.batches_done = 0
        self.stats = _new_stats()
        size = 0
        if self.index.is_file():
            state = json.loads(self.index.read_text())
            self.batches_done, size = int(state["batches_done"]), int(state["bytes"])
            self.stats = {**_new_stats(), **state["stats"]}  # an index written before a statistic existed
        on_disk = self.path.stat().st_size if self.path.exists() else 0
        if on_disk < size:
            raise ValueError(f"{self.path} is shorter than its progress index records: the run folder is damaged")
        with open(self.path, "ab") as fh:  # drop records of a batch whose index update never happened
            fh.truncate(size)
            fh.flush()
            os.fsync(fh.fileno())
        self.bytes = size

    def commit(self, records: list[Record], stats: dict[str, float]) -> None:
        """Append ``records`` durably, then advance the index by one batch."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        with open(self.path, "ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self.bytes += len(data)
        self.batches_done += 1
        for k, v in stats.items():
            self.stats[k] += v
        write_json_atomic(self.index, {"batches_done": self.batches_done, "bytes": self.bytes, "stats": self.stats})


def summarize(stats: dict[str, float], seconds: float | None = None) -> dict[str, float]:
    """Rates from summed statistics: acceptance, accuracy, mean NFE, tokens per forward (TPF: answer tokens
    before the first EOS / NFE), positions per forward (committed positions / NFE), and throughput over
    ``seconds`` (default: the summed generation time)."""
    n = max(stats["prompts"], 1)
    seconds = stats["seconds"] if seconds is None else seconds
    return {
        "prompts": int(stats["prompts"]),
        "kept": int(stats["kept"]),
        "acceptance": stats["kept"] / n,
        "accuracy": stats["correct"] / stats["verified"] if stats["verified"] else None,
        "mean_nfe": stats["nfe"] / n,
        "tokens_per_forward": stats.get("answer_tokens", 0) / max(stats["nfe"], 1),
        "positions_per_forward": stats["tokens"] / max(stats["nfe"], 1),
        "prompts_per_second": stats["prompts"] / max(seconds, 1e-9),
        "tokens_per_second": stats["tokens"] / max(seconds, 1e-9),
        "seconds": round(seconds, 3),
    }


def _keep(mode: str, correct: bool | None) -> bool:
    return mode == "all" or (mode == "correct" and correct is True) or (mode == "incorrect" and correct is False)


def prepare_prompts(
    records: list[Record], tokenizer: Any, chat: str, vocab_size: int
) -> tuple[list[str], list[list[int]]]:
    """Rendered prompt texts and their token ids (no special tokens added: a chat template writes its own)."""
    texts = [render_prompt(r, tokenizer, chat) for r in records]
    ids = [encode(tokenizer, t, chat=False) for t in texts]
    unk = getattr(tokenizer, "unk_token_id", None)
    for r, t, row in zip(records, texts, ids):
        if not row:
            raise ValueError(f"prompt {r['id']!r} is empty")
        if unk is not None and unk in row:
            raise ValueError(f"prompt {r['id']!r} has words outside the tokenizer's vocabulary: {t[:80]!r}")
        if max(row) >= vocab_size:
            raise ValueError(f"prompt {r['id']!r} has token ids beyond the model's vocabulary ({vocab_size})")
    return texts, [list(map(int, row)) for row in ids]


def process_order(lengths: Sequence[int], sort_by_length: bool, rank: int, world: int) -> list[int]:
    """Prompt indices this process answers, in order: every ``world``-th of the (length-sorted) order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i)) if sort_by_length else list(range(len(lengths)))
    return order[rank::world]


def _open_run(cfg: RolloutConfig, out: Path, manifest: dict[str, Any], rank: int) -> None:
    """Rank 0 writes the manifest, or checks that the folder holds a run with the same settings."""
    if rank != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    if not path.is_file():
        write_json_atomic(path, manifest)
        return
    old = json.loads(path.read_text())
    diff = [k for k in manifest if old.get(k) != manifest[k]]
    diff += [f"config.{k}" for k in manifest["config"] if old.get("config", {}).get(k) != manifest["config"][k]]
    if diff:
        raise ValueError(
            f"{out} holds a rollout with other settings ({', '.join(d for d in diff if d != 'config')}); "
            "use another --out or --overwrite"
        )


def answer_batch(
    gen: Any, cfg: RolloutConfig, verify: Verifier | None, records: list[Record], texts: list[str], ids, idx: list[int]
) -> tuple[list[Record], dict[str, float]]:
    """Answer prompts ``idx`` through the text layer (seed ``cfg.seed + i`` for prompt ``i``; stop strings
    cut the text only, so NFE is the engine's), verify them; returns the kept records and the batch stats.
    Trajectory rollouts: :func:`answer_trajectories`."""
    if cfg.trajectory:
        return answer_trajectories(gen, cfg, verify, records, texts, ids, idx)
    base = _settings(gen, cfg)
    per = [base.replace(seed=cfg.seed + i, stop=tuple(records[i].get("stop", ()))) for i in idx]
    kept, stats = [], _new_stats()
    for i, o in zip(idx, gen.generate([ids[i] for i in idx], per)):
        correct = bool(verify(records[i], records[i].get("gen_prefix", "") + o.text)) if verify else None
        stats["prompts"] += 1
        stats["nfe"] += o.nfe
        stats["tokens"] += o.committed
        stats["answer_tokens"] += round(o.tokens_per_forward * o.nfe)
        stats["verified"] += correct is not None
        stats["correct"] += bool(correct)
        stats["seconds"] = o.batch_seconds
        if not _keep(cfg.keep, correct):
            continue
        stats["kept"] += 1
        kept.append(_record(cfg, records[i], texts[i], o, correct))
    return kept, stats


def _settings(gen: Any, cfg: RolloutConfig):
    from fewstep.decoding.engine import default_block_length
    from fewstep.decoding.text import GenerationSettings
    from fewstep.models.block import attention_block

    block = default_block_length(attention_block(gen.model), cfg.gen_length, cfg.block_length)
    return GenerationSettings(
        policy=cfg.policy,
        max_tokens=cfg.gen_length,
        block_length=block,
        cache=cfg.cache,
        early_stop=cfg.early_stop,
        eos_fill=cfg.eos_fill,
        cancel_at_stop=False,
    )


def _record(cfg: RolloutConfig, record: Record, text: str, o: Any, correct: bool | None) -> Record:
    rec = {
        "id": record["id"],
        "prompt": text,
        "response": o.text,
        "correct": correct,
        "question": record["prompt"],
        "nfe": o.nfe,
        "tokens_per_forward": round(o.tokens_per_forward, 4),  # answer tokens before the first EOS / NFE
        "positions_per_forward": round(o.committed / max(o.nfe, 1), 4),  # committed positions / NFE
        "response_tokens": o.answer_tokens,
        "finished": o.answer_tokens < cfg.gen_length,  # a stop id ended the answer
        "seconds": round(o.batch_seconds / o.batch_rows, 6),
    }
    return {**rec, **{g: record[g] for g in ("gold", "target", "answer") if g in record}}


def answer_trajectories(
    gen: Any, cfg: RolloutConfig, verify: Verifier | None, records: list[Record], texts: list[str], ids, idx: list[int]
) -> tuple[list[Record], dict[str, float]]:
    """d3LLM's trajectory rollouts of prompts ``idx``: the teacher decodes one token per forward; attempt
    ``a`` (0..``cfg.attempts``-1) samples at temperature ``0.1·a`` (seed ``cfg.seed + i + a·2³²``) and the
    prompts the verifier rejects are tried again; the last attempt is kept when none passes (``correct``
    False). Besides the usual fields each record holds ``commit_rank`` (per answer position, the 0-based
    forward that committed it), ``prompt_tokens``, ``response_ids`` (the answer tokens before the stop id),
    ``attempt`` and ``temperature``. NFE counts every attempt's forwards."""
    from fewstep.distill.d3llm import commit_rank, retry_temperature

    base = _settings(gen, cfg)
    final: dict[int, tuple[Any, bool | None, int]] = {}
    stats = _new_stats()
    pending = list(idx)
    for attempt in range(cfg.attempts):
        t = retry_temperature(attempt)
        per = [
            base.replace(seed=cfg.seed + i + (attempt << 32), temperature=t, stop=tuple(records[i].get("stop", ())))
            for i in pending
        ]
        outs = gen.generate([ids[i] for i in pending], per)
        stats["seconds"] += outs[0].batch_seconds if outs else 0.0
        retry = []
        for i, o in zip(pending, outs):
            correct = bool(verify(records[i], records[i].get("gen_prefix", "") + o.text)) if verify else None
            stats["nfe"] += o.nfe
            stats["tokens"] += o.committed
            stats["answer_tokens"] += round(o.tokens_per_forward * o.nfe)
            final[i] = (o, correct, attempt)
            if correct is False:
                retry.append(i)
        pending = retry
        if not pending:
            break
    kept = []
    for i in idx:
        o, correct, attempt = final[i]
        stats["prompts"] += 1
        stats["verified"] += correct is not None
        stats["correct"] += bool(correct)
        if not _keep(cfg.keep, correct):
            continue
        stats["kept"] += 1
        rank = commit_rank(o.decode_step)
        extra = {
            "commit_rank": rank,
            "prompt_tokens": len(ids[i]),
            "response_ids": [int(t) for t in o.token_ids],
            "attempt": attempt,
            "temperature": retry_temperature(attempt),
        }
        kept.append({**_record(cfg, records[i], texts[i], o, correct), **extra})
    return kept, stats


def run_rollout(
    cfg: RolloutConfig,
    model: Any,
    tokenizer: Any,
    records: list[Record],
    *,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    barrier: Callable[[], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Answer ``records`` with ``model`` and write this process's shard; returns the run summary.

    The manifest ``rollout.json`` is written by rank 0 (``barrier`` synchronises processes); a folder
    holding a run with other settings is refused. ``on_batch(k)`` is called after batch ``k`` is
    committed (tests use it).
    """
    from fewstep.decoding import parse_policy
    from fewstep.decoding.text import TextGenerator

    barrier = barrier or (lambda: None)
    out = Path(cfg.out_dir)
    parse_policy(cfg.policy)  # fail fast on a bad spec
    verify = get_verifier(cfg.verifier) if cfg.verifier else None
    texts, ids = prepare_prompts(records, tokenizer, cfg.chat, int(model.config.vocab_size))
    longest = max(len(r) for r in ids)
    ctx = getattr(model.config, "max_sequence_length", None)
    if ctx is not None and longest + cfg.gen_length > ctx:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + gen_length ({cfg.gen_length}) exceeds the model's context "
            f"({ctx}); lower --gen-length or drop long prompts"
        )
    prompt_hash = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    manifest = {
        "config": cfg.identity(),
        "world_size": world,
        "n_prompts": len(records),
        "prompts_sha256_16": prompt_hash,
    }
    _open_run(cfg, out, manifest, rank)
    barrier()
    writer = ShardWriter(out, rank, world)
    mine = process_order([len(r) for r in ids], cfg.sort_by_length, rank, world)
    batches = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    gen = TextGenerator(model, tokenizer, max_batch=cfg.batch_size)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        done = sum(len(b) for b in batches[: writer.batches_done])
        bar = tqdm(total=len(mine), initial=done, desc="rollout", unit="prompt", dynamic_ncols=True)
    for k in range(writer.batches_done, len(batches)):
        writer.commit(*answer_batch(gen, cfg, verify, records, texts, ids, batches[k]))
        if bar is not None:
            s = summarize(writer.stats)
            bar.update(len(batches[k]))
            bar.set_postfix(
                kept=f"{s['acceptance']:.1%}", nfe=f"{s['mean_nfe']:.1f}", tok_s=f"{s['tokens_per_second']:.0f}"
            )
        if on_batch is not None:
            on_batch(k)
    if bar is not None:
        bar.close()
    barrier()
    summary = collect_summary(out, world)
    if rank == 0:
        manifest["summary"] = summary
        write_json_atomic(out / MANIFEST, manifest)
    return summary


def collect_summary(folder: str | os.PathLike, world: int) -> dict[str, Any]:
    """Summed statistics of every process's progress index, as rates (:func:`summarize`)."""
    total = _new_stats()
    seconds = 0.0
    for r in range(world):
        index = Path(folder) / f"{shard_name(r, world)}.progress.json"
        if not index.is_file():
            continue
        stats = json.loads(index.read_text())["stats"]
        for k, v in stats.items():
            total[k] += v
        seconds = max(seconds, stats["seconds"])
    # processes run in parallel: throughput over the slowest one's generation time
    return {**summarize(total, seconds), "processes": world}
