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
