"""`carddeck shift --unseen`: the shift verdict scored on families outside the corruption catalog, on the
packaged digits32 deck (real cards, its fitted detector), and the path by which each covered batch is covered."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from carddeck.commands.shift_unseen import PATHS
from carddeck.data.corruptions.unseen import UNSEEN
from carddeck.deck import Deck, default_deck_path
from carddeck.gating.shift import ShiftDetector

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("unseen")
    cmd = [sys.executable, "-m", "carddeck", "shift", "--deck", str(ROOT / "models"), "--unseen", "geometry",
           "--split", "val", "--limit", "96", "--draws", "20", "--foreign", "black", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "unseen.json").read_text()), (out / "unseen.md").read_text(), result.stdout


def test_the_detector_was_never_fitted_on_an_unseen_shift():
    """The packaged deck's detector: none of its conditions or scope references is an unseen shift."""
    deck = Deck.open(default_deck_path())
    detector = ShiftDetector.load(io.BytesIO(deck.store.read_file(dict(deck.manifest.gate)["shift"])))
    names = {c.rsplit("/", 1)[0] for c in (*detector.conditions, *detector.scope.names)}
    assert names and not names & set(UNSEEN)


def test_unseen_command_scores_each_condition_of_the_family_it_is_asked(report):
    """Every geometry condition and the foreign set get a row, on the split asked (val: 96 images); kinds follow
    the accuracy against clean; the covered share splits exactly into its paths (kills a path left uncounted or
    counted for uncovered batches); the family summary counts the harmful rows it lists."""
    result, md, stdout = report
    rows = {r["condition"]: r for r in result["conditions"]}
    geometry = {f"{n}/{s}" for n in UNSEEN if UNSEEN.get(n).family == "geometry"
                for s in range(1, len(UNSEEN.get(n).levels) + 1)}  # fmt: skip
    assert set(rows) == {"clean", "foreign:black", *geometry} and result["split"] == "val"
    clean = rows["clean"]["accuracy"]
    for name, r in rows.items():
        b = r["batches"]
        assert sum(r["covered_by"].values()) == pytest.approx(b["covered"]), name
        assert set(r["covered_by"]) == set(PATHS)
        if r["accuracy"] is not None and name != "clean":
            drop = clean - r["accuracy"]
            assert r["kind"] == ("harmful" if drop > 0.05 else "benign" if drop <= 0.02 else "between"), name
    assert any(r["batches"]["covered"] > 0 for r in rows.values())  # the split above is not vacuous
    assert rows["foreign:black"]["kind"] == "foreign" and rows["foreign:black"]["batches"]["uncovered"] == 1.0
    harmful = [r for r in rows.values() if r["kind"] == "harmful"]
    summary = result["targets"]["geometry"]
    assert summary["harmful"] == len(harmful) > 0  # digits turned a quarter or flipped are other digits
    assert summary["harmful_min_flagged"] == pytest.approx(min(1 - r["batches"]["in_distribution"] for r in harmful))
    assert result["targets"]["all"]["harmful"] == len(harmful)
    assert "| rotate90/2 | harmful |" in md and "| geometry |" in md and md in stdout + "\n"
