"""The shift detector: its calibrated false-alarm rate, its three states, the window, persistence,
and the detector shipped with the default deck on real digits32, leaves32 and corrupted images."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from carddeck.data.corruptions import corrupt
from carddeck.data.datasets import load_dataset
from carddeck.deck import Deck
from carddeck.errors import InvalidInput
from carddeck.gating.shift import FEATURE_NAMES, ShiftDetector
from carddeck.gating.shift_fit import Reference, deck_features, fit_detector
from carddeck.observability.metrics import Metrics
from carddeck.observability.shift import ShiftLoader, ShiftMonitor

ROOT = Path(__file__).resolve().parents[2]
F = len(FEATURE_NAMES)
BATCH = 16


# -- the statistic, on features with a known distribution ------------------------------------------
def gaussian(n: int, rng: np.random.Generator, shift: dict[tuple[int, int], float] | None = None) -> np.ndarray:
    """Standard normal features, ``shift`` adding a constant to feature ranges (start, stop)."""
    x = rng.standard_normal((n, F)).astype(np.float32)
    for (start, stop), by in (shift or {}).items():
        x[:, start:stop] += by
    return x


@pytest.fixture(scope="module")
def synthetic() -> ShiftDetector:
    rng = np.random.default_rng(0)
    refs = [
        Reference("clean", gaussian(400, rng), np.ones(400, bool)),
        Reference("near/1", gaussian(400, rng, {(0, 5): 3.0}), np.ones(400, bool)),  # accurate there
        Reference("bad/1", gaussian(400, rng, {(5, 10): -3.0}), rng.random(400) < 0.5),  # 50% there
    ]
    return fit_detector(refs, alpha=0.05, draws=4000)


def test_calibrated_false_alarm_rate_holds_on_fresh_null_batches(synthetic):
    rng = np.random.default_rng(1)
    flagged = np.mean([synthetic.test(gaussian(BATCH, rng)).state != "in_distribution" for _ in range(2000)])
    assert 0.025 <= flagged <= 0.08, flagged  # alpha 0.05: the ERT (20 batches) within a factor 2
    assert synthetic.ert == pytest.approx(20.0)


def test_three_states_and_expected_accuracy(synthetic):
    rng = np.random.default_rng(2)
    cases = {
        "clean": ({}, "in_distribution"),
        "near": ({(0, 5): 3.0}, "covered"),
        "bad": ({(5, 10): -3.0}, "uncovered"),  # near a condition where the deck is inaccurate
        "unknown": ({(12, 20): 4.0}, "uncovered"),  # near nothing the deck knows
    }
    for name, (shift, state) in cases.items():
        verdicts = [synthetic.test(gaussian(BATCH, rng, shift)) for _ in range(50)]
        share = np.mean([v.state == state for v in verdicts])
        assert share >= 0.9, (name, share, [v.state for v in verdicts[:5]])
    near = synthetic.test(gaussian(64, rng, {(0, 5): 3.0}))
    bad = synthetic.test(gaussian(64, rng, {(5, 10): -3.0}))
    assert near.nearest == "near/1" and near.distance <= 1 < near.statistic
    assert bad.nearest == "bad/1" and bad.expected_accuracy < near.expected_accuracy


def test_held_out_detector_drops_a_corruptions_conditions(synthetic):
    held = synthetic.without("near")
    assert held.conditions == ("clean", "bad/1") and held.thresholds.shape == (2, 3, len(held.sizes))
    rng = np.random.default_rng(3)
    assert held.test(gaussian(BATCH, rng, {(0, 5): 3.0})).state == "uncovered"  # no longer known


def test_too_small_a_batch_is_refused_with_the_minimum(synthetic):
    with pytest.raises(InvalidInput, match="at least 4 images"):
        synthetic.test(gaussian(2, np.random.default_rng(0)))


def test_save_load_round_trip_and_bad_files(synthetic, tmp_path):
    buf = io.BytesIO()
    synthetic.save(buf)
    buf.seek(0)
    loaded = ShiftDetector.load(buf)
    x = gaussian(BATCH, np.random.default_rng(4), {(0, 5): 3.0})
    assert loaded.test(x) == synthetic.test(x)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an npz")
    with pytest.raises(InvalidInput, match="not a shift detector file"):
        ShiftDetector.load(junk)
    with pytest.raises(InvalidInput, match="first reference condition must be 'clean'"):
        fit_detector([Reference("fog/1", gaussian(50, np.random.default_rng(0)), np.ones(50, bool))])


# -- the detector shipped with the default deck ----------------------------------------------------
@pytest.fixture(scope="module")
def shipped() -> tuple[Deck, ShiftDetector]:
    deck = Deck.open(ROOT / "models")
    monitor = ShiftMonitor()
    ShiftLoader(monitor)(deck)
    assert monitor.detector is not None, "models/manifest.json must name a shift detector (carddeck shift --fit)"
    return deck, monitor.detector


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    return load_dataset("digits32", "test").images[:192]


def states(deck: Deck, detector: ShiftDetector, images: np.ndarray) -> list[str]:
    features, _ = deck_features(deck, images, batch_size=BATCH)
    return [detector.test(features[i : i + BATCH]).state for i in range(0, len(features), BATCH)]


@pytest.mark.parametrize(
    ("traffic", "state"),
    [
        ("clean", "in_distribution"),
        ("gaussian_noise/5", "covered"),  # the deck's gaussian cards handle it (99% accurate)
        ("fog/5", "uncovered"),  # harmful: the deck is ~40% accurate there
        ("leaves32", "uncovered"),  # another world altogether
        ("black", "uncovered"),
    ],
)
def test_shipped_detector_on_real_traffic(shipped, test_images, traffic, state):
    deck, detector = shipped
    if traffic == "clean":
        images = test_images
    elif traffic == "leaves32":
        images = load_dataset("leaves32", "test").images[:192]
    elif traffic == "black":
        images = np.zeros_like(test_images)
    else:
        name, severity = traffic.split("/")
        images = corrupt(test_images, name, int(severity), seed=0)
    got = states(deck, detector, images)
    assert got.count(state) >= len(got) - 1, got  # 12 batches; clean allows one false alarm (0.5% each)


def test_expected_accuracy_falls_with_the_real_accuracy(shipped, test_images):
    deck, detector = shipped
    labels = load_dataset("digits32", "test").labels[:192]
    estimates = {}
    for name, images in (("clean", test_images), ("fog/5", corrupt(test_images, "fog", 5, seed=0))):
        features, predicted = deck_features(deck, images, batch_size=BATCH)
        estimates[name] = (detector.expected_accuracy(features), (predicted == labels).mean())
    (clean_est, clean_true), (fog_est, fog_true) = estimates["clean"], estimates["fog/5"]
    assert clean_est > 0.95 and fog_est < 0.75 and fog_true < 0.75, estimates
    assert abs(clean_est - clean_true) < 0.05, estimates


def test_monitor_windows_single_image_requests(shipped):
    deck, detector = shipped
    metrics = Metrics(CollectorRegistry())
    monitor = ShiftMonitor(metrics, window=32, stride=8)
    monitor.set_detector(detector)
    leaves = load_dataset("leaves32", "test").images[:48]
    verdicts = []
    for image in leaves:  # 48 one-image requests: windows at 32, 40, 48
        x = deck.prepare(image[None])
        prediction = deck.predict(image[None])
        verdicts += monitor.observe("m", x, prediction.probabilities, prediction.routing.features)
    assert [v.state for v in verdicts] == ["uncovered"] * 3 and all(v.size == 32 for v in verdicts)
    big = load_dataset("digits32", "test").images[:64]
    prediction = deck.predict(big)
    (batch,) = monitor.observe("m", deck.prepare(big), prediction.probabilities, prediction.routing.features)
    assert batch.state == "in_distribution" and batch.size == 16  # 16 evenly spaced images of the 64
    registry_values = {
        (state, unit): metrics.registry.get_sample_value(
            "carddeck_shift_batches_total", {"model": "m", "state": state, "unit": unit}
        )
        for state, unit in (("uncovered", "window"), ("in_distribution", "batch"))
    }
    assert registry_values == {("uncovered", "window"): 3.0, ("in_distribution", "batch"): 1.0}
    assert metrics.registry.get_sample_value("carddeck_expected_accuracy", {"model": "m"}) > 0.95


def test_monitor_never_fails_a_request(shipped, caplog):
    _, detector = shipped
    monitor = ShiftMonitor()
    monitor.set_detector(detector)
    with caplog.at_level(logging.ERROR, logger="carddeck.observability.shift"):
        monitor([("m", np.zeros((20, 3, 5, 5), np.float32), object(), np.zeros((20, 10), np.float32))])
    assert "shift monitor failed" in caplog.text


def test_a_micro_batch_of_requests_gives_the_verdicts_of_its_requests_one_by_one(shipped):
    """observe_many (one features call, one lock per micro-batch) tests exactly what observe did per request."""
    deck, detector = shipped
    images = (np.random.default_rng(3).random((110, 32, 32, 3)) * 255).astype(np.uint8)
    # small requests feed the window, those of 16 or more are tested as batches
    sizes = [1, 3, 2, 1, 20, 4, 1, 1, 5, 2, 16, 1, 3, 2, 1, 7, 6, 5, 4, 8, 2, 9]
    requests = []
    for a, b in zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes)):
        p = deck.predict(images[a:b])
        requests.append((deck.prepare(images[a:b]), p.probabilities, p.routing.features))
    one, many = ShiftMonitor(), ShiftMonitor()
    one.set_detector(detector)
    many.set_detector(detector)
    alone = [v for x, p, g in requests for v in one.observe("m", x, p, g)]
    merged = many.observe_many("m", requests[:9]) + many.observe_many("m", requests[9:])
    assert len(alone) >= 6  # windows (several per call) and batches were tested
    key = lambda v: (v.size, v.state, round(v.statistic, 4), str(round(v.expected_accuracy, 4)))  # noqa: E731
    assert sorted(map(key, merged)) == sorted(map(key, alone))


def test_monitor_settings_are_checked():
    with pytest.raises(InvalidInput, match="window and min batch must be >= 4"):
        ShiftMonitor(window=2)


def test_a_detector_fitted_for_other_cards_is_not_used(tmp_path, caplog):
    from tests.cards import tiny_card_bytes, tiny_meta
    from tests.observability.deck_traffic import build_deck

    rig = build_deck(tmp_path / "deck")
    monitor = ShiftMonitor()
    loader = ShiftLoader(monitor, refit=False)
    loader(rig.deck)
    assert monitor.detector is not None
    rig.store.add_card(tiny_card_bytes(tiny_meta("late", domain="clean"), seed=7))
    with caplog.at_level(logging.WARNING, logger="carddeck.observability.shift"):
        loader(Deck.open(rig.deck.root))
    assert monitor.detector is None and "state unknown until it is refitted" in caplog.text


# -- the command -----------------------------------------------------------------------------------
def test_shift_command_fits_scores_and_reports(tmp_path):
    from carddeck.deck import init_deck

    deck = tmp_path / "deck"
    init_deck(deck)  # a writable copy of the packaged (read-only) default deck
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "carddeck", "shift", "--deck", str(deck)]
    fit = [*cmd, "--fit", "--corruptions", "fog,gaussian_noise", "--limit", "96", "--draws", "10"]
    result = subprocess.run(
        [*fit, "--foreign", "black", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    md = (out / "shift.md").read_text()
    assert "| fog/5 | harmful |" in md and "| foreign:black | foreign |" in md
    assert (out / "shift.png").stat().st_size > 10_000 and (out / "shift.json").exists()
    assert "clean false alarms, batches" in md


def test_shift_command_without_a_detector_says_how_to_fit(tmp_path):
    from carddeck.deck import DeckStore
    from tests.cards import tiny_card_bytes, tiny_meta

    store = DeckStore.create(tmp_path / "deck")
    store.add_card(tiny_card_bytes(tiny_meta("a", domain="clean", signature=(0.0,) * 17), seed=0))
    result = subprocess.run(
        [sys.executable, "-m", "carddeck", "shift", "--deck", str(store.root), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "run `carddeck shift --deck" in result.stderr and "--fit" in result.stderr
    assert "Traceback" not in result.stderr


def test_shift_command_refuses_bad_sizes():
    result = subprocess.run(
        [sys.executable, "-m", "carddeck", "shift", "--deck", str(ROOT / "models"), "--draws", "0"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--draws must be at least 1, got 0" in result.stderr
