"""Trainable copies of the block-diffusion fixtures (LLaDA2-MoE, SDAR) and data in their id space.

The fixtures hold weights and oracles only. A copy gets what a released checkpoint folder has besides
the weights: a tokenizer (one word ``t<i>`` per id, the fixture's special ids as LLaDA2's special-token
names), remote-code files named after the config's ``auto_map``, the generation config. The data are the
fixture model's own greedy answers, recorded by the official samplers in ``oracles.json`` (dParallel's
recipe: the teacher's outputs), cut at the first stop token; answers that still hold a mask are left out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FAMILIES = {"llada2": "llada2-tiny-a", "sdar": "sdar-tiny-a"}


def _special_names(oracles: dict) -> dict[int, str]:
    s = oracles["special_ids"]
    return {s["eos"]: "<|endoftext|>", s["mask"]: "<|mdm_mask|>"}


def build_id_tokenizer(vocab_size: int, specials: dict[int, str], folder: Path) -> None:
    """A word-level tokenizer whose word ``t<i>`` is id ``i`` (special ids named), saved in ``folder``."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fewstep.models.tokenizer import save_tokenizer

    vocab = {specials.get(i, f"t{i}"): i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    names = {"<|endoftext|>": "eos_token", "<|mdm_mask|>": "mask_token"}
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **{names[t]: t for t in specials.values()})
    save_tokenizer(tok, folder)


def block_checkpoint(family: str, folder: Path) -> Path:
    """A copy of the family's fixture with a tokenizer and the official non-weight files, in ``folder``."""
    src = FIXTURES / FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy2(src / name, folder / name)
    cfg = json.loads((src / "config.json").read_text())
    for target in cfg["auto_map"].values():
        (folder / f"{target.split('.')[0]}.py").write_text(f"# remote code stand-in: {target}\n")
    oracles = json.loads((src / "oracles.json").read_text())
    build_id_tokenizer(cfg["vocab_size"], _special_names(oracles), folder)
    return folder


def teacher_answers(family: str, limit: int = 16, min_tokens: int = 4) -> list[dict[str, str]]:
    """Distinct ``{"prompt", "response"}`` texts of the fixture's greedy official-sampler cases."""
    oracles = json.loads((FIXTURES / FAMILIES[family] / "oracles.json").read_text())
    s = oracles["special_ids"]
    stops = set(s.get("stop_ids") or [s["eos"]])
    seen, out = set(), []
    for case in oracles["sampler_cases"]:
        if case["variant"] != "greedy_patched" or case["prompt"] not in ("p1", "p2", "p3"):
            continue
        gen = case["generated_ids"]
        gen = gen[: next((i for i, t in enumerate(gen) if t in stops), len(gen))]
        key = (case["prompt"], tuple(gen))
        if len(gen) < min_tokens or s["mask"] in gen or key in seen:  # SDAR's quirks can leave masks
            continue
        seen.add(key)
        words = [f"t{i}" for i in oracles["prompts"][case["prompt"]]], [f"t{i}" for i in gen]
        out.append({"prompt": " ".join(words[0]), "response": " ".join(words[1])})
    return out[:limit]


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
