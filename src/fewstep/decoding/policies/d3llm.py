"""d3LLM's multi-block decoding: several blocks open at once under one entropy gate, for LLaDA and Dream.

Reference code ``hao-ai-lab/d3LLM`` (commit ``e5bfcac``): ``d3llm/d3llm_LLaDA/d3llm_llada_generate_util.py``
(``generate_multi_block``, ``generate_multi_block_kv_cache``, ``get_transfer_index_entropy``) and
``d3llm/d3llm_DREAM/d3llm_dream_generate_util.py`` (``_sample_multi_block``, ``_sample_multi_block_kv_cache``);
``research/beyond-seeds.md`` §1.4. Training-free: any LLaDA or Dream checkpoint decodes with it (a
certainty-forced student, whose entropies are small, decodes the most tokens per forward).

The answer is cut into blocks of ``block_length`` after the prompt (the prompt is a complete block 0);
``progress(k) = 1 - masks(k) / block_length``. Before every forward, per row:

* a block that is *added* but not *fully activated* becomes fully activated once the block before it
  reaches ``full_threshold`` (δ_full); the first answer block is fully activated from the start;
* the next block is added (at most one per forward) once the last added block reaches ``add_threshold``
  (δ_add) or holds no mask; it starts fully activated if its predecessor already reaches δ_full;
* the forward covers the whole canvas; the candidates are the masked positions of the added blocks (up to
  the last one that is fully activated or still holds a mask);
* LLaDA (``multiblock``): commit the lowest-entropy candidate and every candidate with ``H <= threshold``;
  Dream (``multiblock-dream``): every candidate with ``H < threshold``, no lowest-entropy guarantee;
  ``H = -Σ p log(p + 1e-12)`` in nats, float64;
* forced progress: the first fully activated block that still holds a mask gets its lowest-entropy
  candidate when nothing was committed in it.

So a block opens as soon as its predecessor is 10 % decoded and the window slides over several blocks; the
engine runs it as a policy that ``spans_blocks`` (its window: from the first block with a mask to the answer's
end). Combine it with ``eos_fill`` (d3LLM's end-of-text stop) as the official runs do.

**Prefix cache** (``cache="prefix"``): a block (the prompt included) is cached once it has been complete for
``cache_delay_iter`` forwards, strictly left to right; the forward that caches it runs the canvas after the
cache and keeps its keys; while a complete block waits, and every ``refresh_interval`` forwards, a full
forward refreshes the cached prefix; otherwise the forward runs everything after the cache over it.

Recipes (the official GSM8K runs): δ_add 0.1, δ_full 0.95, blocks of 32 in a 256-token canvas, LLaDA
τ = 0.5 nats with ``cache_delay_iter=2, refresh_interval=3``; Dream τ = 0.4 with ``cache_delay_iter=1`` and no
periodic refresh.

What fewstep does differently, on purpose (each reference behaviour has a ``quirk_*`` switch where an oracle
needs it): the mask counts of the blocks are read from the canvas, so they never drift from it (the
reference decrements counters, also for positions its EOS fill already wrote); the cache is exactly the
prefix of blocks complete for ``cache_delay_iter`` forwards (the reference's refresh can keep keys past its
own cache length and append duplicates on top); a completed block's stability is counted from its own
completion; and the EOS fill is the engine's ``eos_fill``, which never counts a forward it does not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.decoding.policies.base import (
    Policy,
    Selection,
    StepState,
    check_range,
    check_temperature,
    entropy,
    first_best,
    gumbel_argmax,
    scatter,
)

ENTROPY_EPS = 1e-12  # the reference's log(p + 1e-12), both families


@dataclass
class MultiBlockPolicy(Policy):
    """d3LLM multi-block decoding, LLaDA variant: lowest-entropy candidate + every ``H <= threshold`` over
    every open block (see the module docstring; defaults = the official LLaDA runs).

    * ``threshold``: the entropy gate τ, in nats;
    * ``add_threshold`` (δ_add): progress of the last added block that opens the next one;
    * ``full_threshold`` (δ_full): progress of a block's predecessor that fully activates it;
    * ``commit_argmin`` / ``strict``: the LLaDA rule (argmin always, ``H <= τ``) or Dream's (``H < τ`` only);
    * ``temperature``: Gumbel-max sampling of the tokens (0: greedy); the forced position takes the argmax;
    * ``cache_delay_iter``, ``refresh_interval`` (None: never): the prefix cache, with ``cache="prefix"``;
    * ``quirk_stale_candidates``: the reference takes its candidates before its EOS fill, so in the forward
      after a fill the positions the fill wrote are still candidates (they can take the lowest-entropy
      guarantee or the forced commit away from a real mask; what they "commit" is never written here).
    """

    summary = "d3LLM multi-block decoding (LLaDA): several open blocks, lowest entropy + every H <= threshold"
    paper = "d3LLM, arXiv 2601.07568"
    name = "multiblock"
    positional = "threshold"
    spans_blocks = True

    threshold: float = 0.5
    add_threshold: float = 0.1
    full_threshold: float = 0.95
    temperature: float = 0.0
    commit_argmin: bool = True
    strict: bool = False
    cache_delay_iter: int = 2
    refresh_interval: int | None = 3
    quirk_stale_candidates: bool = False

    def __post_init__(self):
        check_range(f"{self.name}.threshold", self.threshold, 0.0, float("inf"))
        check_range(f"{self.name}.add_threshold", self.add_threshold, 0.0, 1.0)
        check_range(f"{self.name}.full_threshold", self.full_threshold, 0.0, 1.0)
        check_temperature(self)
        check_range(f"{self.name}.cache_delay_iter", self.cache_delay_iter, 0, float("inf"))
        if self.refresh_interval is not None:
            check_range(f"{self.name}.refresh_interval", self.refresh_interval, 1, float("inf"))

    # -- memory ---------------------------------------------------------------------------------------
    def start_block(self, state: StepState) -> dict[str, torch.Tensor]:
        """The row's block bookkeeping (once per row: the window is then the whole answer)."""
        R, nb, dev = state.mask.shape[0], state.num_blocks, state.mask.device
        active = torch.zeros((R, nb), dtype=torch.bool, device=dev)
        active[:, 0] = self.full_threshold <= 1.0  # the prompt (block 0) is complete: progress 1
        done_at = torch.full((R, nb + 1), -1, dtype=torch.long, device=dev)
        done_at[:, 0] = 0  # the prompt is complete before the first forward
        mem = {
            "added": torch.ones(R, dtype=torch.long, device=dev),  # answer blocks added, from the first
            "active": active,  # fully activated blocks
            "open": state.mask.clone(),  # [R, G] the answer's masks after the last step (before an EOS fill)
            "forwards": torch.zeros(R, dtype=torch.long, device=dev),
            "done_at": done_at,  # per block (0: the prompt): the forward at which it was first seen complete
            "cached": torch.zeros(R, dtype=torch.long, device=dev),  # blocks in the prefix cache
        }
        mem.update(self._plan(mem, state.block_length))
        return mem

    def _plan(self, mem: dict[str, torch.Tensor], L: int) -> dict[str, torch.Tensor]:
        """The prefix-cache plan of the next forward (``prefix_reuse``, ``prefix_keep``, in blocks) and the
        updated ``done_at`` / ``cached``: cache the blocks complete for ``cache_delay_iter`` forwards, left to
        right; a complete block still waiting (or the periodic refresh) makes the forward a full one."""
        open_, added = mem["open"], mem["added"].tolist()
        R, G = open_.shape
        nb = G // L
        counts = open_.view(R, nb, L).sum(-1).tolist()
        done_at, cached = mem["done_at"].clone(), mem["cached"].clone()
        n_next = (mem["forwards"] + 1).tolist()
        reuse, keep = [0] * R, [0] * R
        for i in range(R):
            n, d, c = n_next[i], done_at[i].tolist(), int(cached[i])
            k, ready, waiting = c, c, False
            while k <= nb and (k == 0 or (k - 1 < added[i] and counts[i][k - 1] == 0)):
                d[k] = n if d[k] < 0 else d[k]
                if n - d[k] >= self.cache_delay_iter and ready == k:
                    ready = k + 1
                elif n - d[k] < self.cache_delay_iter:
                    waiting = True
                k += 1
            done_at[i] = torch.tensor(d)
            refresh = self.refresh_interval is not None and n % self.refresh_interval == 0
            if ready > c:  # cache the newly stable blocks: run everything after the cache and keep their keys
                reuse[i], keep[i] = c, ready
            elif c > 0 and not waiting and not refresh:
                reuse[i], keep[i] = c, c
            else:  # a full forward (that refreshes the cached prefix when there is one)
                reuse[i], keep[i] = 0, c
            cached[i] = ready
        dev = open_.device
        return {
            "done_at": done_at,
            "cached": cached,
            "prefix_reuse": torch.tensor(reuse, dtype=torch.long, device=dev),
            "prefix_keep": torch.tensor(keep, dtype=torch.long, device=dev),
        }

    # -- the step -------------------------------------------------------------------------------------
    def _blocks(self, state: StepState, cnt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``added`` [R] and ``active`` [R, nb] after this forward's activation and add rules."""
        mem, nb, L = state.memory, state.num_blocks, state.block_length
        R, dev = cnt.shape[0], cnt.device
        idx = torch.arange(nb, device=dev)
        added, active = mem["added"].clone(), mem["active"].clone()
        beyond = idx[None] >= added[:, None]
        filled = ~((cnt > 0) & beyond).any(-1) & (added < nb)  # an EOS fill emptied every block not yet added
        active |= beyond & filled[:, None]
        added = torch.where(filled, torch.full_like(added, nb), added)
        prog = 1 - cnt.to(torch.float64) / L
        prev = torch.cat([torch.ones((R, 1), dtype=torch.float64, device=dev), prog[:, :-1]], 1)
        active |= (idx[None] < added[:, None]) & (prev >= self.full_threshold)
        rows, last = torch.arange(R, device=dev), (added - 1).clamp(min=0)
        lp, lc = prog[rows, last], cnt[rows, last]
        add = (added < nb) & ((lp >= self.add_threshold) | (lc == 0))
        nxt = added.clamp(max=nb - 1)
        active[rows[add], nxt[add]] |= lp[add] >= self.full_threshold
        return added + add.long(), active

    def _tokens(self, z: torch.Tensor, state: StepState, cand: torch.Tensor) -> torch.Tensor:
        """Greedy or Gumbel-max tokens for the candidate logits ``z`` [K, V] (noise per row's stream)."""
        if self.temperature == 0:
            return z.argmax(-1)
        noise = state.rng.uniform(state.rows, cand.sum(-1), z.shape[-1], torch.float64)
        return gumbel_argmax(z, self.temperature, noise)

    def select(self, logits: torch.Tensor, state: StepState) -> Selection:
        R, W = state.mask.shape
        nb, L, b0 = state.num_blocks, state.block_length, state.block
        off, dev = b0 * L, state.mask.device
        mask = torch.zeros((R, nb * L), dtype=torch.bool, device=dev)
        mask[:, off:] = state.mask
        cnt = mask.view(R, nb, L).sum(-1)
        added, active = self._blocks(state, cnt)
        idx = torch.arange(nb, device=dev)
        considered = (idx[None] < added[:, None]) & (active | (cnt > 0))
        right = torch.where(considered, idx[None], -1).max(-1).values
        blk = torch.arange(W, device=dev) // L + b0
        base = state.memory["open"][:, off:] if self.quirk_stale_candidates else state.mask
        cand = base & (blk[None] <= right[:, None])
        z = logits[cand]
        x0 = self._tokens(z, state, cand)
        h = scatter(entropy(z, torch.float64, ENTROPY_EPS), cand, float("inf"))
        commit = ((h < self.threshold) if self.strict else (h <= self.threshold)) & cand
        if self.commit_argmin:
            commit |= first_best(h, cand, descending=False)
        first = torch.where(active & (cnt > 0), idx[None], nb).min(-1).values  # first fully activated, open
        in_first = blk[None] == first[:, None]
        starved = (first < nb) & ~(commit & in_first).any(-1)
        force = first_best(h, cand & in_first, descending=False) & starved[:, None]
        commit |= force
        tokens = scatter(x0, cand, state.mask_id)
        if self.temperature > 0 and self.commit_argmin:  # the reference re-takes the argmax there
            tokens = torch.where(force, logits.argmax(-1), tokens)
        wrote = commit & state.mask & (tokens != state.mask_id)
        open_ = torch.zeros_like(mask)
        open_[:, off:] = state.mask & ~wrote
        mem = {"added": added, "active": active, "open": open_, "forwards": state.memory["forwards"] + 1}
        mem.update(self._plan({**state.memory, **mem}, L))
        return Selection(tokens, commit, mem)

    def block_done(self, state: StepState) -> torch.Tensor:
        """Done with the window's first block (the engine then moves to the next block holding a mask)."""
        return ~state.mask[:, : state.block_length].any(-1)


@dataclass
class DreamMultiBlockPolicy(MultiBlockPolicy):
    """d3LLM multi-block decoding, Dream variant: every candidate with ``H < threshold`` (strict, no
    lowest-entropy guarantee); defaults = the official Dream runs (τ 0.4, ``cache_delay_iter=1``, no
    periodic refresh). The logits are Dream's shifted ones (the model's ``logit_shift``)."""

    summary = "d3LLM multi-block decoding (Dream): several open blocks, every H < threshold"
    name = "multiblock-dream"

    threshold: float = 0.4
    commit_argmin: bool = False
    strict: bool = True
    cache_delay_iter: int = 1
    refresh_interval: int | None = None
