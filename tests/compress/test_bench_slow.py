"""Real CARDs on digits32 (slow: ~15-25 min on 2 shared cores): the paper's shape must hold."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_compress.py"


@pytest.mark.slow
def test_real_cards_keep_accuracy_and_filter_pruning_halves_the_macs(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_compress", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(out=tmp_path)
    by = {r["card"]: r for r in rows}
    assert by["dense"]["clean"] > 0.95
    for name in ("lrr", "biprop"):
        assert by[name]["sparsity"] == pytest.approx(0.9, abs=1e-4)
        assert by[name]["nonzeros"] < 0.2 * by["dense"]["nonzeros"]
    for ok_text, ok in bench.verdicts(rows):
        assert ok, ok_text
    for r in rows:
        assert 0 < r["corrupted"] <= r["clean"] + 0.05
