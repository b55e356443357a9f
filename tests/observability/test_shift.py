"""The shift detector: its calibrated false-alarm rate, its three states, the window, persistence,
and the detector shipped with the default deck on real digits32, leaves32 and corrupted images."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from carddeck.commands.shift import FAMILIES
from carddeck.data.corruptions import corrupt
from carddeck.data.datasets import load_dataset
from carddeck.deck import Deck, DeckStore
from carddeck.deck.transactions import READ_ONLY
from carddeck.errors import InvalidInput
from carddeck.gating.shift import (
    CONFIDENCE,
    EXPECTED_WEIGHTS,
    FEATURE_NAMES,
    SCOPE_FOLDS,
    Embedding,
    Scope,
    ShiftDetector,
)
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
    x = gaussian(BATCH, np.random.default_rng(3), {(0, 5): 3.0})
    v = held.test(x)
    assert v.nearest == "bad/1" and v.distance > 1  # no longer known
    # now a new shift: covered only on the confidences' word (never above clean), uncovered once they fall
    assert v.state == "covered" and v.expected_accuracy <= held.clean_accuracy
    x[:, CONFIDENCE] = held.confidence[0] - 2 * held.tolerance  # DoC: clean accuracy - 2 x tolerance
    assert held.test(x).state == "uncovered"


def test_scope_pools_the_severities_of_a_corruption(synthetic):
    """One Gaussian per in-scope corruption, not per severity: a one-image request pays one Mahalanobis
    distance per corruption (kills fitting one reference per condition, the 0.15 ms batch-1 cost)."""
    rng = np.random.default_rng(5)
    refs = [
        Reference("clean", gaussian(200, rng), np.ones(200, bool)),
        *(Reference(f"near/{s}", gaussian(200, rng, {(0, 5): float(s)}), np.ones(200, bool)) for s in (1, 2, 3)),
        Reference("bad/1", gaussian(200, rng, {(5, 10): -3.0}), rng.random(200) < 0.5),
    ]
    scope = fit_detector(refs, draws=50).scope
    assert scope.names == ("clean", "near") and scope.means.shape == (2, F)
    assert synthetic.scope.names == ("clean", "near")  # bad/1 (50% accurate) stays out of scope


def test_scope_threshold_is_a_conformal_quantile_of_out_of_fold_clean_scores():
    """19 clean images at a 5% false-positive rate: the finite-sample rank ceil((n + 1)(1 - fpr)) is 19, the
    largest out-of-fold score, so none of them is out of scope (an interpolated 95% quantile would put one
    out); and fresh clean images are out of scope at about the stated rate."""
    rng = np.random.default_rng(6)
    clean = gaussian(19, rng)
    emb = Embedding.fit(gaussian(400, rng))
    scope = Scope.fit({"clean": clean}, emb, fpr=0.05, seed=0)
    held = []
    for part in np.array_split(np.random.default_rng(0).permutation(19), SCOPE_FOLDS):
        rest = np.setdiff1d(np.arange(19), part)
        held.append(Scope.fit({"clean": clean[rest]}, emb, fpr=0.05).raw(clean[part], emb))
    assert scope.threshold == pytest.approx(np.concatenate(held).max(), rel=1e-5)
    big = Scope.fit({"clean": gaussian(2000, rng)}, emb, fpr=0.05)
    fresh = (big.scores(gaussian(4000, rng), emb) > 1).mean()
    assert 0.035 <= fresh <= 0.065, fresh


def test_scope_folds_leave_out_the_corrupted_copies_of_their_clean_images():
    """Every reference condition is made of the same validation images: a clean image's own corrupted copy
    in a reference would make it look in scope, and the threshold too low for new images (leaves32: 6.5%
    of clean test images out of scope at a 5% rate). Its rows leave with its fold: the threshold is what
    the clean images alone give, not the 35 a leaky fit gives here."""
    rng = np.random.default_rng(9)
    clean = gaussian(120, rng)
    emb = Embedding.fit(gaussian(400, rng))
    copy = clean + 0.05 * rng.standard_normal(clean.shape).astype(np.float32)
    alone = Scope.fit({"clean": clean}, emb).threshold
    with_copy = Scope.fit({"clean": clean, "copy/1": [copy]}, emb).threshold
    assert with_copy == pytest.approx(alone, rel=0.05)


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


def test_a_benign_shift_of_a_held_out_family_is_not_called_uncovered(shipped, test_images):
    """Contrast/2 with the whole digital family held out of the conditions: the deck stays accurate (98%),
    its confidence drops 11 points. Estimated from the nearest known conditions and DoC, it stays covered;
    ATC alone (what an absolute kernel fell back to, every weight vanishing) flagged a quarter of its batches."""
    deck, detector = shipped
    held = detector.without(FAMILIES["digital"], scope=False)
    labels = load_dataset("digits32", "test").labels[:192]
    features, predicted = deck_features(deck, corrupt(test_images, "contrast", 2, seed=0), batch_size=BATCH)
    verdicts = [held.test(features[i : i + BATCH]) for i in range(0, len(features), BATCH)]
    assert sum(v.state == "uncovered" for v in verdicts) <= 1, [v.state for v in verdicts]
    assert abs(np.mean([v.expected_accuracy for v in verdicts]) - (predicted == labels).mean()) < 0.08


def test_the_estimate_far_from_every_condition_weighs_the_nearest_doc_and_atc(synthetic):
    """A batch unlike every condition: the nearest condition still speaks (relative kernel), with DoC and ATC."""
    x = gaussian(64, np.random.default_rng(7), {(12, 20): 6.0})
    ratio = synthetic.statistics(x)
    assert ratio.min() > 5  # far from everything: exp(-ratio^2 / 2) of every condition underflows
    conf = x[:, CONFIDENCE]
    atc = (conf > synthetic.confidence_threshold).mean()
    doc = synthetic.accuracy[0] - synthetic.confidence[0] + conf.mean()
    nearest = synthetic.accuracy[np.argmin(ratio)]
    want = EXPECTED_WEIGHTS[0] * nearest + EXPECTED_WEIGHTS[1] * doc + EXPECTED_WEIGHTS[2] * atc
    assert synthetic._expected(ratio, x) == pytest.approx(want, abs=1e-4)


def test_a_format_3_detector_still_loads_and_estimates_without_doc(synthetic):
    """Decks fitted before the mean confidences were stored load, and estimate with ATC in place of DoC."""
    buf = io.BytesIO()
    replace(synthetic, confidence=None).save(buf)
    buf.seek(0)
    with np.load(buf) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays.pop("header")))
    old = io.BytesIO()
    np.savez(old, header=np.array(json.dumps({**header, "format": "carddeck-shift/3"})), **arrays)
    old.seek(0)
    loaded = ShiftDetector.load(old)
    assert loaded.confidence is None
    x = gaussian(BATCH, np.random.default_rng(8), {(0, 5): 3.0})
    ratio = loaded.statistics(x)
    atc = (x[:, CONFIDENCE] > loaded.confidence_threshold).mean()
    votes = np.exp(-0.5 * (ratio**2 - (ratio**2).min()))
    want = EXPECTED_WEIGHTS[0] * votes @ loaded.accuracy / votes.sum() + (1 - EXPECTED_WEIGHTS[0]) * atc
    assert loaded.test(x).expected_accuracy == pytest.approx(want, abs=1e-4)
    bad = io.BytesIO()
    np.savez(bad, header=np.array(json.dumps({**header, "format": "carddeck-shift/2"})), **arrays)
    bad.seek(0)
    with pytest.raises(InvalidInput, match=r"shift format 'carddeck-shift/2', readable: .*; refit it"):
        ShiftDetector.load(bad)


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


def test_a_micro_batch_gives_each_request_the_scores_and_risks_of_its_own_images(shipped, test_images):
    """judge scores and rates every image of a micro-batch in one call; each request gets back its own rows,
    exactly what it gets judged alone."""
    deck, detector = shipped
    batch = []
    for a, b in ((0, 1), (1, 4), (4, 5), (5, 7), (7, 8)):
        images = test_images[a:b]
        p = deck.predict(images)
        batch.append(("m", deck.prepare(images), p.routing, p.probabilities))
    merged = ShiftMonitor()
    merged.set_detector(detector)
    risks = set()
    for request, got in zip(batch, merged.judge(batch)):
        alone = ShiftMonitor()
        alone.set_detector(detector)
        (want,) = alone.judge([request])
        assert len(got.risk) == len(request[1])
        np.testing.assert_array_equal(got.risk, want.risk)
        # BLAS may sum a row in another order in a taller matrix: a few ulps, never another image's value
        np.testing.assert_allclose(got.out_of_scope, want.out_of_scope, rtol=1e-5)
        risks.update(got.risk.tolist())
    assert len(risks) > 1  # the images really differ


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


def test_a_request_is_judged_only_by_a_detector_fitted_for_the_cards_it_ran_on(shipped, test_images):
    """A deck change swaps the snapshot and its detector one after the other (Ray Serve's ingress: the detector
    first): a request that ran on the other side of the swap is answered unknown, never judged by a detector fitted
    for other cards (kills a judge that ignores ``cards``)."""
    deck, detector = shipped
    monitor = ShiftMonitor()
    monitor.set_detector(detector)
    x = test_images[:16]
    p = deck.predict(x)
    request = [("m", deck.prepare(x), p.routing, p.probabilities)]
    keys = [c.key for c in deck.cards]
    assert sorted(detector.notes["cards"]) == sorted(keys)
    assert monitor.judge(request, cards=keys[::-1])[0].state != "unknown"  # the same cards, in any order
    for other in (keys[:-1], [*keys, "late/1"]):  # a card removed, a card added
        (verdict,) = monitor.judge(request, cards=other)
        assert verdict.state == "unknown" and verdict.scope == "none" and np.isnan(verdict.out_of_scope).all()


def test_a_refit_is_stored_in_the_deck_only_while_the_store_still_has_its_cards(tmp_path, caplog):
    """``store_refit`` (Ray's reconciler): the refit lands in the deck's manifest, where a loader that does not
    refit (an ingress replica) reads it; a refit for cards the store no longer has is not stored (kills a
    refit kept in memory only, and one stored over a newer deck's cards)."""
    from tests.cards import tiny_card_bytes, tiny_meta
    from tests.observability.deck_traffic import build_deck

    rig = build_deck(tmp_path / "deck", calibration_images=48)
    root = rig.deck.root
    rig.store.add_card(tiny_card_bytes(tiny_meta("late", domain="clean"), seed=7))
    added = Deck.open(root)
    refitter, outcomes = ShiftMonitor(), []
    loader = ShiftLoader(refitter, on_refit=lambda outcome, s: outcomes.append(outcome), store_refit=True)
    with caplog.at_level(logging.INFO, logger="carddeck.observability.shift"):
        loader(added)
        assert loader.wait(120) and outcomes == ["ok"]
    stored = Deck.open(root)
    assert stored.version == added.version + 1 and "stored as deck version" in caplog.text
    served = refitter.detector
    loader(stored)  # the version its own store made names what it serves: kept (and its windows), not reloaded
    assert refitter.detector is served
    reader = ShiftMonitor()
    ShiftLoader(reader, refit=False)(stored)  # another replica: reads it, refits nothing
    assert reader.detector is not None
    assert sorted(reader.detector.notes["cards"]) == sorted(c.key for c in added.cards)
    # a second replica's refit of the same deck version: the store has one for those cards by now
    with caplog.at_level(logging.INFO, logger="carddeck.observability.shift"):
        assert ShiftLoader._store(added, refitter.detector) is None
    assert DeckStore(root).manifest().version == stored.version and "has another one" in caplog.text
    (Path(root) / READ_ONLY).touch()  # a shipped deck: kept in memory, never written, no warning
    with caplog.at_level(logging.INFO, logger="carddeck.observability.shift"):
        assert ShiftLoader._store(stored, refitter.detector) is None
    assert DeckStore(root).manifest().version == stored.version and "the deck is read-only" in caplog.text
    (Path(root) / READ_ONLY).unlink()

    rig.store.remove_card("late")  # the store moves on: that detector is for cards it no longer has
    with caplog.at_level(logging.INFO, logger="carddeck.observability.shift"):
        ShiftLoader._store(added, refitter.detector)
    assert DeckStore(root).manifest().version == stored.version + 1  # the removal only
    assert "not stored: the deck's cards changed" in caplog.text


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


def test_shift_command_batches_the_split_in_the_order_asked():
    """leaves32's test split is stored class by class: in that order a 16-image request holds one class, whose
    answers the verdict reads as piled up; ``--order shuffled`` mixes every class, as clients' traffic does (and
    as the report's eval batches it), the same images. Kills a shuffle applied after --limit or not at all."""
    import argparse

    from carddeck.commands.shift import served

    data = load_dataset("leaves32", "test")
    stored = served(data, argparse.Namespace(order="dataset", limit=64))
    mixed = served(data, argparse.Namespace(order="shuffled", limit=64))
    assert len(set(stored[1][:16].tolist())) == 1 and len(set(mixed[1][:16].tolist())) >= 5
    everything = served(data, argparse.Namespace(order="shuffled", limit=None))
    assert sorted(everything[1].tolist()) == sorted(data.labels.tolist()) and len(mixed[0]) == 64
    np.testing.assert_array_equal(everything[0][:64], mixed[0])


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


def test_a_refit_that_fails_for_a_passing_reason_is_tried_again_until_it_lands(tmp_path, caplog):
    """A refit whose deck run fails once (on Ray: a card's replica lost under it) is tried again and brings the
    detector back; before, the state stayed unknown until the deck next changed (kills a loader that gives up
    after one failure, and one that retries a deck it cannot refit from: InvalidInput)."""
    from tests.cards import tiny_card_bytes, tiny_meta
    from tests.observability.deck_traffic import build_deck

    rig = build_deck(tmp_path / "deck", calibration_images=48)
    rig.store.add_card(tiny_card_bytes(tiny_meta("late", domain="clean"), seed=7))
    added = Deck.open(rig.deck.root)
    run, failures = added.run_routed, []

    def lost_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("The actor died unexpectedly before finishing this task.")
        return run(*args, **kwargs)

    added.run_routed = lost_once  # the deck's own run, failing the first time only
    monitor, outcomes = ShiftMonitor(), []
    loader = ShiftLoader(monitor, on_refit=lambda outcome, s: outcomes.append(outcome), retry_s=0.05)
    with caplog.at_level(logging.INFO, logger="carddeck.observability.shift"):
        loader(added)
        assert loader.wait(120)
    assert outcomes == ["failed", "ok"] and "trying again" in caplog.text
    assert sorted(monitor.detector.notes["cards"]) == sorted(c.key for c in added.cards)

    def unfit(*args, **kwargs):  # what refit_from_deck raises for a deck it cannot refit from
        raise InvalidInput("deck stores no calibration images")

    again = Deck.open(rig.deck.root)
    again.run_routed = unfit
    outcomes.clear()
    fresh = ShiftLoader(ShiftMonitor(), on_refit=lambda outcome, s: outcomes.append(outcome), retry_s=0.05)
    fresh(again)  # fails for good: not retried
    assert fresh.wait(30) and outcomes == ["failed"]
