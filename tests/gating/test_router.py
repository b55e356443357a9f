import io

import numpy as np
import pytest

from carddeck.errors import InvalidInput
from carddeck.gating import CalibratedRouter, CalibrationPoint, Gate, fit_router
from carddeck.gating.router import candidate_subsets

D, C, N = 17, 3, 20


def point(sig: np.ndarray, good: list[int], rng) -> CalibrationPoint:
    """Cards in ``good`` are right on every image, the others always wrong."""
    labels = rng.integers(0, C, N)
    probs = np.zeros((4, N, C), np.float32)
    for k in range(4):
        predicted = labels if k in good else (labels + 1) % C
        probs[k, np.arange(N), predicted] = 0.9
        probs[k] += 0.05
    return CalibrationPoint(sig, probs, labels)


@pytest.fixture
def router() -> CalibratedRouter:
    rng = np.random.default_rng(0)
    a, b = np.zeros(D, np.float32), np.ones(D, np.float32)
    pts = [point(a + rng.normal(0, 0.01, D), [0], rng) for _ in range(5)]
    pts += [point(b + rng.normal(0, 0.01, D), [2, 3], rng) for _ in range(5)]
    return fit_router(pts, ["c0/1", "c1/1", "c2/1", "c3/1"], neighbours=3)


def test_candidates_are_smallest_first():
    s = candidate_subsets(4, 2)
    assert len(s) == 4 + 6 and s.sum(axis=1).tolist() == [1] * 4 + [2] * 6


def test_router_votes_for_the_cards_that_were_right(router):
    w = router.weights(np.stack([np.zeros(D), np.ones(D)]), ["c0/1", "c1/1", "c2/1", "c3/1"])
    assert w[0].tolist() == [1, 0, 0, 0]
    assert w[1, 2] > 0 or w[1, 3] > 0
    assert w[1, :2].sum() == 0 and np.isclose(w[1].sum(), 1)


def test_router_maps_to_the_deck_order_and_detects_stale_decks(router):
    w = router.weights(np.zeros((1, D)), ["new/1", "c3/1", "c2/1", "c1/1", "c0/1"])
    assert w[0].tolist() == [0, 0, 0, 0, 1]
    with pytest.raises(InvalidInput, match="calibrate"):
        router.weights(np.zeros((1, D)), ["c0/1", "c1/1"])


def test_save_load_round_trip(router, tmp_path):
    buf = io.BytesIO()
    router.save(buf)
    buf.seek(0)
    again = CalibratedRouter.load(buf)
    assert again.card_keys == router.card_keys and (again.scores == router.scores).all()
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(InvalidInput):
        CalibratedRouter.load(tmp_path / "bad.npz")


def test_calibrated_policy_uses_the_router(router):
    cards = [(f"c{i}", "d", tuple(np.zeros(D))) for i in range(4)]
    gate = Gate.from_cards(cards, router=router, card_keys=tuple(f"c{i}/1" for i in range(4)))
    r = gate.route_signatures(np.zeros((1, D)), policy="calibrated", per_sample=False, batch_size=3)
    assert r.selected == ("c0",) and r.weights.shape == (3, 4)


def guard_router(rng) -> CalibratedRouter:
    """Two clean batches (card 0 right) among many mildly corrupted ones nearby (cards 2+3 right):
    the kernel vote for a clean batch is carried by the corrupted neighbours."""
    clean = np.zeros(D, np.float32)
    pts = [point(clean + rng.normal(0, 0.01, D), [0], rng) for _ in range(2)]
    pts = [CalibrationPoint(p.signature, p.probabilities, p.labels, tag="clean/0") for p in pts]
    pts += [point(clean + 0.01 + rng.normal(0, 0.01, D), [2, 3], rng) for _ in range(20)]
    pts += [point(np.ones(D, np.float32) + rng.normal(0, 0.01, D), [1], rng) for _ in range(10)]
    return fit_router(pts, ["c0/1", "c1/1", "c2/1", "c3/1"], neighbours=3)


def test_clean_guard_sends_clean_batches_to_the_clean_set():
    rng = np.random.default_rng(1)
    router = guard_router(rng)
    keys = ["c0/1", "c1/1", "c2/1", "c3/1"]
    clean_batches = rng.normal(0, 0.01, (8, D)).astype(np.float32)
    assert router.subsets[router.clean_set()].tolist() == [True, False, False, False]
    # unguarded, the corrupted neighbours outvote the two clean batches
    assert (router.weights(clean_batches, keys)[:, 0] == 0).all()
    guarded = router.weights(clean_batches, keys, guard=True)
    assert (guarded == [1, 0, 0, 0]).all()
    # far from clean, the guard stays out of the way
    far = np.ones((3, D), np.float32)
    np.testing.assert_array_equal(router.weights(far, keys, guard=True), router.weights(far, keys))
    assert not router.near_clean(far).any()


def test_guard_survives_save_and_load_and_old_routers_have_none(tmp_path):
    router = guard_router(np.random.default_rng(2))
    router.save(tmp_path / "r.npz")
    again = CalibratedRouter.load(tmp_path / "r.npz")
    assert again.has_guard and again.clean_set() == router.clean_set()
    np.testing.assert_array_equal(again.scale, router.scale)
    old = CalibratedRouter(router.card_keys, router.subsets, router.signatures, router.scores)
    assert not old.has_guard and not old.near_clean(np.zeros((2, D))).any()
    with pytest.raises(InvalidInput, match="no clean calibration batches"):
        old.clean_set()


def test_router_scales_features_so_no_unit_dominates():
    """One feature on a scale 1000x the others must not decide the vote alone."""
    rng = np.random.default_rng(3)
    a, b = np.zeros(D, np.float32), np.ones(D, np.float32)
    noisy = [point(a + rng.normal(0, 0.01, D), [0], rng) for _ in range(6)]
    noisy += [point(b + rng.normal(0, 0.01, D), [1], rng) for _ in range(6)]
    for p in noisy:  # feature 0: large, random, carries no information
        p.signature[0] = rng.normal(0, 1000)
    router = fit_router(noisy, ["c0/1", "c1/1", "c2/1", "c3/1"], neighbours=3)
    query = np.stack([a, b])
    query[:, 0] = [800.0, -800.0]
    w = router.weights(query, ["c0/1", "c1/1", "c2/1", "c3/1"])
    assert w[0, 0] == 1 and w[1, 1] == 1


def test_novelty_is_the_distance_to_the_nearest_calibration_batch_in_bandwidths(router):
    near, far = router.novelty(np.stack([np.zeros(D), np.full(D, 40.0)]))
    assert near < 1.0 < 10.0 < far


def test_guarded_hedges_where_the_router_is_unsure():
    """Far from every calibration batch the router only extrapolates (its prior vote): the guarded
    policy hedges there, half the router's choice, a quarter the nearest spectral domain's cards, a
    quarter every card; near a calibration batch it follows the router, near clean data the guard."""
    from carddeck.gating.policies import HEDGE, UNSURE_AT, fallback

    rng = np.random.default_rng(0)
    r = guard_router(rng)
    assert r.clean_cards().tolist() == [True, False, False, False]
    # two domains: c0, c1 (references at 0) and c2, c3 (at -30), so the unseen batch is nearest to c2, c3
    cards = [(f"c{i}", "near" if i < 2 else "far", tuple(np.full(D, 0.0 if i < 2 else -30.0))) for i in range(4)]
    gate = Gate.from_cards(cards, router=r, card_keys=tuple(f"c{i}/1" for i in range(4)))
    unseen = np.full((1, D), -30.0, np.float32)
    assert r.novelty(unseen)[0] > UNSURE_AT and not r.near_clean(unseen)[0]
    alone = r.weights(unseen, gate.keys, guard=True)[0]
    routed = gate.route_signatures(unseen, policy="guarded", per_sample=False, batch_size=2).weights[0]
    expected = HEDGE[0] * alone + HEDGE[1] * np.array([0, 0, 0.5, 0.5]) + HEDGE[2] * np.full(4, 0.25)
    np.testing.assert_allclose(routed, expected, atol=1e-6)
    assert (routed > 0).all() and abs(routed.sum() - 1) < 1e-6  # every card runs, the router's weighs most
    assert (fallback(gate, unseen, np.zeros((1, 2)), "clean-cards") == [1, 0, 0, 0]).all()
    with pytest.raises(InvalidInput, match="unknown fallback"):
        fallback(gate, unseen, np.zeros((1, 2)), "average")
    familiar = np.ones((1, D), np.float32)  # a corrupted calibration condition: the router's own choice
    assert r.novelty(familiar)[0] < UNSURE_AT
    np.testing.assert_array_equal(
        gate.route_signatures(familiar, policy="guarded", per_sample=False, batch_size=1).weights,
        r.weights(familiar, gate.keys, guard=True),
    )
    clean = np.zeros((1, D), np.float32)  # the guard comes first
    np.testing.assert_array_equal(
        gate.route_signatures(clean, policy="guarded", per_sample=False, batch_size=1).weights[0], [1, 0, 0, 0]
    )
