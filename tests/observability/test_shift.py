"""Out-of-domain thresholds calibrated from the domains' own spread, on real digits32 images and the real gate."""

from __future__ import annotations

import numpy as np
import pytest

from carddeck.data.datasets import load_dataset
from carddeck.data.domains import augment
from carddeck.errors import InvalidInput
from carddeck.gating import batch_signature, domain_signature, pairwise_distances
from carddeck.server.shift import FACTOR, ShiftThresholds, calibrate_shift, main, thresholds_for_deck
from tests.observability.deck_traffic import DOMAINS, build_deck

BATCH = 32


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits32", "train").images[:300], load_dataset("digits32", "test").images


@pytest.fixture(scope="module")
def calibrated(digits):
    train, _ = digits
    return calibrate_shift(train, DOMAINS, batches=128)


@pytest.fixture(scope="module")
def references(digits):
    return np.stack([domain_signature(d, digits[0]) for d in DOMAINS])


def nearest(images: np.ndarray, references: np.ndarray) -> float:
    return float(pairwise_distances(batch_signature(images)[None], references).min())


def test_in_domain_batches_stay_under_the_threshold(digits, calibrated, references):
    _, test = digits
    rng = np.random.default_rng(5)
    far = 0
    trials = 0
    for domain in DOMAINS:
        for start in range(0, len(test) - BATCH, BATCH):
            x = np.asarray(augment(test[start : start + BATCH], domain, rng) * 255, np.float32).round()
            far += nearest(x.astype(np.uint8), references) > calibrated.threshold_for(BATCH)
            trials += 1
    assert trials >= 30 and far == 0, f"{far}/{trials} held-out in-domain batches flagged"


@pytest.mark.parametrize(
    "shift",
    [
        lambda x, rng: (x.astype(np.float32) - 128) * 0.15 + 128,  # contrast loss
        lambda x, rng: x + rng.normal(0, 90, x.shape),  # noise far beyond the gaussian domain
    ],
    ids=["contrast", "strong-noise"],
)
def test_shifted_batches_cross_it(digits, calibrated, references, shift):
    # (Blur and pixelation stay inside AugMix's own spread on digits32: the threshold is not for them.)
    _, test = digits
    rng = np.random.default_rng(6)
    for start in range(0, 4 * BATCH, BATCH):
        x = np.clip(shift(test[start : start + BATCH], rng), 0, 255).astype(np.uint8)
        assert nearest(x, references) > calibrated.threshold_for(BATCH)


def test_thresholds_follow_the_spread(calibrated):
    sizes = sorted(calibrated.thresholds)
    values = [calibrated.thresholds[b] for b in sizes]
    assert values == sorted(values, reverse=True), "smaller batches spread more: thresholds must not increase"
    for b in sizes:
        assert calibrated.thresholds[b] >= FACTOR * max(s[b] for s in calibrated.spread.values()) - 1e-9
    assert calibrated.thresholds[1] > 2 * calibrated.thresholds[128]  # averaging shrinks the spread
    assert calibrated.threshold_for(1) == calibrated.thresholds[1]
    assert calibrated.threshold_for(50) == calibrated.thresholds[32]
    assert calibrated.threshold_for(10_000) == calibrated.thresholds[128]


def test_json_round_trip_and_bad_files(calibrated, tmp_path):
    path = tmp_path / "shift.json"
    path.write_text(calibrated.to_json())
    assert ShiftThresholds.load(path) == calibrated
    with pytest.raises(InvalidInput, match="format must be"):
        ShiftThresholds.from_json('{"format": "other"}')
    with pytest.raises(InvalidInput, match="not a shift-threshold file"):
        ShiftThresholds.from_json("[1, 2]")
    with pytest.raises(InvalidInput, match="cannot read"):
        ShiftThresholds.load(tmp_path / "missing.json")
    with pytest.raises(InvalidInput, match="thresholds positive"):
        ShiftThresholds({4: -1.0})


def test_bad_calibration_input_is_rejected(digits):
    train, _ = digits
    with pytest.raises(InvalidInput, match="uint8"):
        calibrate_shift(train.astype(np.float32), DOMAINS)
    with pytest.raises(InvalidInput, match="at least one domain"):
        calibrate_shift(train, ())
    with pytest.raises(InvalidInput, match="no batch size"):
        calibrate_shift(train[:4], DOMAINS, batch_sizes=(8, 16))
    with pytest.raises(InvalidInput, match="unknown"):
        calibrate_shift(train[:16], ("no-such-domain",), batch_sizes=(4,))


def test_deck_calibration_uses_the_gate_references(tmp_path):
    rig = build_deck(tmp_path / "deck", calibration_images=128)
    shift = thresholds_for_deck(rig.deck)
    assert shift is not None and set(shift.spread) == set(DOMAINS) and shift.metric == rig.deck.gate.params.metric
    routing = rig.deck.route(rig.shifted[:BATCH])
    assert routing.distances[0].min() > shift.threshold_for(BATCH)
    routing = rig.deck.route(rig.clean[:BATCH])
    assert routing.distances[0].min() < shift.threshold_for(BATCH)


def test_command_writes_loadable_thresholds(tmp_path, capsys):
    out = tmp_path / "shift.json"
    assert main(["--data", "digits32", "--limit", "64", "--domains", "clean", "--out", str(out)]) == 0
    shift = ShiftThresholds.load(out)
    assert set(shift.spread) == {"clean"} and max(shift.thresholds) == 64
    assert '"format": "carddeck-shift/1"' in capsys.readouterr().out
