"""The benchmark files shipped in the package: checksums, licences, record counts and stable ids."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fewstep.eval import datasets

# sha256 of every shipped file (the same values as the provenance notes in data/README.md).
EXPECTED_SHA256 = {
    "gsm8k/LICENSE": "86bbb73e855821d7c401912fd4bf82e34313e6e3b6fd6f909f2b6cc9e209a53b",
    "gsm8k/test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "gsm8k/train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "humaneval/HumanEval.jsonl": "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2",
    "humaneval/LICENSE": "bcba3de214851cce46ed5af42d6698044616eeace887c3231bc7a20474ab639e",
    "math500/LICENSE": "22d61a2226e035da51c56149c3358c36d1f61716435866bc6e6fe0e54c7270db",
    "math500/LICENSE.MATH": "8f6401fb0b1fbfcac17aac8d61e4e1b0d2de9aa190d8aa655fedc5fd783b2ace",
    "math500/test.jsonl": "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    "mbpp/LICENSE.md": "e38b719af8544e91098f1ecd402e6e286d81424b2eb0b08e9c9d9c868e412c45",
    "mbpp/README.upstream.md": "02d63a4ffdad806c3c87b5ea2aa91e946f6eec0c2869643b09831650883f41be",
    "mbpp/mbpp.jsonl": "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f",
    "mbpp/sanitized-mbpp.json": "7fec016546acaee11dbe14f9f0bb670e59f41919f7b522a59fba34871da78551",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(EXPECTED_SHA256))
def test_shipped_file_checksum(name):
    assert _sha256(datasets.data_dir() / name) == EXPECTED_SHA256[name]


def test_sha256sums_file_matches_the_data():
    lines = (datasets.data_dir() / "SHA256SUMS").read_text().split("\n")
    listed = dict(reversed(line.split(None, 1)) for line in lines if line.strip())
    assert {k.strip(): v for k, v in listed.items()} == EXPECTED_SHA256


def test_every_benchmark_has_its_licence():
    for folder, licence in [
        ("gsm8k", "LICENSE"),
        ("humaneval", "LICENSE"),
        ("math500", "LICENSE"),
        ("mbpp", "LICENSE.md"),
    ]:
        assert (datasets.data_dir() / folder / licence).stat().st_size > 500


def test_nothing_reads_the_shared_folder_at_run_time():
    src = Path(datasets.__file__).resolve().parents[1]
    offenders = [
        str(p)
        for p in src.rglob("*.py")
        if "/work/shared" in p.read_text(encoding="utf-8") or "shared/data" in p.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_gsm8k_ids_are_line_numbers():
    test = datasets.load_gsm8k("test")
    assert len(test) == 1319 and [r["id"] for r in test] == list(range(1319))
    assert test[0]["question"].startswith("Janet")
    assert test[0]["target"] == "18"
    assert all("," not in r["target"] for r in test)
    assert len(datasets.load_gsm8k("train")) == 7473
    with pytest.raises(ValueError):
        datasets.load_gsm8k("dev")


def test_math500_ids():
    rows = datasets.load_math500()
    assert len(rows) == 500 and len({r["id"] for r in rows}) == 500
    assert rows[0]["id"] == "test/precalculus/807.json" == rows[0]["unique_id"]


def test_humaneval_ids():
    rows = datasets.load_humaneval()
    assert [r["id"] for r in rows] == [f"HumanEval/{i}" for i in range(164)]


def test_mbpp_splits_and_ids():
    assert len(datasets.load_mbpp("all")) == 974
    counts = {split: len(datasets.load_mbpp(split)) for split in datasets.MBPP_SPLITS}
    assert counts == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    test = datasets.load_mbpp("test")
    assert test[0]["id"] == 11 == test[0]["task_id"]
    sanitized = datasets.load_mbpp_sanitized()
    assert len(sanitized) == 427 and len({r["id"] for r in sanitized}) == 427
    counts = {split: len(datasets.load_mbpp_sanitized(split)) for split in datasets.MBPP_SPLITS}
    assert counts == {"prompt": 7, "test": 257, "validation": 43, "train": 120}
    with pytest.raises(ValueError):
        datasets.load_mbpp("dev")
