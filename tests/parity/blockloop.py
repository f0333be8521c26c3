"""A minimal batch-1 block loop with the official samplers' semantics, for testing the policies alone.

It is *not* fewstep's generation loop (phase 2 wires block diffusion into the engine); it exists so the
LLaDA2 / SDAR policies can be checked against the recorded cases now. LLaDA2 runs through
``denoise`` without a cache (as the official ``generate``); SDAR runs each block against the cache of
the stored blocks (the official ``store_kv`` calls). Every forward is counted, as in the oracles.
"""

from __future__ import annotations

import torch

from fewstep.decoding.policies.base import RowRNG, StepState


def _state(x, lo, hi, step, block, nb, B, G, mask_id, eos, memory=None):
    tokens = x[:, lo:hi]
    return StepState(
        tokens=tokens,
        mask=tokens == mask_id,
        step=torch.tensor([step]),
        rows=torch.tensor([0]),
        block=block,
        num_blocks=nb,
        block_length=B,
        gen_length=G,
        gen_masked=(x == mask_id).sum(-1),
        mask_id=mask_id,
        eos_ids=eos,
        rng=RowRNG(None, x.device),
        memory=memory or {},
    )


def _commit(x, lo, sel, call, decode_step, P):
    idx = sel.commit[0].nonzero().flatten().tolist()
    for j in idx:
        x[0, lo + j] = sel.tokens[0, j]
        if lo + j >= P and decode_step.get(lo + j) is None:
            decode_step[lo + j] = call


def llada2_generate(model, prompt, policy, *, gen_length, block_length, eos_id, mask_id, eos_early_stop):
    """LLaDA2 ``generate`` semantics: blocks from ``P // B``, re-run ``x[:, :(b+1)B]`` every step, EOS stops."""
    P, B = prompt.shape[1], block_length
    nb = -(-(P + gen_length) // B)
    x = torch.full((1, nb * B), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    calls, decode_step = 0, {}
    model.block_length = B
    for b in range(P // B, nb):
        lo, hi = b * B, (b + 1) * B
        st = _state(x, lo, hi, 0, b, nb, B, gen_length, mask_id, (eos_id,))
        memory = policy.start_block(st)
        for step in range(policy.steps_per_block(gen_length)):
            st = _state(x, lo, hi, step, b, nb, B, gen_length, mask_id, (eos_id,), memory)
            if not st.mask.any():
                break
            logits = model.denoise(x[:, :hi]).logits[:, lo:hi]
            calls += 1
            sel = policy.select(logits, st)
            _commit(x, lo, sel, calls, decode_step, P)
            if eos_early_stop and bool((sel.tokens[sel.commit] == eos_id).any()):
                window = x[0, :hi]
                first = int((window == eos_id).nonzero()[0])
                if not bool((window[P:first] == mask_id).any()):
                    return window[: first + 1].tolist(), calls, decode_step
        gen = x[0, P:hi]
        if bool((gen == eos_id).any()):
            break
    gen = x[0, P : P + gen_length].tolist()
    if eos_id in gen:
        gen = gen[: gen.index(eos_id) + 1]
    return prompt[0].tolist() + gen, calls, decode_step


def sdar_generate(model, prompt, policy, *, gen_length, block_length, mask_id, stop_ids):
    """SDAR ``block_diffusion_generate`` semantics: prefill the complete prompt blocks, per block
    ``denoising_steps + 1`` iterations (the last finds no mask and stores the block), stop on a stop id."""
    P, B = prompt.shape[1], block_length
    nb = -(-(P + gen_length) // B)
    x = torch.full((1, nb * B), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    model.block_length = B
    start = (P // B) * B
    calls, decode_step = (1 if start else 0), {}  # the prefill runs only if a prompt block is complete
    cache = model(x[:, :start], use_cache=True).past_key_values if start else None
    for b in range(P // B, nb):
        lo, hi = b * B, (b + 1) * B
        st = _state(x, lo, hi, 0, b, nb, B, gen_length, mask_id, tuple(stop_ids or ()))
        memory = policy.start_block(st)
        for step in range(policy.denoising_steps + 1):
            st = _state(x, lo, hi, step, b, nb, B, gen_length, mask_id, tuple(stop_ids or ()), memory)
            # the block against the cache, as the official store_kv calls (a block that was left with
            # masks is never stored, so the cache can miss it: explicit positions, like the official)
            pos = torch.arange(lo, hi)[None]
            store = not st.mask.any()
            out = model(x[:, lo:hi], position_ids=pos, past_key_values=cache, use_cache=store)
            calls += 1
            if store:
                cache = out.past_key_values
                break
            logits = out.logits
            _commit(x, lo, policy.select(logits, st), calls, decode_step, P)
        if stop_ids and any(t in stop_ids for t in x[0, P:].tolist()):
            break
    steps = [decode_step.get(i) for i in range(P, P + gen_length)]
    return x[0].tolist(), calls, steps
