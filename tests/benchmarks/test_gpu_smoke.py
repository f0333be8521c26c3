"""``benchmarks/gpu.py --smoke``: every section of the GPU check runs end to end on tiny sizes on the CPU,
writes every field ``docs/gpu.md`` documents, and a second run resumes (finished sections are skipped), so
the check cannot rot before a GPU is lent. ``FEWSTEP_PEER_DIR`` (a Fast-dLLM checkout) runs the peer too."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.py"

#: Fields every run writes, per section (and per row of its lists); docs/gpu.md documents each one.
FIELDS = {
    "invariance": ["prompts", "prompt_lengths", "gen_length", "block_length", "max_padding", "first_forward", "rows",
                   "skipped", "policies_unknown", "rows_checked", "rows_differing_runs", "invariant",
                   "logits_invariant", "probes", "diagnosis", "headline"],
    "invariance.rows": ["model", "policy", "cache", "rows", "rows_differ_tokens", "rows_differ_nfe", "differing_rows",
                        "nfe_mean", "seconds_alone", "seconds_together"],
    "invariance.first_forward": ["model", "max_abs_logit_diff", "rows_with_logit_diff", "argmax_mismatches",
                                 "positions", "logits_dtype"],
    "invariance.diagnosis": ["model", "policy", "cache", "rows_differ_tokens", "rows_differ_nfe", "differing_rows",
                             "rerun_rows_differ", "fixes", "cause", "summary"],
    "invariance.diagnosis.fixes": ["fix", "rows_differ_tokens", "rows_differ_nfe", "differing_rows",
                                   "seconds_together", "cost_vs_default", "alone_cost_vs_default"],
    "speed": ["gen_length", "block_length", "batches", "threshold_max_nfe", "sdpa", "rows", "skipped", "compile",
              "headline"],
    "speed.rows": ["model", "batch", "cache", "policy", "nfe_mean", "rounds", "model_calls", "seconds",
                   "forward_seconds", "forward_ms_per_call", "outside_ms_per_round", "tokens", "tokens_per_s",
                   "complete"],
    "speed.compile": ["backend", "batch", "tokens", "rows", "error", "graph_breaks", "graph_break_reasons"],
    "speed.compile.rows": ["forward", "eager_ms", "compiled_ms", "speedup", "first_call_s"],
    "memory": ["gen_length", "max_nfe", "inference", "training", "skipped", "headline"],
    "memory.inference": ["model", "batch", "cache", "weights_bytes", "oom", "resident_bytes", "peak_allocated_bytes",
                         "decode_bytes", "peak_over_weights"],
    "memory.training": ["finetune", "layers", "batch", "length", "weights_dtype", "autocast", "lora_r",
                        "first_step_seconds", "step_seconds", "peak_allocated_bytes", "trainable_params", "loss"],
    "serving": ["command", "layers", "clients", "policy", "max_tokens", "cache", "rows", "headline"],
    "serving.rows": ["mode", "clients", "requests", "seconds", "requests_per_s", "output_tokens_per_s", "ttfd_p50_s",
                     "latency_p50_s", "latency_p99_s"],
    "peer": ["peer_dir", "peer_commit", "patches", "transformers", "compat_shims", "prompts", "gen_length",
             "block_length", "rows", "skipped", "headline"],
    "peer.rows": ["policy", "peer_function", "cache", "prompts", "rows_identical", "token_agreement", "nfe_equal",
                  "peer_seconds", "fewstep_seconds", "peer_ratio"],
    "section": ["status", "seconds", "finished_at"],
    "models": ["name", "layers", "of_layers", "hidden", "heads", "kv_heads", "vocab", "params", "weights_bytes",
               "dtype"],
    "host": ["python", "torch", "cuda", "device", "gpu", "cpu", "cpu_count", "threads", "git_commit"],
}  # fmt: skip


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    if spec.name not in sys.modules:  # its dataclasses look their module up
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def _has(obj: dict, key: str) -> None:
    missing = [f for f in FIELDS[key] if f not in obj]
    assert not missing, f"{key}: missing {missing}"


def _check_invariance(inv: dict, gpu) -> None:
    for k in ("invariance", "invariance.diagnosis"):
        _has(inv if k == "invariance" else inv["diagnosis"], k)
    for r in inv["rows"]:
        _has(r, "invariance.rows")
        assert r["rows"] == inv["prompts"] and r["nfe_mean"] >= 1
        assert r["rows_differ_tokens"] <= r["rows"] and len(r["differing_rows"]) >= r["rows_differ_nfe"]
    assert inv["rows_checked"] == len(inv["rows"]) > 0
    assert inv["invariant"] == (not any(r["differing_rows"] for r in inv["rows"]))
    assert {(r["model"], r["cache"]) for r in inv["rows"]} == {
        ("llada", "none"), ("llada", "prefix"), ("llada", "dual"), ("moe", "none"), ("moe", "prefix")}  # fmt: skip
    # every registered policy is checked on LLaDA (a policy that lands is picked up), unknown future names listed
    names = {gpu.parse_policy(r["policy"]).name for r in inv["rows"] if r["model"] == "llada"}
    assert names == set(gpu.POLICIES)
    assert {n for n in gpu.FUTURE_POLICIES if n not in gpu.POLICIES} <= set(inv["policies_unknown"])
    assert [f["model"] for f in inv["first_forward"]] == ["llada", "moe"]
    for f in inv["first_forward"]:
        _has(f, "invariance.first_forward")
        assert f["max_abs_logit_diff"] >= 0 and f["positions"] > 0
    probes = inv["probes"]["max_abs_diff"]
    assert {"linear_q_proj", "lm_head", "rms_norm", "sdpa_math", "sdpa_math_padded", "moe_layer"} <= set(probes)
    assert probes["sdpa_math"] is not None and probes["sdpa_efficient"] is None  # the CPU has no efficient kernel
    diag = inv["diagnosis"]  # --diagnose always
    assert [f["fix"] for f in diag["fixes"]] == ["math_sdpa", "full_precision_reduction", "no_padding",
                                                 "fixed_shapes", "all"]  # fmt: skip
    for f in diag["fixes"]:
        _has(f, "invariance.diagnosis.fixes")
        assert f["cost_vs_default"] > 0
    assert diag["rerun_rows_differ"] == 0  # the engine is deterministic run to run
    assert set(diag["cause"]) <= {k for k, v in probes.items() if v}


def _check_speed(sp: dict, sizes) -> None:
    _has(sp, "speed")
    want = {(m, c, p, b) for m, caches, pols in (("llada", ("none", "prefix", "dual"), ("llada:steps=4", "threshold:0.9")),
                                                   ("moe", ("none", "prefix"), ("llada2",)))
            for c in caches for p in pols for b in sizes.speed_batches}  # fmt: skip
    assert {(r["model"], r["cache"], r["policy"], r["batch"]) for r in sp["rows"]} == want
    for r in sp["rows"]:
        _has(r, "speed.rows")
        assert r["tokens_per_s"] > 0 and 0 < r["forward_seconds"] < r["seconds"] and r["outside_ms_per_round"] > 0
        if r["policy"] == "llada:steps=4":  # fixed steps: every token committed in exactly `steps` forwards
            assert r["complete"] and r["nfe_mean"] == 4 and r["tokens"] == r["batch"] * sizes.speed_gen
        else:
            assert r["nfe_mean"] <= sizes.threshold_max_nfe
    assert sp["sdpa"]["no_padding"]["mask"] is False and sp["sdpa"]["padding"]["mask"] is True
    for case in ("no_padding", "padding"):
        assert sp["sdpa"][case]["used"] in ("flash", "efficient", "cudnn", "math")
        assert sp["sdpa"][case]["backends"]["math"]["ok"]
    comp = sp["compile"]
    _has(comp, "speed.compile")
    assert comp["error"] is None and comp["backend"] == "eager"
    for r in comp["rows"]:
        _has(r, "speed.compile.rows")
        assert r["compiled_ms"] > 0 and r["eager_ms"] > 0
    assert [r["forward"] for r in comp["rows"]] == ["full", "dual"]


def _check_memory_serving(res: dict) -> None:
    mem, srv = res["sections"]["memory"], res["sections"]["serving"]
    _has(mem, "memory")
    assert len(mem["inference"]) == 5 * 2  # (3 LLaDA + 2 MoE cache modes) x 2 batch sizes
    for r in mem["inference"]:
        _has(r, "memory.inference")
        assert r["peak_allocated_bytes"] is r["decode_bytes"] is None and not r["oom"]  # CUDA statistics
    lora, full = mem["training"]
    for r in (lora, full):
        _has(r, "memory.training")
        assert math.isfinite(r["loss"]) and r["step_seconds"] > 0
    assert (lora["finetune"], full["finetune"]) == ("lora", "full")
    assert 0 < lora["trainable_params"] < full["trainable_params"] == res["models"]["llada"]["params"]
    _has(srv, "serving")
    assert [r["clients"] for r in srv["rows"]] == [1, 1, 4]  # direct, then the server at 1 and 4 clients
    for r in srv["rows"]:
        _has(r, "serving.rows")
        assert r["requests_per_s"] > 0


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--diagnose", "always", "--out", str(out)]
    peer = os.environ.get("FEWSTEP_PEER_DIR")
    cmd += ["--peer-dir", peer] if peer else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "== summary ==" in proc.stdout
    res = json.loads(out.read_text())
    gpu = _load()
    assert res["run"]["smoke"] is True and res["host"]["device"] == "cpu" and res["host"]["gpu"] is None
    _has(res["host"], "host")
    assert set(res["models"]) == {"llada", "moe"}
    for m in res["models"].values():
        _has(m, "models")
    assert list(res["sections"]) == list(gpu.SECTIONS)
    for name, sec in res["sections"].items():
        _has(sec, "section")
        assert sec["status"] == ("done" if name != "peer" or peer else "skipped"), (name, sec)
    _check_invariance(res["sections"]["invariance"], gpu)
    _check_speed(res["sections"]["speed"], gpu.SMOKE)
    _check_memory_serving(res)
    if peer:
        _has(res["sections"]["peer"], "peer")
        for r in res["sections"]["peer"]["rows"]:
            _has(r, "peer.rows")
    else:
        assert "--peer-dir" in res["sections"]["peer"]["reason"]

    # resume: finished sections are skipped; a skipped one (the peer without --peer-dir) is tried again
    done = {k: v["finished_at"] for k, v in res["sections"].items()}
    assert gpu.main(["--smoke", "--sections", "invariance,speed,peer", "--out", str(out)] + cmd[-2:] * bool(peer)) == 0
    again = json.loads(out.read_text())
    assert {k: v["finished_at"] for k, v in again["sections"].items() if k != "peer" or peer} == {
        k: t for k, t in done.items() if k != "peer" or peer}  # fmt: skip
    assert again["sections"]["invariance"] == res["sections"]["invariance"]
    printed = capsys.readouterr().out
    assert "== invariance: done at" in printed and "== speed: done at" in printed
    assert ("== peer: done at" if peer else "== peer ==") in printed

    # a JSON of other settings is never overwritten silently
    with pytest.raises(SystemExit, match="other settings"):
        gpu.main(["--smoke", "--layers", "2", "--sections", "peer", "--out", str(out)])
    assert json.loads(out.read_text()) == again


def test_docs_name_every_field():
    """docs/gpu.md documents every field the smoke test checks (and the sections, in order)."""
    doc = (ROOT / "docs" / "gpu.md").read_text()
    named = set(re.findall(r"`([a-z_0-9]+)`", doc))
    missing = sorted({f for fields in FIELDS.values() for f in fields} - named)
    assert not missing, f"docs/gpu.md does not document {missing}"
    gpu = _load()
    assert [s for s in gpu.SECTIONS if f"### `{s}`" in doc] == list(gpu.SECTIONS)
