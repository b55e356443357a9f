"""The shift detector (model and fitting) on a real deck: photometric groups, per-image scope, honest
expected accuracy, the per-request Trust, and the label-free refit from the calibration images a deck stores."""

from __future__ import annotations

import io
import json
import logging
from collections import deque
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

import carddeck.gating.shift as shift_mod
import carddeck.gating.shift_fit as shift_fit
from carddeck.data.corruptions import corrupt
from carddeck.data.datasets import load_dataset
from carddeck.deck import Deck, DeckStore, default_deck_path
from carddeck.errors import InvalidInput
from carddeck.gating.shift import (
    CONFIDENCE,
    FEATURE_NAMES,
    GATE_NAMES,
    GROUPS,
    SCOPE_FEATURE_SETS,
    UNKNOWN,
    Scope,
    ShiftDetector,
    Trust,
    calibrated_thresholds,
    clean_draws,
    image_features,
    image_risk,
    mean_embedding,
    mmd2,
    photometric_features,
)
from carddeck.gating.shift_fit import deck_features, deck_outputs, deck_references, fit_detector, refit_from_deck
from carddeck.observability.shift import ShiftLoader, ShiftMonitor
from carddeck.serving.verdicts import RoutedRequest
from tests.servers import card


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits32", "val"), load_dataset("digits32", "test")


@pytest.fixture(scope="module")
def tiny_deck(tmp_path_factory, digits):
    """Two tiny real ONNX cards and 96 clean calibration images (digits32 val)."""
    root = tmp_path_factory.mktemp("deck") / "deck"
    store = DeckStore.create(root)
    store.add_card(card("g1", "gaussian", seed=1))
    store.add_card(card("a1", "augmix", seed=2))
    store.set_calibration(digits[0].images[:96])
    return root


@pytest.fixture(scope="module")
def deck():
    return Deck.open(default_deck_path())  # the packaged digits32 deck: real accuracies


@pytest.fixture(scope="module")
def references(deck, digits):
    val = digits[0]
    return deck_references(deck, val.images[:160], val.labels[:160], [("gaussian_noise", 3), ("fog", 4)],
                           domains=["gaussian"], seed=1)  # fmt: skip


@pytest.fixture(scope="module")
def detector(deck, references):
    return fit_detector(references, draws=400, cards=[c.key for c in deck.cards], scope_features="all")


def test_every_feature_is_in_exactly_one_group():
    grouped = [n for names in GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(FEATURE_NAMES) and len(grouped) == len(set(grouped))


def test_brightness_alone_is_flagged_by_the_photometric_group(detector, deck, digits):
    """A brightness shift the detector was never fitted on: not in-distribution. Without the photometric
    group's own threshold (one kernel over every feature) the spectral columns drown it."""
    test = digits[1].images[:64]
    bright, _ = deck_features(deck, corrupt(test, "brightness", 2, seed=0))
    clean, _ = deck_features(deck, test)
    flagged = [detector.test(bright[i : i + 16]).state != "in_distribution" for i in range(0, 64, 16)]
    calm = [detector.test(clean[i : i + 16]).state == "in_distribution" for i in range(0, 64, 16)]
    assert all(flagged) and all(calm)


def test_scope_calls_foreign_images_out_and_clean_ones_in(detector, deck, digits):
    clean, _ = deck_features(deck, digits[1].images[:200])
    noise, _ = deck_features(deck, np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    black, _ = deck_features(deck, np.zeros((16, 32, 32, 3), np.uint8))
    assert (detector.image_scores(clean) > 1).mean() <= 0.12  # calibrated at 5% on val; 200 test images
    assert (detector.image_scores(noise) > 1).all() and (detector.image_scores(black) > 1).all()


def test_a_foreign_batch_never_reports_a_confident_accuracy(detector, deck):
    """All-black images: the old detector said 100; now unknown (mostly out of scope)."""
    black, _ = deck_features(deck, np.zeros((16, 32, 32, 3), np.uint8))
    v = detector.test(black)
    assert v.state == "uncovered" and v.expected_kind == "unknown" and np.isnan(v.expected_accuracy)


def test_a_half_foreign_batch_reports_at_most_the_clean_accuracy(detector, deck, digits):
    """10 digits and 6 noise images: uncovered, and the estimate is a bound no higher than clean."""
    noise = np.random.default_rng(3).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    mixed, _ = deck_features(deck, np.concatenate([digits[1].images[:10], noise]))
    v = detector.test(mixed)
    assert v.state == "uncovered" and v.expected_kind == "upper_bound"
    assert v.expected_accuracy <= detector.clean_accuracy


def _novel(detector, deck, digits, corruption, severity, rows):
    """Features of test digits under a corruption the detector has no condition or scope reference for, with
    what the new-shift rule reads: the share out of scope, the share foreign, and DoC."""
    from carddeck.gating.shift import FOREIGN

    features, _ = deck_features(deck, corrupt(digits[1].images[: rows.stop], corruption, severity, seed=0))
    features = features[rows]
    scores = detector.image_scores(features)
    return features, float((scores > 1).mean()), float((scores > FOREIGN).mean()), detector._doc(features)


def test_a_new_shift_out_of_scope_but_confident_is_covered_at_most_at_clean(detector, deck, digits):
    """Shot noise (the deck stays 99% accurate; no condition or scope reference of it): most images out of
    scope, none foreign, confidences at least clean's. Covered, with an estimate no higher than clean,
    where the nearest conditions' blend says more (before: uncovered, estimate unknown)."""
    clean = detector.clean_accuracy
    for rows in (slice(0, 16), slice(16, 32)):
        features, outside, foreign, doc = _novel(detector, deck, digits, "shot_noise", 5, rows)
        assert outside > 0.5 and foreign == 0 and doc >= clean  # the rule's own path, not the in-scope one
        v = detector.test(features)
        assert v.state == "covered" and v.expected_kind == "estimate" and v.covered_by == "confidence"
        assert detector._expected(detector.statistics(features), features) > clean >= v.expected_accuracy


def test_a_new_shift_out_of_scope_with_low_confidence_is_uncovered(detector, deck, digits):
    """Elastic digits the deck gets 88% right: out of scope, none foreign, but the confidences (DoC) fall more
    than the tolerance under clean. Uncovered, bounded at clean, though the blend with the nearest conditions
    is within the in-scope rule's margin (which would have covered it)."""
    features, outside, foreign, doc = _novel(detector, deck, digits, "elastic_transform", 2, slice(16, 32))
    clean, n = detector.clean_accuracy, len(features)
    assert outside > 0.5 and foreign == 0 and doc < clean - detector.tolerance
    assert detector._expected(detector.statistics(features), features) >= clean - detector.tolerance - 0.25 / n**0.5
    v = detector.test(features)
    assert v.state == "uncovered" and v.expected_kind == "upper_bound" and v.expected_accuracy <= clean
    assert v.covered_by == ""


def test_confidence_never_vouches_for_foreign_images(detector, deck, digits):
    """Impulse noise on digits: the deck stays confident (DoC within tolerance of clean), but every image is
    beyond the foreign level of the scope, where no estimate can vouch for it: uncovered."""
    features, _, foreign, doc = _novel(detector, deck, digits, "impulse_noise", 3, slice(0, 16))
    assert foreign > 0.5 and doc >= detector.clean_accuracy - detector.tolerance
    assert detector.test(features).state == "uncovered"


def test_the_cards_agreement_vouches_for_a_new_shift_they_read_alike(detector, deck, digits):
    """Impulse noise on digits (no condition or scope reference of it; the deck stays 99% right): every image as
    far out of scope as a foreign one, so the foreign limit alone leaves the batch uncovered; but the routed
    cards agree on it as on clean digits (DoA within tolerance): covered, estimated no higher than clean.
    Without the agreement (none given; one card per image, NaN; a second card on under half the images) the
    rule before it holds: uncovered. Rigged so that the confidences fall 20 points under clean, uncovered too:
    agreement vouches only with the confidences within twice the tolerance."""
    from carddeck.gating.shift import AGREEMENT_SHARE, FOREIGN, FOREIGN_SHARE

    clean, tol = detector.clean_accuracy, detector.tolerance
    for rows in (slice(0, 16), slice(16, 32)):
        out = deck_outputs(deck, corrupt(digits[1].images[: rows.stop], "impulse_noise", 3, seed=0))
        features, agreement = out.features[rows], out.agreement[rows]
        assert (detector.image_scores(features) > FOREIGN).mean() > FOREIGN_SHARE
        assert detector._doa(agreement) >= clean - tol and detector._doc(features) >= clean - tol
        v = detector.test(features, agreement=agreement)
        assert v.state == "covered" and v.expected_kind == "estimate" and v.expected_accuracy <= clean
        assert v.covered_by == "agreement"
        assert detector.test(features).state == "uncovered"
        assert detector.test(features, agreement=np.full(16, np.nan, np.float32)).state == "uncovered"
        thin = agreement.copy()
        thin[: int(16 * (1 - AGREEMENT_SHARE)) + 1] = np.nan
        assert detector.test(features, agreement=thin).state == "uncovered"
        doubtful = replace(detector, confidence=detector.confidence + np.float32(0.2))
        assert doubtful.test(features, agreement=agreement).state == "uncovered"


def _piled(probabilities: np.ndarray, onto: int) -> np.ndarray:
    """Each row rolled so that its largest probability lands on class ``onto``: the confidences and entropies
    are unchanged, every answer is ``onto``."""
    shift = onto - probabilities.argmax(axis=1)
    return np.stack([np.roll(row, k) for row, k in zip(probabilities, shift)])


def test_answers_piled_onto_one_class_take_the_cards_word_away(detector, deck, digits):
    """A new shift out of scope that the cards vouch for (shot noise/5 on their confidences, impulse noise/3 on
    their agreement) stays covered while its answers mix classes as clean requests do, and is uncovered (never
    estimated above clean) once every answer is one class (confidently wrong alike: leaves32 colour cast/4, 11% true).
    In scope, a request of one class is label shift, not harm: gaussian noise/5 stays covered. Kills a veto that
    is never applied, one applied on the in-scope path, and one that ignores the answers."""
    for corruption, severity, path in (("shot_noise", 5, "confidence"), ("impulse_noise", 3, "agreement"),
                                       ("gaussian_noise", 5, "in_scope")):  # fmt: skip
        out = deck_outputs(deck, corrupt(digits[1].images[:16], corruption, severity, seed=0))
        mixed = detector.test(out.features, agreement=out.agreement, labels=out.labels)
        assert mixed.state == "covered" and mixed.covered_by == path, (corruption, mixed)
        assert len(set(out.labels.tolist())) >= 6  # the test digits' answers mix classes
        piled = detector.test(out.features, agreement=out.agreement, labels=np.full(16, 3))
        if path == "in_scope":
            assert piled.state == "covered" and piled.covered_by == "in_scope"
        else:
            assert piled.state == "uncovered" and piled.covered_by == "", (corruption, piled)
            assert not piled.expected_accuracy > detector.clean_accuracy  # a bound, or unknown (NaN) far out


def test_the_class_mix_threshold_keeps_its_false_alarm_rate(detector):
    """Requests drawn from the clean answers' class mix are called piled at most at about alpha, at every size
    (a request larger than the largest calibrated size uses that size's threshold, which errs high); a request
    of one class always is; without a class mix (a detector fitted before it) or answers, never."""
    q = detector.label_share
    assert q is not None and q.sum() == pytest.approx(1) and len(q) == 10
    rng = np.random.default_rng(7)
    for n in (16, 32, 64, 300):
        alarms = np.mean([detector.collapsed(rng.choice(len(q), n, p=q)) for _ in range(3000)])
        assert alarms <= 2 * detector.alpha, (n, alarms)
        assert detector.collapsed(np.full(n, int(np.argmax(q))))
    assert not replace(detector, label_share=None).collapsed(np.full(16, 3))
    assert not detector.collapsed(None)
    with pytest.raises(InvalidInput, match="class shares"):
        replace(detector, label_share=q * 2)


def test_a_null_threshold_is_the_statistic_of_random_batches_against_the_rest(monkeypatch):
    """One draw's threshold is that batch's MMD^2 against the mean embedding of the other images (mmd2, as
    served); drawn in chunks of any size, the same draws give the same thresholds."""
    phi = np.random.default_rng(3).standard_normal((60, 12)).astype(np.float32)
    one = calibrated_thresholds(phi, 3, (8,), 0.5, 1, np.random.default_rng(5))[:, 0]
    pick = np.argpartition(np.random.default_rng(5).random((1, 60)), 7, axis=1)[0, :8]
    rest = np.setdiff1d(np.arange(60), pick)
    mean, norm = mean_embedding(phi[rest], 3)
    np.testing.assert_allclose(one, mmd2(phi[pick], mean[None], norm[None], 3)[0], rtol=1e-6, atol=1e-9)
    whole = calibrated_thresholds(phi, 3, (4, 8), 0.01, 50, np.random.default_rng(9))
    monkeypatch.setattr(shift_mod, "CHUNK", 7)
    np.testing.assert_array_equal(calibrated_thresholds(phi, 3, (4, 8), 0.01, 50, np.random.default_rng(9)), whole)


def test_clean_thresholds_rest_on_enough_null_batches(references):
    """By default the clean thresholds are quantiles of clean_draws(alpha, G) null batches, at least 30 of them
    beyond each group's quantile (2,000 left 3 at alpha 0.005: a lottery of the seed), a quarter of that for
    the other conditions; an explicit count wins."""
    assert clean_draws(0.005, 3) == 18000 and clean_draws(0.5, 3) == shift_mod.BOOTSTRAP
    fitted = fit_detector(references, alpha=0.01, seed=4, scope_features="all")
    phi = fitted.embedding(references[0].features)
    g = fitted.embedding.groups
    rng, n = np.random.default_rng(4), clean_draws(0.01, g)
    np.testing.assert_array_equal(fitted.thresholds[0], calibrated_thresholds(phi, g, fitted.sizes, 0.01 / g, n, rng))
    second = fitted.embedding(references[1].features)
    expect = calibrated_thresholds(second, g, fitted.sizes, 0.01 / g, n // 4, rng)
    np.testing.assert_array_equal(fitted.thresholds[1], expect)
    few = fit_detector(references, alpha=0.01, seed=4, draws=100, scope_features="all")
    expect = calibrated_thresholds(phi, g, fitted.sizes, 0.01 / g, 100, np.random.default_rng(4))
    np.testing.assert_array_equal(few.thresholds[0], expect)


def test_each_covered_batch_names_the_path_that_covered_it(detector, deck, digits):
    """Gaussian noise/3, one of the detector's conditions: covered as "known" (near it); gaussian noise/5, none of
    them, far from every condition yet in scope, the deck accurate on it: "in_scope". (The confidences' and the
    agreement's paths: the tests above.) Kills a verdict that credits a covered batch to the wrong path."""
    for corruption, severity, path in (("gaussian_noise", 3, "known"), ("gaussian_noise", 5, "in_scope")):
        out = deck_outputs(deck, corrupt(digits[1].images[:64], corruption, severity, seed=0))
        for i in range(0, 64, 16):
            v = detector.test(out.features[i : i + 16], agreement=out.agreement[i : i + 16])
            assert v.state == "covered" and v.covered_by == path, (corruption, severity, v)
            assert v.distance <= 1 if path == "known" else v.distance > 1 and v.out_of_scope <= 0.5


def test_the_cards_agreement_never_vouches_for_foreign_images(detector, deck):
    """Black images, noise and natural images (leaves32) on the digits deck: the routed cards disagree (DoA far
    under clean), so they stay uncovered; also on a detector rigged so that the deck's confidences on them equal
    clean's (a deck confident on black images): the confidences never open the agreement path."""
    clean, tol = detector.clean_accuracy, detector.tolerance
    foreign = {
        "black": np.zeros((16, 32, 32, 3), np.uint8),
        "noise": np.random.default_rng(7).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
        "leaves32": load_dataset("leaves32", "test").images[::50][:16],
    }
    for name, images in foreign.items():
        out = deck_outputs(deck, images)
        assert detector._doa(out.agreement) < clean - 2 * tol, name
        assert detector.test(out.features, agreement=out.agreement).state == "uncovered", name
        confident = detector.confidence.copy()
        confident[0] = out.features[:, CONFIDENCE].mean()  # DoC = clean on these images
        rigged = replace(detector, confidence=confident)
        assert rigged._doc(out.features) >= clean - tol, name
        assert rigged.test(out.features, agreement=out.agreement).state == "uncovered", name


def test_the_deck_reports_the_weight_of_the_cards_that_side_with_its_answer(deck, digits):
    """Deck.predict's agreement per image equals the routing weight of the routed cards (each run alone) whose
    top label is the deck's, over the image's routed weight."""
    images = np.concatenate([digits[1].images[:12], corrupt(digits[1].images[12:24], "fog", 5, seed=0)])
    p = deck.predict(images)
    w = p.routing.weights
    tops = np.stack([deck.run_card(name, images).argmax(1) for name in deck.card_names], 1)  # [n, K]
    want = (w * (tops == p.labels[:, None])).sum(1) / w.sum(1)
    want[(w > 0).sum(1) < 2] = np.nan
    np.testing.assert_allclose(p.agreement, want, rtol=1e-5)
    assert np.isfinite(p.agreement).any() and (p.agreement[np.isfinite(p.agreement)] < 1).any()


def test_the_monitor_judges_with_the_cards_agreement(detector, deck, digits):
    """A request's agreement reaches the test, as a batch and through the window of single-image requests: an
    impulse-noise request is covered with it (and its answer says so: covered_by "agreement") and uncovered
    without it."""
    images = corrupt(digits[1].images[:16], "impulse_noise", 3, seed=0)
    p, x = deck.predict(images), deck.prepare(images)
    states = {}
    for given in (True, False):
        monitor = ShiftMonitor(window=16, stride=16, min_batch=16)
        monitor.set_detector(detector)
        agreement = p.agreement if given else np.full(16, np.nan, np.float32)
        batch = monitor.judge([RoutedRequest("m", x, p.routing, p.probabilities, agreement)])[0]
        one = [("w", x[i : i + 1], SimpleNamespace(features=p.routing.features[i : i + 1]), p.probabilities[i : i + 1],
                agreement[i : i + 1]) for i in range(16)]  # fmt: skip
        singles = [monitor.judge([request])[0] for request in one]
        states[given] = batch.state, singles[-1].state, batch.covered_by, singles[-1].covered_by
    assert states == {True: ("covered", "covered", "agreement", "agreement"), False: ("uncovered", "uncovered", "", "")}


def test_the_monitor_judges_with_the_requests_answers(detector, deck, digits):
    """The served answers reach the test, as a batch (all its images) and through the window of single-image
    requests: shot noise/5, covered on the cards' confidences, is uncovered once every answer is one class
    (probabilities rolled: confidences unchanged). Kills a monitor that drops the answers."""
    images = corrupt(digits[1].images[:16], "shot_noise", 5, seed=0)
    p, x = deck.predict(images), deck.prepare(images)
    states = {}
    for piled in (False, True):
        probabilities = _piled(p.probabilities, 3) if piled else p.probabilities
        monitor = ShiftMonitor(window=16, stride=16, min_batch=16)
        monitor.set_detector(detector)
        batch = monitor.judge([RoutedRequest("m", x, p.routing, probabilities, p.agreement)])[0]
        one = [("w", x[i : i + 1], SimpleNamespace(features=p.routing.features[i : i + 1]),
                probabilities[i : i + 1], p.agreement[i : i + 1]) for i in range(16)]  # fmt: skip
        singles = [monitor.judge([request])[0] for request in one]
        states[piled] = batch.state, singles[-1].state
    assert states == {False: ("covered", "covered"), True: ("uncovered", "uncovered")}


def test_save_and_load_round_trip(detector):
    buf = io.BytesIO()
    detector.save(buf)
    buf.seek(0)
    back = ShiftDetector.load(buf, name="x")
    assert back.conditions == detector.conditions and back.scope.threshold == detector.scope.threshold
    np.testing.assert_array_equal(back.thresholds, detector.thresholds)
    assert detector.agreement is not None
    np.testing.assert_array_equal(back.agreement, detector.agreement)
    np.testing.assert_array_equal(back.label_share, detector.label_share)


def test_the_fit_keeps_the_class_mix_of_the_decks_clean_answers(detector, references):
    clean = references[0]
    assert clean.name == "clean" and clean.labels is not None
    np.testing.assert_allclose(detector.label_share, np.bincount(clean.labels, minlength=10) / len(clean.labels))


def test_trust_marks_abstentions_and_the_shifted_question():
    t = Trust("covered", "batch", 0.9, "estimate", np.array([0.5, 2.0], np.float32), np.array([0.1, 0.6], np.float32))
    assert t.in_scope.tolist() == [True, False] and t.shifted is True
    assert t.abstained(0.5).tolist() == [False, True] and not t.abstained(None).any()
    unknown = Trust.unknown(2, np.array([[0.9, 0.1], [0.5, 0.5]], np.float32))
    assert unknown.state == UNKNOWN and unknown.shifted is None and unknown.in_scope.all()
    np.testing.assert_allclose(unknown.risk, [0.1, 0.5], atol=1e-6)


def test_monitor_answers_each_request_of_a_micro_batch(detector, deck, digits):
    monitor = ShiftMonitor(window=8, stride=4)
    monitor.set_detector(detector)

    def P(images):
        p = deck.predict(images)
        return RoutedRequest("carddeck", deck.prepare(images), p.routing, p.probabilities)

    big, noise = P(digits[1].images[:16]), P(np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), np.uint8))
    trusts = monitor.judge([big, noise])
    assert trusts[0].scope == "batch" and trusts[0].state == "in_distribution" and len(trusts[0].risk) == 16
    assert trusts[1].state == UNKNOWN and trusts[1].scope == "none"  # no window full yet
    assert not trusts[1].in_scope[0] and trusts[1].risk[0] == 1.0  # but the image has its own verdict
    for _ in range(8):
        last = monitor.judge([P(np.random.default_rng(2).integers(0, 256, (1, 32, 32, 3), np.uint8))])[0]
    assert last.scope == "window" and last.state == "uncovered"


def test_refit_from_the_deck_alone_serves_a_detector_for_the_new_cards(tiny_deck, tmp_path, caplog, digits):
    """A card added: the stored detector (for the old cards) is refused, the state is unknown, and the
    background refit from the deck's calibration images (no labels, no dataset) brings a detector back."""
    root = tmp_path / "deck"
    store = DeckStore.create(root)
    store.add_card(card("g1", "gaussian", seed=1))
    store.set_calibration(digits[0].images[:64])
    store.set_gate(shift=refit_from_deck(Deck.open(root)))
    monitor = ShiftMonitor()
    outcomes = []
    loader = ShiftLoader(monitor, on_refit=lambda outcome, s: outcomes.append(outcome))
    loader(Deck.open(root))
    assert monitor.detector is not None and not outcomes  # read through the store, no refit
    store.add_card(card("a1", "augmix", seed=2))
    deck = Deck.open(root)
    with caplog.at_level(logging.INFO, logger="carddeck.observability.shift"):
        loader(deck)
        assert monitor.detector is None  # unknown, never silently the old one
        assert loader.wait(120)
    assert outcomes == ["ok"] and sorted(monitor.detector.notes["cards"]) == sorted(c.key for c in deck.cards)
    assert monitor.detector.notes["scope_features"] == "all"  # a label-free check is too thin to vouch for coarse
    assert monitor.detector.label_share is not None  # the class mix needs no labels: the deck's own answers
    assert "refitting the shift detector" in caplog.text and "refitted" in caplog.text


def test_image_features_columns_match_the_names(tiny_deck, digits):
    deck = Deck.open(tiny_deck)
    p = deck.predict(digits[1].images[:4])
    assert image_features(deck.prepare(digits[1].images[:4]), p.probabilities).shape == (4, len(FEATURE_NAMES))


def test_an_uncovered_batch_never_claims_more_than_clean(detector, deck, digits):
    """Fog/4 digits (mostly out of scope, near the fitted fog/4): with clean at 50% and every shifted condition
    at 40%, the confident predictions would put the estimate above clean; it is capped at the clean 50%."""
    fog, _ = deck_features(deck, corrupt(digits[1].images[:16], "fog", 4, seed=0))
    rigged = replace(detector, accuracy=np.r_[0.5, np.full(len(detector.accuracy) - 1, 0.4)].astype(np.float32))
    v = rigged.test(fog)
    assert v.state == "uncovered" and v.expected_kind == "upper_bound" and v.expected_accuracy <= 0.5


def test_the_scope_reads_only_its_features(detector, references):
    """The coarse scope ignores fine texture: scrambling the high spectral rings, orientation, gradient and
    output columns leaves its scores as they were, and moves the every-feature scope's."""
    clean = references[0].features
    pooled = {"clean": [clean], "domain:gaussian": [references[1].features]}
    coarse = Scope.fit(pooled, detector.embedding, features=SCOPE_FEATURE_SETS["coarse"])
    every = Scope.fit(pooled, detector.embedding)
    scrambled = clean.copy()
    fine = [i for i, n in enumerate(FEATURE_NAMES) if n not in SCOPE_FEATURE_SETS["coarse"]]
    scrambled[:, fine] = np.random.default_rng(0).permutation(scrambled[:, fine])
    np.testing.assert_array_equal(
        coarse.scores(scrambled, detector.embedding), coarse.scores(clean, detector.embedding)
    )
    assert not np.allclose(every.scores(scrambled, detector.embedding), every.scores(clean, detector.embedding))
    assert coarse.means.shape == (2, len(SCOPE_FEATURE_SETS["coarse"]))
    with pytest.raises(InvalidInput, match="features"):
        replace(coarse, features=FEATURE_NAMES)


def test_the_scope_features_are_chosen_by_the_family_held_out_check(references, monkeypatch):
    """select_scope keeps the first feature set that meets its bounds on the fitting data (each family held out),
    and when none does, :func:`fallback_scope`'s choice (here a tie: every feature); what each set measured is
    in the notes."""
    monkeypatch.setattr(shift_fit, "SCOPE_CHECK", {"benign_uncovered": 1.0, "harmful_error": 1.0})
    lax = fit_detector(references, draws=100)
    assert lax.notes["scope_features"] == "coarse" and lax.scope.features == SCOPE_FEATURE_SETS["coarse"]
    monkeypatch.setattr(shift_fit, "SCOPE_CHECK", {"benign_uncovered": -1.0, "harmful_error": 1.0})
    strict = fit_detector(references, draws=100)
    assert strict.notes["scope_features"] == "all" and strict.scope.features == FEATURE_NAMES
    assert set(strict.notes["scope_check"]) == set(SCOPE_FEATURE_SETS)
    # the check's numbers are the ones it decided on: the fog/4 digits (harmful, weather held out) have an estimate
    assert strict.notes["scope_check"]["coarse"] == lax.notes["scope_check"]["coarse"]
    with pytest.raises(InvalidInput, match="scope features"):
        fit_detector(references, draws=100, scope_features="fine")


@pytest.mark.parametrize(
    ("coarse", "every", "kept"),
    [
        ((0.12, 0.07), (0.27, 0.07), "coarse"),  # leaves32, fit seed 1: both within the harmful bound
        ((0.03, 0.21), (0.88, 0.10), "all"),  # digits32: coarse misjudges a harmful condition
        ((0.50, 0.13), (0.10, 0.20), "coarse"),  # neither within the harmful bound: the one misjudging less
        ((0.30, 0.05), (0.30, 0.05), "all"),  # a tie: the later set
    ],
)
def test_when_no_scope_passes_a_harmful_misjudgement_weighs_more_than_benign_uncovered(coarse, every, kept):
    """Mutants: the last set whatever was measured (the leaves32 row), the fewest benign uncovered regardless
    of the harmful bound (digits32), the first set on a tie."""
    checked = {name: {"benign_uncovered": b, "harmful_error": h, "conditions": 75}
               for name, (b, h) in (("coarse", coarse), ("all", every))}  # fmt: skip
    assert shift_fit.fallback_scope(checked) == kept


def test_a_coarse_scope_survives_saving_and_format_4_files_still_load(detector, references):
    coarse = replace(detector, scope=Scope.fit({"clean": [references[0].features]}, detector.embedding,
                                               features=SCOPE_FEATURE_SETS["coarse"]))  # fmt: skip
    buf = io.BytesIO()
    coarse.save(buf)
    buf.seek(0)
    back = ShiftDetector.load(buf, name="x")
    assert back.scope.features == SCOPE_FEATURE_SETS["coarse"]
    np.testing.assert_array_equal(
        back.image_scores(references[2].features), coarse.image_scores(references[2].features)
    )
    # a format-4 file (every feature in the scope, no list of them) reads as it was written
    buf = io.BytesIO()
    detector.save(buf)
    buf.seek(0)
    with np.load(buf) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays.pop("header")))
    arrays.pop("agreement")  # written since the cards' agreement; older files lack it
    header["format"] = "carddeck-shift/4"
    del header["scope"]["features"]
    old = io.BytesIO()
    np.savez(old, header=np.array(json.dumps(header)), **arrays)
    old.seek(0)
    four = ShiftDetector.load(old, name="old")
    assert four.scope.features == FEATURE_NAMES and four.agreement is None  # judged as before it
    np.testing.assert_array_equal(
        four.image_scores(references[2].features), detector.image_scores(references[2].features)
    )


def plain_photometric(x: np.ndarray) -> np.ndarray:
    """The photometric statistics written plainly (np.mean, np.partition, np.std): what the fast one must equal."""
    luma = x.mean(axis=1).reshape(len(x), -1)
    k = luma.shape[1]
    part = np.partition(luma, (int(0.05 * (k - 1)), int(0.95 * (k - 1))), axis=1)
    sat = (x.max(axis=1) - x.min(axis=1)).reshape(len(x), -1)
    return np.stack([part[:, int(0.05 * (k - 1))], part[:, int(0.95 * (k - 1))], sat.std(axis=1)], 1)


def test_photometric_features_equal_the_plain_numpy_ones_bit_for_bit():
    rng = np.random.default_rng(4)
    for _ in range(50):
        n, h, w = (int(v) for v in rng.integers(1, 40, 3))
        x = rng.random((n, 3, h + 4, w + 4), dtype=np.float32) ** np.float32(rng.uniform(0.2, 5))
        np.testing.assert_array_equal(photometric_features(x), plain_photometric(x))


def reference_verdicts(detector, requests, window, stride, min_batch):
    """What the monitor answered before it skipped work: every feature of every image, every image scored,
    then each large request tested on its evenly spaced sample and small ones through the sliding window."""
    x, p, g = (np.concatenate([r[i] for r in requests]) for i in range(3))
    features = image_features(x, p, g)
    scores = detector.image_scores(features)
    risks = image_risk(p, scores)
    out, win, pending, last, start = [], deque(maxlen=window), 0, None, 0
    for r in requests:
        n = len(r[0])
        if n >= min_batch:
            pick = np.linspace(start, start + n - 1, min_batch).round().astype(np.int64)
            v = detector.test(features[pick], scores[pick])
        else:
            win.extend(range(start, start + n))
            pending += n
            if len(win) == window and pending >= stride:
                pending, last = 0, detector.test(features[list(win)], scores[list(win)])
            v = last
        out.append((v, scores[start : start + n], risks[start : start + n]))
        start += n
    return out


@pytest.mark.parametrize("scope", ["all", "coarse"])
def test_the_monitor_answers_exactly_as_the_detector_on_every_image(detector, references, deck, digits, scope):
    """The monitor reads the photometric statistics only of the images its tests read where its scope reads
    none (a coarse scope: a large request's untested images), and computes risks once per micro-batch:
    per-image scores, risks and each request's state and estimate equal the plain computation's exactly."""
    if scope == "coarse":
        detector = replace(detector, scope=Scope.fit({"clean": [references[0].features]}, detector.embedding,
                                                     features=SCOPE_FEATURE_SETS["coarse"]))  # fmt: skip
    assert detector.scope.reads_photometric == (scope == "all")
    rng = np.random.default_rng(5)
    test = digits[1].images
    pool = np.concatenate([test[:120], corrupt(test[120:200], "brightness", 4, seed=0), test[200:230] // 3 + 160])
    sizes = [64, 1, 3, 1, 20, 1, 1, 2, 16, 5, 1, 1, 4, 1, 2, 33, 1, 1, 3, 1, 6, 1, 2, 1]
    order = rng.permutation(len(pool))[: sum(sizes)]
    requests, routed = [], []
    for a, b in zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes)):
        images = pool[order[a:b]]
        pred = deck.predict(images)
        x = deck.prepare(images)
        requests.append((x, pred.probabilities, pred.routing.features))
        routed.append(RoutedRequest("m", x, pred.routing, pred.probabilities))
    monitor = ShiftMonitor(window=16, stride=4, min_batch=16)
    monitor.set_detector(detector)
    trusts = [*monitor.judge(routed[:7]), *monitor.judge(routed[7:8]), *monitor.judge(routed[8:])]
    want = reference_verdicts(detector, requests, 16, 4, 16)
    assert {w[0].state for w in want if w[0] is not None} >= {"in_distribution", "uncovered"}  # the input varies
    for trust, (v, scores, risks) in zip(trusts, want, strict=True):
        np.testing.assert_array_equal(trust.out_of_scope, scores)
        np.testing.assert_array_equal(trust.risk, risks)
        assert trust.state == (UNKNOWN if v is None else v.state)
        np.testing.assert_array_equal(trust.expected_accuracy, np.nan if v is None else v.expected_accuracy)


def test_output_features_and_risk_equal_the_plain_numpy_ones_bit_for_bit():
    rng = np.random.default_rng(6)
    for _ in range(30):
        n, c = (int(v) for v in rng.integers(1, 70, 2))
        p = rng.dirichlet(np.full(c + 1, rng.uniform(0.05, 5)), n).astype(np.float32)
        p[0] = np.eye(c + 1, dtype=np.float32)[0]  # a certain answer: log of the floor
        scores = rng.uniform(0, 2, n).astype(np.float32)
        f = image_features(np.zeros((n, 3, 8, 8), np.float32), p, np.zeros((n, len(GATE_NAMES)), np.float32))
        np.testing.assert_array_equal(f[:, -2], p.max(axis=1))
        np.testing.assert_array_equal(f[:, -1], -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1))
        want = np.where(scores > 1.0, np.float32(1.0), 1.0 - p.max(axis=1)).astype(np.float32)
        risk = image_risk(p, scores)
        assert risk.dtype == np.float32
        np.testing.assert_array_equal(risk, want)
