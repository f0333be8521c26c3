"""The lockstep generation loop fewstep had before the continuous-batching engine (issue 12), kept
only as the baseline of ``benchmarks/decode.py --sections batching``: a fixed batch decoded block by
block, a row that finishes block ``b`` waiting for the others, no request joining a running batch.
Not part of the package (the package has one generation loop: ``fewstep.decoding.engine``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fewstep.decoding.policies import Policy, StepState, parse_policy
from fewstep.decoding.policies.base import RowRNG

CACHE_MODES = ("none", "prefix", "dual")
# token strings that end a turn in the chat formats fewstep knows (looked up in the tokenizer's vocab)
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot|>")


@dataclass
class StepEvent:
    """What a callback receives after every step (one forward)."""

    block: int
    rows: torch.Tensor  # [R] batch rows in this forward
    positions: list[list[int]]  # per row: answer-relative positions committed at this step
    tokens: list[list[int]]  # per row: the committed tokens
    nfe: torch.Tensor  # [B] NFE so far, per row
    canvas: torch.Tensor  # [B, P + G] current canvas (do not modify)
    prompt_length: int


@dataclass
class GenerateOutput:
    """Result of :func:`fewstep.generate`.

    * ``sequences`` [B, P + G]: prompt (as given, left-padded) followed by the answer;
    * ``nfe`` [B]: forwards each row took part in (a CFG pair counts once);
    * ``tokens_per_step``: per row, the tokens committed at each of its forwards;
    * ``decode_step`` [B, G]: per answer position, the row's NFE count at the forward that committed
      it (1-based; 0 for positions filled by early stop or never committed);
    * ``trace``: with ``trace=True``, one dict per forward (block, rows, committed positions and tokens).
    """

    sequences: torch.Tensor
    nfe: torch.Tensor
    tokens_per_step: list[list[int]]
    decode_step: torch.Tensor
    prompt_length: int
    policy: str
    cache: str
    trace: list[dict[str, Any]] | None = None
    finished_early: torch.Tensor | None = None  # [B], with early_stop: rows that stopped at an EOS

    @property
    def answers(self) -> torch.Tensor:
        """The generated part, ``[B, G]``."""
        return self.sequences[:, self.prompt_length :]

    @property
    def tokens_per_forward(self) -> torch.Tensor:
        """Mean committed tokens per forward, per row (``gen_length / nfe`` unless stopped early)."""
        committed = torch.tensor([sum(t) for t in self.tokens_per_step], dtype=torch.float64)
        return committed / self.nfe.clamp_min(1).to(torch.float64)


def stop_ids(model, tokenizer=None) -> tuple[int, ...]:
    """End-of-sequence ids: the model config's ``eos_token_id`` (int or list), the tokenizer's EOS and
    every known end-of-turn token present in the tokenizer's vocabulary. Never hard-coded ids."""
    ids: list[int] = []
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    ids.extend(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if tokenizer is not None:
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.append(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        ids.extend(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return tuple(dict.fromkeys(int(i) for i in ids))


def _prepare_inputs(input_ids, attention_mask, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, P]`` ids and mask from a tensor or a list of token lists (left-padded here)."""
    if not isinstance(input_ids, torch.Tensor):
        rows = [list(map(int, r)) for r in input_ids]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("input_ids must hold at least one non-empty prompt")
        p = max(len(r) for r in rows)
        ids = torch.full((len(rows), p), pad_id, dtype=torch.long)
        am = torch.zeros((len(rows), p), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, p - len(r) :] = torch.tensor(r)
            am[i, p - len(r) :] = 1
        if attention_mask is not None:
            raise ValueError("attention_mask must be None when input_ids is a list of prompts (fewstep pads them)")
        return ids.to(device), (am.to(device) if not bool(am.all()) else None)
    ids = input_ids.to(device).long()
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt_length] with prompt_length >= 1; got {tuple(ids.shape)}")
    if attention_mask is None:
        return ids, None
    am = attention_mask.to(device).long()
    if am.dim() == 1:
        am = am[None]
    if am.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(am.shape)} does not match input_ids {tuple(ids.shape)}")
    if bool((am[:, 1:] < am[:, :-1]).any()) or bool((am[:, -1] == 0).any()):
        raise ValueError("attention_mask must describe left padding (zeros, then ones, last column 1)")
    return ids, (None if bool(am.all()) else am)


def _seeds(seed, batch: int) -> list[int] | None:
    if seed is None:
        return None
    if isinstance(seed, int):
        return [seed + i for i in range(batch)]
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"seed must be an int or one int per row ({batch}); got {len(seeds)} seeds")
    return seeds


@torch.no_grad()
def lockstep_generate(
    model,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    policy: Policy | str = "threshold",
    *,
    gen_length: int = 128,
    block_length: int | None = None,
    cache: str = "none",
    attention_mask: torch.Tensor | None = None,
    cfg_scale: float = 0.0,
    mask_id: int | None = None,
    eos_ids: Sequence[int] | None = None,
    tokenizer=None,
    early_stop: bool = False,
    seed: int | Sequence[int] | None = None,
    callback: Callable[[StepEvent], None] | None = None,
    trace: bool = False,
    quirk_cache_extra_nfe: bool = False,
    quirk_mask_prediction: bool = False,
    max_steps_per_block: int | None = None,
) -> GenerateOutput:
    """Generate ``gen_length`` tokens after each prompt with a diffusion LM and an unmasking policy.

    Args:
        model: a fewstep model (:func:`fewstep.load_model`), anything with ``denoise`` and ``config``.
        input_ids: ``[B, P]`` prompts, left-padded when ``attention_mask`` is given, or a list of token
            lists (padded here).
        policy: a :class:`~fewstep.decoding.policies.Policy` or a spec such as ``"threshold:0.9"``,
            ``"llada:steps=64"``, ``"cad:threshold=0.95,max_tokens=32"`` (see ``POLICIES``).
        gen_length: answer length; a multiple of ``block_length``.
        block_length: semi-autoregressive block length (None: 32, or ``gen_length`` if smaller).
        cache: ``"none"``, ``"prefix"`` or ``"dual"`` (Fast-dLLM KV caches).
        attention_mask: ``[B, P]`` padding mask (1 = token) for left-padded prompts.
        cfg_scale: classifier-free guidance: ``z_u + (cfg_scale + 1)(z_c - z_u)``, with the prompt
            masked in the unconditional copy; both copies run in one batched call (one NFE).
        mask_id: the mask token (default ``model.config.mask_token_id``).
        eos_ids: end-of-sequence ids for early stop and for CAD's EOS gating (default: the model's EOS
            plus the end-of-turn tokens of ``tokenizer`` when given).
        early_stop: a row whose decoded blocks contain an EOS id stops after that block (the rest of
            its answer is filled with EOS and it stops counting NFE). Off by default (reference parity).
        seed: int (row ``i`` uses ``seed + i``) or one seed per row: per-row random streams, so sampling
            does not depend on the batch. None uses torch's global RNG.
        callback: called with a :class:`StepEvent` after every forward.
        trace: record every step in ``GenerateOutput.trace``.
        quirk_cache_extra_nfe: Fast-dLLM's / dParallel's cached samplers test for block completion only
            after a cached forward, so a block finished by its first (full) forward costs one more,
            useless, forward. Off by default; parity tests turn it on.
        quirk_mask_prediction: the reference samplers let the mask token itself win the argmax;
            committing it changes nothing and the position stays masked (a loop that waits for the
            block to finish can then stall). By default fewstep never predicts the mask token (its
            logit is set to the dtype's minimum, which leaves every other probability unchanged up to
            rounding); parity tests turn the quirk on.
        max_steps_per_block: safety limit on forwards per block (default ``4 * block_length + 64``);
            exceeding it raises ``RuntimeError`` (a policy that never commits would loop forever).
    """
    cfg = model.config
    device = model.device
    policy = parse_policy(policy)
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}; got {cache!r}")
    vocab = int(cfg.vocab_size)
    mask_id = int(cfg.mask_token_id if mask_id is None else mask_id)
    if not 0 <= mask_id < vocab:
        raise ValueError(f"mask_id must be in [0, {vocab - 1}] (the vocabulary); got {mask_id}")
    if not isinstance(gen_length, int) or gen_length < 1:
        raise ValueError(f"gen_length must be an integer >= 1; got {gen_length!r}")
    if block_length is None:
        block_length = min(32, gen_length)
    block_length = policy.blocks(gen_length, block_length)
    if not isinstance(block_length, int) or not 1 <= block_length <= gen_length:
        raise ValueError(f"block_length must be in [1, gen_length={gen_length}]; got {block_length!r}")
    if gen_length % block_length:
        raise ValueError(
            f"gen_length ({gen_length}) must be a multiple of block_length ({block_length}); "
            f"valid block lengths divide {gen_length}"
        )
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0; got {cfg_scale}")
    policy.validate(gen_length, block_length)
    eos = tuple(int(i) for i in eos_ids) if eos_ids is not None else stop_ids(model, tokenizer)
    fill_id = eos[0] if eos else None
    if early_stop and fill_id is None:
        raise ValueError("early_stop needs eos_ids (the model config has no eos_token_id)")
    pad_id = cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else (fill_id or 0)
    ids, am = _prepare_inputs(input_ids, attention_mask, pad_id, device)
    B, P = ids.shape
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"input_ids must be token ids in [0, {vocab - 1}] (the vocabulary)")
    N = P + gen_length
    max_len = getattr(cfg, "max_sequence_length", None)
    if max_len is not None and max_len < N:
        raise ValueError(
            f"prompt length ({P}) + gen_length ({gen_length}) = {N} exceeds the model's context "
            f"(max_sequence_length {max_len}); valid gen_length: <= {max_len - P}"
        )
    run = _Run(
        model=model,
        policy=policy,
        ids=ids,
        am=am,
        gen_length=gen_length,
        block_length=block_length,
        cache=cache,
        cfg_scale=cfg_scale,
        mask_id=mask_id,
        eos=eos,
        fill_id=fill_id if early_stop else None,
        rng=RowRNG(_seeds(seed, B), device),
        trace=trace,
        callback=callback,
        quirk_cache_extra_nfe=quirk_cache_extra_nfe,
        suppress_mask=not quirk_mask_prediction,
        limit=max_steps_per_block or 4 * block_length + 64,
    )
    return run.run()


class _Run:
    """State of one :func:`generate` call: the canvas, per-row counters and the block loop."""

    def __init__(
        self,
        *,
        model,
        policy,
        ids,
        am,
        gen_length,
        block_length,
        cache,
        cfg_scale,
        mask_id,
        eos,
        fill_id,
        rng,
        trace,
        callback,
        quirk_cache_extra_nfe,
        suppress_mask,
        limit,
    ):
        self.model, self.policy, self.cache, self.cfg_scale = model, policy, cache, cfg_scale
        self.mask_id, self.eos, self.fill_id, self.rng = mask_id, eos, fill_id, rng
        self.callback, self.quirk_extra_nfe, self.limit = callback, quirk_cache_extra_nfe, limit
        self.suppress_mask = suppress_mask
        self.G, self.L = gen_length, block_length
        self.num_blocks = gen_length // block_length
        B, P = ids.shape
        self.B, self.P = B, P
        device = ids.device
        self.x = torch.cat([ids, torch.full((B, gen_length), mask_id, dtype=torch.long, device=device)], dim=1)
        self.am = None if am is None else torch.cat([am, torch.ones((B, gen_length), dtype=am.dtype, device=device)], 1)
        self.nfe = torch.zeros(B, dtype=torch.long, device=device)
        self.decode_step = torch.zeros(B, gen_length, dtype=torch.long, device=device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.tokens_per_step: list[list[int]] = [[] for _ in range(B)]
        self.trace: list[dict[str, Any]] | None = [] if trace else None
        # per-block state
        self.b = self.s = self.e = 0
        self.steps_taken = torch.zeros(B, dtype=torch.long, device=device)
        self.memory: dict[str, torch.Tensor] = {}
        self.kv = None

    def run(self) -> GenerateOutput:
        for b in range(self.num_blocks):
            if bool(self.finished.all()):
                break
            self.block(b)
        return GenerateOutput(
            sequences=self.x,
            nfe=self.nfe,
            tokens_per_step=self.tokens_per_step,
            decode_step=self.decode_step,
            prompt_length=self.P,
            policy=self.policy.describe(),
            cache=self.cache,
            trace=self.trace,
            finished_early=self.finished if self.fill_id is not None else None,
        )

    def state(self, rows: torch.Tensor) -> StepState:
        """The policy's view of ``rows`` on the current block."""
        block = self.x[rows, self.s : self.e]
        return StepState(
            tokens=block,
            mask=block == self.mask_id,
            step=self.steps_taken[rows],
            rows=rows,
            block=self.b,
            num_blocks=self.num_blocks,
            block_length=self.L,
            gen_length=self.G,
            gen_masked=(self.x[rows, self.P :] == self.mask_id).sum(-1),
            mask_id=self.mask_id,
            eos_ids=self.eos,
            rng=self.rng,
            memory={k: v[rows] for k, v in self.memory.items()},
        )

    def block(self, b: int) -> None:
        """Decode block ``b`` for every unfinished row; rows leave as soon as the policy says they are done."""
        self.b, self.s, self.e = b, self.P + b * self.L, self.P + (b + 1) * self.L
        active = ~self.finished
        self.steps_taken.zero_()
        self.memory, self.kv = {}, None
        rows = active.nonzero().flatten()
        for k, v in self.policy.start_block(self.state(rows)).items():
            self.memory[k] = torch.zeros((self.B, *v.shape[1:]), dtype=v.dtype, device=v.device)
            self.memory[k][rows] = v
        first = True
        while rows.numel():
            if int(self.steps_taken[rows].max()) >= self.limit:
                raise RuntimeError(
                    f"policy {self.policy.describe()} made no progress on block {b} within {self.limit} "
                    "forwards (raise max_steps_per_block if this is intended)"
                )
            done = self.step(rows, first)
            first = False
            if bool(done.any()):
                active[rows[done]] = False
                if self.fill_id is not None:
                    self.early_stop(rows[done])
            rows = active.nonzero().flatten()

    def step(self, rows: torch.Tensor, first: bool) -> torch.Tensor:
        """One forward for ``rows`` and the policy's commit; returns which rows are done with the block."""
        s, e, P = self.s, self.e, self.P
        logits = self.forward(rows, first)
        state = self.state(rows)
        sel = self.policy.select(logits, state)
        commit = sel.commit & state.mask
        self.x[rows, s:e] = torch.where(commit, sel.tokens, state.tokens)
        self.nfe[rows] += 1
        self.steps_taken[rows] += 1
        for k, v in (sel.memory or {}).items():
            self.memory[k][rows] = v
        ds = self.decode_step[rows, s - P : e - P]
        self.decode_step[rows, s - P : e - P] = torch.where(commit, self.nfe[rows, None], ds)
        for r, c in zip(rows.tolist(), commit.sum(-1).tolist()):
            self.tokens_per_step[r].append(c)
        if self.trace is not None or self.callback is not None:
            pos = [(torch.nonzero(c).flatten() + (s - P)).tolist() for c in commit]
            tok = [self.x[r, [P + i for i in p]].tolist() for r, p in zip(rows.tolist(), pos)]
            if self.trace is not None:
                self.trace.append({"block": self.b, "rows": rows.tolist(), "positions": pos, "tokens": tok})
            if self.callback is not None:
                self.callback(StepEvent(self.b, rows, pos, tok, self.nfe, self.x, P))
        done = self.policy.block_done(self.state(rows))
        if self.quirk_extra_nfe and self.cache != "none":
            done &= self.steps_taken[rows] >= 2
        return done

    def forward(self, rows: torch.Tensor, first: bool) -> torch.Tensor:
        """Block logits ``[R, L, V]`` for ``rows``; with CFG the conditional and unconditional copies
        run in one call. Keeps the KV cache (and the rows it holds) in ``self.kv``."""
        s, e, model = self.s, self.e, self.model
        xr = self.x[rows]
        amr = None if self.am is None else self.am[rows]
        cfg = self.cfg_scale > 0
        if cfg:
            un = xr.clone()
            un[:, : self.P] = self.mask_id
            xr = torch.cat([xr, un])
            amr = None if amr is None else torch.cat([amr, amr])
        if self.cache == "none":
            out = model.denoise(xr, amr, start=s, end=e, logits_start=s, logits_end=e)
        elif first:
            out = model.denoise(xr, amr, use_cache=True, logits_start=s, logits_end=e)
            self.kv = (out.past_key_values, rows)
        else:
            past, kv_rows = self.kv
            if kv_rows.shape != rows.shape or not bool((kv_rows == rows).all()):
                keep = torch.isin(kv_rows, rows).nonzero().flatten()  # finished rows leave the cache
                if cfg:
                    keep = torch.cat([keep, keep + kv_rows.numel()])
                past = past.select_rows(keep)
                self.kv = (past, rows)
            out = model.denoise(
                xr, amr, start=s, end=e, cache=past, cache_mode=self.cache, logits_start=s, logits_end=e
            )
        logits = out.logits
        if cfg:
            cond, uncond = logits.chunk(2)
            logits = uncond + (self.cfg_scale + 1) * (cond - uncond)
        if self.suppress_mask:
            logits[..., self.mask_id] = torch.finfo(logits.dtype).min
        return logits

    def early_stop(self, rows: torch.Tensor) -> None:
        """Rows whose answer so far holds an EOS id stop: everything after the first EOS becomes EOS."""
        P = self.P
        hit = torch.isin(self.x[rows, P : self.e], torch.tensor(self.eos, device=self.x.device))
        for r, h in zip(rows.tolist(), hit):
            if bool(h.any()):
                first = int(h.nonzero()[0])
                self.x[r, P + first + 1 :] = self.fill_id
                self.decode_step[r, first + 1 :] = 0
                self.finished[r] = True
