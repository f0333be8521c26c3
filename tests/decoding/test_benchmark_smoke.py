"""`benchmarks/decode.py --quick` runs end to end and writes a complete JSON (tiny sizes, seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_decode_benchmark_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "benchmarks" / "decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "decode.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["policies"]["rows"]
    specs = {r["policy"] for r in rows}
    assert len(specs) == 1 + len(bench.POLICIES) and {r["cache"] for r in rows} == {"none", "prefix", "dual"}
    assert {r["batch"] for r in rows} == {1, 4}
    for r in rows:
        assert r["nfe"] >= 1 and 0 <= r["outside_forward"] < 1 and r["tokens_per_s"] > 0
        if r["policy"] == bench.BASELINE and r["cache"] == "none":
            assert r["speedup"] == 1.0
        if r["policy"] == "llada:steps=8":  # half the steps: exactly half the baseline's NFE
            assert r["nfe"] == 8 and r["tokens_per_step"] == 2
    assert [r["cache"] for r in res["cache"]["rows"]] == ["none", "prefix", "dual"]
    assert all(r["nfe"] == 8 for r in res["cache"]["rows"])
    assert all(r["ms_per_step"] > 0 for r in res["overhead"]["rows"])
    b = res["batching"]
    assert [r["scheduler"] for r in b["rows"]] == ["lockstep", "continuous", "continuous, max_padding=inf"]
    assert b["same_answers_and_nfe"] == 1
    assert all(r["rows_per_s"] > 0 and r["mean_latency_s"] > 0 for r in b["rows"] + b["arrivals"])
    assert all(r["same_answers_and_nfe"] == 1 for r in b["arrivals"])
    assert all(r["bare_forward_ms_per_step"] > 0 for r in b["overhead"])
    assert "tokens_per_s" in capsys.readouterr().out
    assert bench.main(["--report", str(out)]) == 0
    report = capsys.readouterr().out
    assert "| `llada:steps=8` | 8.0 | 2.00 |" in report and "robust speedup" in report
