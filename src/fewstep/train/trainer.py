"""The one trainer of fewstep: pretraining and distillation, on ``accelerate`` (+ ``peft`` for LoRA).

The trainer owns devices, optimisation, checkpoints and logging; an :class:`~fewstep.train.objective.
Objective` owns batches and the loss. One command therefore runs on a CPU, on one GPU, or on many
GPUs with DDP, FSDP or DeepSpeed, chosen by ``accelerate launch --config_file ...``.

Determinism and resume. Everything random is a pure function of ``(seed, step)``: the data order of
epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``, and the masks of step
``s`` come from a generator seeded with ``(seed, s)``. Every process builds the same *global* batch
and takes its own rows, so the loss trajectory does not depend on the number of processes (for a
fixed global batch). A checkpoint holds the model, the optimiser and every process's RNG state
(``accelerator.save_state``) plus the step; a run killed at any point (SIGKILL included) and started
again with the same arguments continues from its last checkpoint and reaches the same weights and
optimiser state as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep.distributed import close_process_group_at_exit
from fewstep.train import checkpoint as ckpt
from fewstep.train.config import TrainConfig
from fewstep.train.lora import AdapterDisabledTeacher, apply_lora, is_peft
from fewstep.train.objective import Objective


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR at optimiser step ``step`` (0-based): linear warm-up, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    lo = cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        start = cfg.max_steps - cfg.decay_steps
        if step < start or cfg.decay_steps <= 0:
            return 1.0
        progress = min(1.0, (step - start + 1) / cfg.decay_steps)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    return lo + (1 - lo) * (1 - progress)


def seeded(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by ``(seed, *keys)`` (independent streams for data order and masks)."""
    h = seed
    for k in keys:
        h = (h * 1_000_003 + k + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(h)


def global_batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of optimiser step ``step``: consecutive slices of per-epoch permutations."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=seeded(seed, 0, epoch))
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
        pos += take
    return out


def _split_rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in batch.items()}


class Trainer:
    """Train ``model`` with ``objective`` on tokenized ``examples``.

    ``teacher``: a frozen model for objectives with ``needs_teacher`` (CD4LM). If None and the objective
    needs one, the trainer uses the base model with the LoRA adapter disabled (no second copy) or,
    with full fine-tuning, a frozen copy made before training. ``tokenizer`` is saved with every HF
    export. ``on_checkpoint(step, hf_folder)`` runs on the main process after each save (evaluation).
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        examples: Sequence[dict[str, Any]],
        config: TrainConfig,
        *,
        tokenizer: Any = None,
        teacher: nn.Module | None = None,
        on_checkpoint: Callable[[int, Path], dict[str, float] | None] | None = None,
        accelerator: Any = None,
    ):
        from accelerate import Accelerator

        if not examples:
            raise ValueError("no training examples")
        self.cfg = config
        self.objective = objective
        self.examples = examples
        self.tokenizer = tokenizer
        self.on_checkpoint = on_checkpoint
        self.out = Path(config.out_dir)
        self.accelerator = accelerator or Accelerator(mixed_precision="bf16" if config.bf16 else "no")
        close_process_group_at_exit()
        acc = self.accelerator
        world = acc.num_processes
        from accelerate.utils import set_seed

        set_seed(config.seed, device_specific=True)  # global RNGs (dropout etc.): saved and restored with checkpoints
        if config.batch_size % (world * config.grad_accum):
            raise ValueError(
                f"batch_size {config.batch_size} is not divisible by processes ({world}) x grad_accum "
                f"({config.grad_accum})"
            )
        self.micro = config.batch_size // (world * config.grad_accum)
        objective.logit_shift = int(getattr(model, "logit_shift", 0))
        self.base_model = model  # unwrapped fewstep model (config, checkpoint keys)
        if config.gradient_checkpointing:
            model.gradient_checkpointing = True
        if objective.needs_teacher and teacher is None and config.lora is None:
            teacher = copy.deepcopy(model)
        model.train()
        if config.lora is not None:
            model = apply_lora(model, config.lora)
        else:
            model.requires_grad_(True)
        if objective.needs_teacher and teacher is None:
            teacher = AdapterDisabledTeacher(model)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(acc.device)
        self.teacher = teacher
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
            betas=config.betas,
        )
        self.deepspeed = getattr(acc.state, "deepspeed_plugin", None) is not None
        if self.deepspeed:  # no dataloader to infer from; the trainer accumulates (and scales) itself
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds.update(train_micro_batch_size_per_gpu=self.micro, gradient_accumulation_steps=1)
            ds["train_batch_size"] = self.micro * world
            if config.grad_clip > 0:
                ds["gradient_clipping"] = config.grad_clip
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.window: list[dict[str, float]] = []  # per-step logs since the last history record
        self.invocations: list[dict[str, Any]] = []  # commands that produced this run, with their start step
        self.elapsed = 0.0

    # -- checkpoints --------------------------------------------------------------------------------
    def resume(self) -> bool:
        """Load the run folder's latest checkpoint if there is one; True if it resumed."""
        found = ckpt.latest_checkpoint(self.out)
        if found is None:
            return False
        state = ckpt.read_state(found)
        self.accelerator.load_state(str(found / "accelerate"))
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.window = list(state.get("window", []))
        self.invocations = list(state.get("invocations", []))
        self.elapsed = float(state.get("elapsed", 0.0))
        return True

    def resume_checked(self) -> list[str] | None:
        """Resume from the run folder if it holds a checkpoint of a compatible run (the one rule,
        :func:`fewstep.train.checkpoint.resume_changes`); None if there was nothing to resume, else the
        schedule changes of this invocation (ValueError for an incompatible run)."""
        found = ckpt.latest_checkpoint(self.out)
        if found is None:
            return None
        changes = ckpt.resume_changes(ckpt.read_state(found)["config"], self.cfg.to_dict(), self.out)
        self.resume()
        return changes

    def save(self) -> Path:
        """Write checkpoint ``step-N`` atomically (state for resuming + an HF export) and prune old ones."""
        acc = self.accelerator
        final = ckpt.step_dir(self.out, self.step)
        tmp = final.parent / f".tmp-{final.name}"
        if acc.is_main_process:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "accelerate"))
        self.export(tmp / "hf", merge_lora=False)
        if acc.is_main_process:
            ckpt.write_state(tmp, self.state_dict())
            if final.exists():
                import shutil

                shutil.rmtree(final)
            tmp.rename(final)
            ckpt.prune(self.out, self.cfg.keep_checkpoints)
            self.write_logs()
        acc.wait_for_everyone()
        return final

    def state_dict(self) -> dict[str, Any]:
        """What ``trainer_state.json`` holds besides the accelerate state."""
        return {
            "step": self.step,
            "history": self.history,
            "window": self.window,
            "invocations": self.invocations,
            "elapsed": self.elapsed,
            "config": self.cfg.to_dict(),
        }

    def export(self, folder: Path, merge_lora: bool = True) -> None:
        """Write an HF folder of the current weights (+ tokenizer). With LoRA: the adapter in
        ``folder/adapter`` and, if ``merge_lora``, the merged model in ``folder`` itself."""
        acc = self.accelerator
        unwrapped = acc.unwrap_model(self.model)
        if is_peft(unwrapped):
            if acc.is_main_process:
                unwrapped.save_pretrained(str(folder / "adapter"))
            if not merge_lora:
                return
            merged = copy.deepcopy(unwrapped).merge_and_unload()
            state = merged.state_dict()
        else:
            state = acc.get_state_dict(self.model)
        if acc.is_main_process:
            copied = ckpt.save_hf_state_dict(self.base_model, state, folder)
            if self.tokenizer is not None and not _base_tokenizer_kept(self.tokenizer, self.base_model, copied):
                from fewstep.models.tokenizer import save_tokenizer

                save_tokenizer(self.tokenizer, folder)

    def write_logs(self) -> None:
        """``train_log.jsonl`` and ``loss.png`` in the run folder, from the history so far."""
        from fewstep.train.plots import plot_loss

        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "train_log.jsonl", "w") as fh:
            for rec in self.history:
                fh.write(json.dumps(rec) + "\n")
        if self.history:
            plot_loss(self.history, self.out / "loss.png", title=f"{self.objective.name} loss")

    # -- training -----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimiser step on the global batch of ``self.step``."""
        cfg, acc = self.cfg, self.accelerator
        idx = global_batch_indices(self.step, len(self.examples), cfg.batch_size, cfg.seed)
        batch = self.objective.collate([self.examples[i] for i in idx], seeded(cfg.seed, 1, self.step))
        factor = lr_factor(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        logs: dict[str, float] = {}
        rank, world = acc.process_index, acc.num_processes
        self.model.train()
        for a in range(cfg.grad_accum):
            chunk = a * world + rank
            micro = {
                k: v.to(acc.device) for k, v in _split_rows(batch, chunk * self.micro, (chunk + 1) * self.micro).items()
            }
            sync = a == cfg.grad_accum - 1
            if self.deepspeed:  # DeepSpeed steps inside backward at an accumulation boundary
                acc.gradient_state._set_sync_gradients(sync)
            ctx = acc.no_sync(self.model) if not sync else nullcontext()
            with ctx, acc.autocast():
                loss, parts = self.objective.loss(
                    self.model, micro, step=self.step, max_steps=cfg.max_steps, teacher=self.teacher
                )
                acc.backward(loss / cfg.grad_accum)
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
        if cfg.grad_clip > 0:
            norm = acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)  # DeepSpeed: its own clip's norm
            if norm is not None:
                logs["grad_norm"] = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        logs = {k: _mean_across(acc, v) for k, v in logs.items()}
        logs["lr"] = cfg.lr * factor
        self.step += 1
        return logs

    def train(self) -> dict[str, Any]:
        """Run (or continue) training to ``max_steps``; returns a summary (steps, final loss, seconds)."""
        cfg, acc = self.cfg, self.accelerator
        resumed_from = self.step
        bar = None
        if cfg.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"train {self.objective.name}", unit="step")
        window = self.window
        t_start = time.time() - self.elapsed
        while self.step < cfg.max_steps:
            logs = self.train_step()
            window.append(logs)
            self.elapsed = time.time() - t_start
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                rec = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                rec.update(step=self.step, seconds=round(self.elapsed, 2))
                self.history.append(rec)
                window.clear()
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
            if bar is not None:
                bar.update(1)
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                folder = self.save()
                if self.on_checkpoint is not None and acc.is_main_process:
                    extra = self.on_checkpoint(self.step, folder / "hf")
                    if extra:
                        self.history[-1].update(extra)
                        ckpt.write_state(folder, self.state_dict())
                        self.write_logs()
        if bar is not None:
            bar.close()
        last = self.history[-1] if self.history else {}
        return {
            "steps": self.step,
            "resumed_from": resumed_from,
            "final_loss": last.get("loss"),
            "seconds": round(self.elapsed, 1),
        }


def _base_tokenizer_kept(tokenizer: Any, model: nn.Module, copied: list[str]) -> bool:
    """True when ``tokenizer`` was loaded from the base folder and its files were copied from there
    unchanged (the export then keeps them as they are instead of re-saving them)."""
    from fewstep.models.saving import base_folder_of

    base = base_folder_of(model)
    source = getattr(tokenizer, "name_or_path", None)
    same = base is not None and bool(source) and Path(source).resolve() == base.resolve()
    return same and any(f in copied for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _mean_across(acc: Any, value: float) -> float:
    if acc.num_processes == 1:
        return value
    t = torch.tensor([value], device=acc.device)
    return float(acc.reduce(t, reduction="mean"))
