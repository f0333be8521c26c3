"""The ``fewstep`` model of lm-evaluation-harness: any fewstep policy and cache behind lm-eval's tasks.

Registered with ``lm_eval.api.registry.register_model("fewstep")`` when this module is imported.
lm-eval has no entry-point discovery for external models, so something must import it before lm-eval
looks the name up: ``fewstep lm-eval ...`` / ``python -m fewstep.eval.lm_eval ...`` (import, then
lm-eval's own CLI), or, from Python, ``lm_eval.simple_evaluate(model=FewstepLM(...), tasks=[...])``.

* ``generate_until``: the text layer (:class:`fewstep.decoding.text.TextGenerator`) on batches of
  ``batch_size`` requests (policy spec, gen/block length, KV cache, early stop at EOS): the answer cut
  at its first EOS / end-of-turn token, decoded, cut at the request's ``until`` strings. Per-request NFE, tokens per step and latency are collected
  (:meth:`FewstepLM.speed_summary`, ``stats_path``, lm-eval's results ``config``) and logged.
* ``loglikelihood``: LLaDA's Monte Carlo ELBO estimate (:mod:`fewstep.eval.lm_eval.likelihood`), an
  estimate of a lower bound, not an exact log-likelihood; ``is_greedy`` by LLaDA's greedy suffix
  check.
* ``loglikelihood_rolling`` (perplexity tasks) raises ``NotImplementedError``; so does ``loglikelihood`` on
  a block-diffusion model (LLaDA2, SDAR), whose ELBO differs from LLaDA's (``generate_until`` works).

Multi-GPU: under ``accelerate launch`` each process takes its rank's share of the documents (lm-eval
shards them by ``rank`` / ``world_size``, which come from accelerate) on its own GPU.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

try:
    import lm_eval.models  # noqa: F401  (fills lm-eval's lazy registry before ours is added)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the fewstep lm-eval adapter needs lm-evaluation-harness: pip install 'fewstep[lmeval]' (lm-eval>=0.4.8)"
    ) from exc

import torch

from fewstep.decoding.engine import default_block_length
from fewstep.eval.lm_eval.likelihood import greedy_suffix_matches, mc_log_likelihood, request_seed
from fewstep.models.block import attention_block

log = logging.getLogger("fewstep.lm_eval")

_MAX_GEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def _as_int(name: str, value: Any, lo: int = 1) -> int:
    """``value`` (an int or a string of digits, as lm-eval passes model_args) as an int >= ``lo``."""
    text = str(value).strip()
    if isinstance(value, bool) or not (isinstance(value, int) or text.lstrip("-").isdigit()) or int(text) < lo:
        raise ValueError(f"fewstep model_args: {name} must be an integer >= {lo}; got {value!r}")
    return int(text)


@register_model("fewstep")
class FewstepLM(TemplateLM):
    """A fewstep diffusion LM (LLaDA or Dream checkpoint folder) as an lm-eval model.

    ``model_args`` (``--model_args key=value,...``; in 0.4.13 a value with commas can be quoted,
    ``policy="cad:threshold=0.95,max_tokens=32"``, or written with ``;``: ``policy=cad:threshold=0.95;max_tokens=32``):

    * ``pretrained``: checkpoint folder or shipped model name, resolved by
      :func:`fewstep.assets.resolve_model` (or pass ``model=`` / ``tokenizer=`` objects from Python);
      ``tokenizer``: another tokenizer folder;
    * ``dtype`` (default bfloat16 on GPU, float32 on CPU), ``device`` (default cuda if available;
      the process's GPU under accelerate);
    * ``policy`` (default ``threshold:0.9``), ``gen_length`` (default: the request's ``max_gen_toks``),
      ``block_length`` (32; a block-diffusion model's own block size), ``cache`` (none / prefix / dual), ``batch_size`` (lm-eval's
      ``--batch_size``), ``early_stop`` (True: a row stops after the block holding its EOS), ``eos_fill``
      (False; True: d3LLM's end-of-text stop, everything after the first EOS at once, no forward spent on it),
      ``cfg_scale`` (0), ``seed`` (1234: per-request seeds for sampling policies and the Monte Carlo draws);
    * ``mc_num`` (128), ``mc_batch_size`` (16), ``check_greedy`` (True; alias ``is_check_greedy``) for
      loglikelihood;
    * ``add_bos_token`` (False: prompts are tokenised as given; chat templates carry their own BOS),
      ``max_length`` (default the model's ``max_sequence_length``; longer prompts are cut on the left),
      ``max_gen_toks`` (256: used when a task sets none), ``stats_path`` (a JSONL file that gets one line
      of speed statistics per generated request).
    """

    backend = "causal"

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        dtype: str | None = None,
        device: str | None = None,
        policy: str = "threshold:0.9",
        gen_length: int | None = None,
        block_length: int | None = None,
        cache: str | None = "none",
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        early_stop: bool = True,
        eos_fill: bool = False,
        cfg_scale: float = 0.0,
        seed: int = 1234,
        mc_num: int = 128,
        mc_batch_size: int = 16,
        check_greedy: bool = True,
        is_check_greedy: bool | None = None,
        add_bos_token: bool = False,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        stats_path: str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"fewstep model_args: unknown argument(s) {', '.join(sorted(unknown))}; valid: pretrained, "
                "tokenizer, dtype, device, policy, gen_length, block_length, cache, early_stop, eos_fill, cfg_scale, seed, "
                "mc_num, mc_batch_size, check_greedy, add_bos_token, max_length, max_gen_toks, stats_path "
                "(batch_size comes from lm-eval's --batch_size)"
            )
        self._decoding_args(policy, cache, batch_size, gen_length, block_length, max_gen_toks)
        self.mc_num = _as_int("mc_num", mc_num)
        self.mc_batch_size = min(_as_int("mc_batch_size", mc_batch_size), self.mc_num)
        if self.mc_num % self.mc_batch_size:
            raise ValueError(
                f"fewstep model_args: mc_num ({mc_num}) must be a multiple of mc_batch_size ({mc_batch_size})"
            )
        self.cfg_scale, self.seed, self.early_stop = float(cfg_scale), int(seed), bool(early_stop)
        self.eos_fill = bool(eos_fill)
        self.check_greedy = bool(check_greedy if is_check_greedy is None else is_check_greedy)
        self.add_bos_token = bool(add_bos_token)
        self.stats_path = stats_path
        self._rank, self._world_size, self.accelerator = 0, 1, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            from fewstep.distributed import close_process_group_at_exit

            acc = Accelerator()
            if acc.num_processes > 1:
                self.accelerator = acc
                self._rank, self._world_size = acc.process_index, acc.num_processes
                device = str(acc.device)
                close_process_group_at_exit()
        self._load(pretrained, model, tokenizer, dtype, device)
        cfg_len = getattr(self.model.config, "max_sequence_length", None)
        self._max_length = _as_int("max_length", max_length) if max_length is not None else int(cfg_len or 4096)
        from fewstep.decoding.text import TextGenerator

        self.text = TextGenerator(self.model, self.tokenizer, max_batch=self.batch_size)
        self.stop_ids = self.text.default_stop_ids
        self.mask_id = int(self.model.config.mask_token_id)
        self.generation_stats: list[dict[str, Any]] = []
        self.likelihood_stats = {"requests": 0, "forwards": 0, "seconds": 0.0}
        self._warned: set[str] = set()

    def _decoding_args(self, policy, cache, batch_size, gen_length, block_length, max_gen_toks) -> None:
        """Check the model_args of ``generate_until``'s decoding (before the model is loaded)."""
        from fewstep.decoding import CACHE_MODES, parse_policy

        self.policy_spec = str(policy).replace(";", ",")
        self.policy = parse_policy(self.policy_spec)  # a bad spec fails before the model is loaded
        self.cache = "none" if cache is None else str(cache).lower()
        if self.cache not in CACHE_MODES:
            raise ValueError(f"fewstep model_args: cache must be one of {', '.join(CACHE_MODES)}; got {cache!r}")
        if batch_size is None:
            batch_size = 1
        if str(batch_size).startswith("auto"):
            raise ValueError("fewstep: --batch_size auto is not supported; pass an integer (prompts decoded together)")
        self.batch_size = _as_int("batch_size", batch_size)
        self.gen_length = None if gen_length is None else _as_int("gen_length", gen_length)
        self.block_length = None if block_length is None else _as_int("block_length", block_length)
        self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks)

    # ------------------------------------------------------------------ loading and basic properties

    def _load(self, pretrained, model, tokenizer, dtype, device) -> None:
        from fewstep.models import load_model, load_tokenizer

        if model is None:
            if not pretrained:
                raise ValueError("fewstep model_args: pass pretrained=PATH (a LLaDA or Dream checkpoint folder)")
            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI passes device="cuda:0" unless told otherwise
                log.warning("fewstep: CUDA is not available; running on the CPU")
                device = "cpu"
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
            model = load_model(pretrained, dtype=dtype, device=device)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            source = tokenizer or pretrained or getattr(model, "checkpoint_path", None)
            if not source:
                raise ValueError("fewstep: pass tokenizer= (an object or folder) together with model=")
            tokenizer = load_tokenizer(source)
        self.model, self.tokenizer = model, tokenizer
        self._device = model.device
        self.pretrained = str(pretrained or getattr(model, "checkpoint_path", "") or type(model).__name__)

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.stop_ids[0])

    @property
    def prefix_token_id(self) -> int:
        """What an empty loglikelihood context becomes: BOS when the tokenizer has one, else EOS."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", None) or self.pretrained).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string`` as written (a chat-templated string keeps its one BOS); a BOS is
        prepended only with ``add_bos_token`` (or ``add_special_tokens=True``) and when not already there."""
        ids = [int(i) for i in self.tokenizer(string, add_special_tokens=False)["input_ids"]]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        want_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if want_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [int(bos), *ids]
        return ids

    def tok_decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template around lm-eval's messages (``--apply_chat_template``)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.pretrained} has no chat template; drop --apply_chat_template")
        kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if not add_generation_prompt:  # lm-eval prefills the assistant turn (gen_prefix)
            try:
                return self.tokenizer.apply_chat_template(chat_history, continue_final_message=True, **kwargs)
            except ValueError:  # templates that always append a header (LLaDA's) cannot continue a message
                pass
        return self.tokenizer.apply_chat_template(chat_history, **kwargs)

    # ------------------------------------------------------------------ distributed helpers (lm-eval API)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.accelerator is None else self.accelerator.gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.accelerator is None:
            return [obj]
        result = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    # ------------------------------------------------------------------ generate_until

    def _gen_settings(self, gen_kwargs: dict[str, Any] | None) -> tuple[int, int, list[str]]:
        """``(gen_length, block_length, until)`` for one request's generation kwargs."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        requested = next((int(kw[k]) for k in _MAX_GEN_KEYS if kw.get(k) is not None), self.max_gen_toks)
        if self.gen_length is not None and requested != self.gen_length:
            self._warn_once(
                "gen_length",
                f"fewstep: generating gen_length={self.gen_length} tokens (model_args) instead of the task's {requested}",
            )
        gen_length = self.gen_length or requested
        model_block = attention_block(self.model)
        block = default_block_length(model_block, gen_length, self.block_length)
        if model_block is None and gen_length % block:  # block-diffusion models take any length
            raise ValueError(
                f"fewstep: gen_length {gen_length} is not a multiple of block_length {block}; "
                "pass gen_length=... (a multiple of block_length) in --model_args"
            )
        if kw.get("do_sample") or float(kw.get("temperature") or 0) > 0:
            self._warn_once(
                "sampling",
                "fewstep: the request asks for sampling; fewstep samples only as its policy says "
                "(e.g. policy=llada:steps=256;temperature=0.5), the request's temperature/top_p are ignored",
            )
        return gen_length, block, until

    def _cut_prompt(self, ids: list[int], room: int) -> list[int]:
        if len(ids) > room:
            self._warn_once("truncate", f"fewstep: prompts longer than {room} tokens are cut on the left")
            ids = ids[-room:]
        return ids

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generate every request through the text layer; batches of ``batch_size`` prompts of the same
        generation length, longest first, results in request order."""
        from tqdm import tqdm

        prepared = []
        groups: dict[int, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args[0], req.args[1]
            gen_length, block, until = self._gen_settings(gen_kwargs)
            ids = self._cut_prompt(self.tok_encode(context), self.max_length - gen_length)
            if not ids:
                ids = [self.prefix_token_id]
            prepared.append((ids, gen_length, block, until))
            groups[gen_length].append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="fewstep generate_until")
        for members in groups.values():
            members.sort(key=lambda i: -len(prepared[i][0]))
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                self._generate_batch(requests, prepared, batch, results)
                bar.update(len(batch))
        bar.close()
        if requests:
            self._log_speed()
        return [r if r is not None else "" for r in results]

    def _generate_batch(self, requests, prepared, batch, results) -> None:
        """One batch through the text layer: stop strings (``until``) matched with special tokens kept,
        as the LLaDA/dParallel harnesses do, and cutting the text only (NFE is the engine's)."""
        from fewstep.decoding.text import GenerationSettings

        base = GenerationSettings(
            policy=self.policy,
            cache=self.cache,
            cfg_scale=self.cfg_scale,
            early_stop=self.early_stop,
            eos_fill=self.eos_fill,
            cancel_at_stop=False,
            stop_in_raw=True,
        )
        per = [
            base.replace(
                max_tokens=prepared[i][1],
                block_length=prepared[i][2],
                stop=tuple(prepared[i][3]),
                seed=request_seed(self.seed, prepared[i][0]) % (2**31),
            )
            for i in batch
        ]
        outs = self.text.generate([prepared[i][0] for i in batch], per)
        lines = []
        for i, o in zip(batch, outs):
            results[i] = o.text
            req = requests[i]
            stat = {
                "task": getattr(req, "task_name", None),
                "doc_id": getattr(req, "doc_id", None),
                **o.stats(),
                "gen_length": prepared[i][1],
            }
            self.generation_stats.append(stat)
            lines.append(stat)
            self.cache_hook.add_partial("generate_until", req.args, o.text)
        if self.stats_path:
            path = Path(self.stats_path)
            if self._world_size > 1:
                path = path.with_name(f"{path.stem}.rank{self._rank}{path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write("".join(json.dumps(s) + "\n" for s in lines))

    def speed_summary(self) -> dict[str, Any] | None:
        """Speed of the ``generate_until`` requests so far (this rank): mean NFE, tokens per forward (TPF:
        answer tokens before the first EOS / NFE) and positions per forward (committed positions / NFE), both
        pooled over the requests, latency per sample, tokens/s (answer tokens before the first stop over
        generation time)."""
        st = self.generation_stats
        if not st:
            return None
        seconds = sum(s["latency_s"] for s in st)
        tokens = sum(s["gen_tokens"] for s in st)
        nfe = sum(s["nfe"] for s in st)
        return {
            "requests": len(st),
            "mean_nfe": statistics.fmean(s["nfe"] for s in st),
            "tokens_per_forward": sum(round(s["tokens_per_forward"] * s["nfe"]) for s in st) / nfe if nfe else 0.0,
            "positions_per_forward": sum(s["positions_per_forward"] * s["nfe"] for s in st) / nfe if nfe else 0.0,
            "latency_per_sample_s": seconds / len(st),
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "mean_gen_tokens": tokens / len(st),
            "total_nfe": sum(s["nfe"] for s in st),
            "rank": self._rank,
        }

    def _log_speed(self) -> None:
        s = self.speed_summary()
        if s:
            log.info(
                "fewstep [rank %d] %d requests · mean NFE %.1f · %.2f tokens/forward (TPF) · %.2f positions/forward · "
                "%.3f s/sample · %s tokens/s",
                self._rank,
                s["requests"],
                s["mean_nfe"],
                s["tokens_per_forward"],
                s["positions_per_forward"],
                s["latency_per_sample_s"],
                "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f}",
            )

    def get_model_info(self) -> dict[str, Any]:
        """Settings and speed, added by lm-eval to the results' ``config``."""
        return {
            "fewstep": {
                "pretrained": self.pretrained,
                "policy": self.policy.describe(),
                "policy_spec": self.policy_spec,
                "cache": self.cache,
                "gen_length": self.gen_length,
                "block_length": self.block_length,
                "batch_size": self.batch_size,
                "early_stop": self.early_stop,
                "eos_fill": self.eos_fill,
                "cfg_scale": self.cfg_scale,
                "device": str(self._device),
                "dtype": str(self.model.dtype).removeprefix("torch."),
                "world_size": self._world_size,
                "mc_num": self.mc_num,
                "generate_until": self.speed_summary(),
                "loglikelihood": dict(self.likelihood_stats),
            }
        }

    # ------------------------------------------------------------------ loglikelihood

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> list:
        """``(log p estimate, is_greedy)`` per ``((context, continuation), context_ids, continuation_ids)``."""
        from tqdm import tqdm

        if attention_block(self.model) is not None and requests:
            raise NotImplementedError(
                "fewstep: loglikelihood on a block-diffusion model (LLaDA2, SDAR) is not supported: LLaDA's Monte "
                "Carlo ELBO masks the whole continuation under full attention, while a block-causal model is "
                "trained to see earlier blocks clean. Use generate_until tasks (e.g. gsm8k) with these models."
            )
        out = []
        for key, ctx, cont in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="fewstep loglikelihood"):
            ctx, cont = list(ctx), list(cont)
            if not cont:
                out.append((0.0, True))
                continue
            if len(cont) >= self.max_length:
                raise ValueError(f"fewstep: a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
            ctx = self._cut_prompt(ctx, self.max_length - len(cont)) or [self.prefix_token_id]
            generator = torch.Generator().manual_seed(request_seed(self.seed, ctx))
            self._sync()
            t0 = time.perf_counter()
            ll = mc_log_likelihood(
                self.model,
                ctx,
                cont,
                mc_num=self.mc_num,
                batch_size=self.mc_batch_size,
                cfg_scale=self.cfg_scale,
                mask_id=self.mask_id,
                generator=generator,
            )
            greedy = (
                greedy_suffix_matches(self.model, ctx, cont, cfg_scale=self.cfg_scale, mask_id=self.mask_id)
                if self.check_greedy
                else False
            )
            self._sync()
            self.likelihood_stats["requests"] += 1
            self.likelihood_stats["forwards"] += self.mc_num // self.mc_batch_size + (
                len(cont) if self.check_greedy else 0
            )
            self.likelihood_stats["seconds"] += time.perf_counter() - t0
            out.append((ll, greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (ll, greedy))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "fewstep: loglikelihood_rolling (perplexity tasks such as wikitext) is not supported: a masked "
            "diffusion LM has no left-to-right factorisation, and LLaDA's Monte Carlo estimate is a bound on "
            "a whole answer's likelihood, not per-token log-probabilities; use generate_until or "
            "multiple-choice (loglikelihood) tasks"
        )
