"""`benchmarks/cache_accuracy.py` runs in one command and writes what docs/decoding.md quotes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "cache_accuracy.py"


def test_cache_accuracy_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("cache_accuracy", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cache.json"
    assert bench.main(["--n", "4", "--batch-size", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    from fewstep.assets import shipped_models

    assert {r["model"] for r in rows} == {name for name, _ in shipped_models()}
    for model in {r["model"] for r in rows}:
        for policy in {r["policy"] for r in rows if r["model"] == model}:
            mine = {r["cache"]: r for r in rows if (r["model"], r["policy"]) == (model, policy)}
            assert set(mine) == {"none", "prefix", "dual"}
            assert mine["none"]["accuracy_change"] == 0.0
            assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] == 4 and r["mean_nfe"] >= 1 for r in mine.values())
    assert "dual" in capsys.readouterr().out
