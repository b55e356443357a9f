"""`carddeck shift --unseen`: the shift verdict scored on families outside the corruption catalog, on the
packaged digits32 deck (real cards, its fitted detector), and the path by which each covered batch is covered."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from carddeck.data.corruptions.unseen import UNSEEN
from carddeck.deck import Deck, default_deck_path
from carddeck.gating.shift import COVERED_BY, ShiftDetector

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
        assert set(r["covered_by"]) == set(COVERED_BY)
        if r["accuracy"] is not None and name != "clean":
            drop = clean - r["accuracy"]
            assert r["kind"] == ("harmful" if drop > 0.05 else "benign" if drop <= 0.02 else "between"), name
    # the split above is not vacuous: small rotations lie near conditions the deck handles, small translations
    # nowhere near one yet in scope (kills a count that credits every covered batch to one path)
    assert any(r["covered_by"]["known"] > 0 for r in rows.values())
    assert any(r["covered_by"]["in_scope"] > 0 for r in rows.values())
    assert rows["foreign:black"]["kind"] == "foreign" and rows["foreign:black"]["batches"]["uncovered"] == 1.0
    harmful = [r for r in rows.values() if r["kind"] == "harmful"]
    summary = result["targets"]["geometry"]
    assert summary["harmful"] == len(harmful) > 0  # digits turned a quarter or flipped are other digits
    assert summary["harmful_min_flagged"] == pytest.approx(min(1 - r["batches"]["in_distribution"] for r in harmful))
    assert summary["harmful_max_covered"] == pytest.approx(max(r["batches"]["covered"] for r in harmful))
    assert summary["harmful_covered_over_10"] == [r["condition"] for r in harmful if r["batches"]["covered"] > 0.1]
    assert result["targets"]["all"]["harmful"] == len(harmful)
    assert "| rotate90/2 | harmful |" in md and "| geometry |" in md and md in stdout + "\n"


def test_a_photograph_is_a_foreign_set_of_random_crops(tmp_path):
    """An image file given to --foreign becomes random square crops at the deck's size: the same crops for the same
    generator, different ones across images, made of the photograph's own pixels (a red | blue picture: no
    green, red + blue = 255 after the box resize); matplotlib's bundled photograph reads too."""
    import matplotlib
    from PIL import Image

    from carddeck.commands.shift import _images

    picture = np.zeros((120, 160, 3), np.uint8)
    picture[:, :80, 0], picture[:, 80:, 2] = 255, 255
    Image.fromarray(picture).save(tmp_path / "halves.png")
    crops = _images(str(tmp_path / "halves.png"), 6, (32, 32), np.random.default_rng(0))
    assert crops.shape == (6, 32, 32, 3) and crops.dtype == np.uint8
    assert np.array_equal(crops, _images(str(tmp_path / "halves.png"), 6, (32, 32), np.random.default_rng(0)))
    assert len({c.tobytes() for c in crops}) > 1 and (crops[..., 1] == 0).all()
    assert np.abs(crops[..., 0].astype(int) + crops[..., 2] - 255).max() <= 1
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    assert _images(str(photo), 4, (32, 32), np.random.default_rng(0)).shape == (4, 32, 32, 3)


@pytest.mark.parametrize("families", ["weather", ""])
def test_an_unknown_unseen_family_is_refused_naming_the_valid_ones(families):
    cmd = [sys.executable, "-m", "carddeck", "shift", "--deck", str(ROOT / "models"), "--unseen", families]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "valid: colour, geometry, occlusion" in result.stderr
    assert "Traceback" not in result.stderr and "ONNX Runtime" not in result.stderr  # refused before any work
