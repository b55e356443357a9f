import numpy as np
import pytest
from scipy.spatial.distance import cdist

from carddeck.errors import InvalidInput
from carddeck.gating import POLICIES, Gate, GateParams, Routing, pairwise_distances

D = 17
NOISE = np.linspace(-2, 0, D).astype(np.float32)  # synthetic references: a noisy and a smooth domain
SMOOTH = np.linspace(-2, -5, D).astype(np.float32)


def gate(**params) -> Gate:
    cards = [("g1", "gaussian", tuple(NOISE)), ("a1", "augmix", tuple(SMOOTH)), ("g2", "gaussian", tuple(NOISE))]
    cards.append(("a2", "augmix", tuple(SMOOTH + 0.01)))
    return Gate.from_cards(cards, params=GateParams(**params))


def route(g: Gate, sigs: np.ndarray, policy: str, per_sample: bool = True) -> Routing:
    return g.route_signatures(sigs, policy=policy, per_sample=per_sample, batch_size=len(sigs))


def test_registry_names():
    assert set(POLICIES.names()) == {"nearest-domain", "top-k", "soft", "uniform", "calibrated", "guarded"}
    with pytest.raises(InvalidInput, match="valid choices"):
        POLICIES.get("nearest")


@pytest.mark.parametrize("metric", ["l2", "l1", "cosine"])
def test_distances_match_scipy(metric):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, D)), rng.normal(size=(3, D))
    want = cdist(a, b, {"l2": "euclidean", "l1": "cityblock", "cosine": "cosine"}[metric])
    np.testing.assert_allclose(pairwise_distances(a, b, metric), want, rtol=1e-4, atol=1e-5)


def test_nearest_domain_picks_all_cards_of_the_nearest_domain():
    r = route(gate(), np.stack([NOISE + 0.1, SMOOTH - 0.1]), "nearest-domain")
    assert r.domains == ("gaussian", "augmix")
    np.testing.assert_allclose(r.weights, [[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5]])
    assert r.selected == ("g1", "a1", "g2", "a2") and r.cards_per_image == 2.0
    assert r.distances.shape == (2, 2) and r.distances[0, 0] < r.distances[0, 1]


def test_per_batch_routing_repeats_one_decision():
    r = route(gate(), (NOISE + 0.2)[None], "nearest-domain", per_sample=False)
    r5 = gate().route_signatures((NOISE + 0.2)[None], policy="nearest-domain", per_sample=False, batch_size=5)
    assert r5.weights.shape == (5, 4) and (r5.weights == r.weights[0]).all() and r5.selected == ("g1", "g2")


def test_top_k():
    r = route(gate(k=1), np.stack([SMOOTH]), "top-k")
    assert r.selected == ("a1",)
    r = route(gate(k=3), np.stack([SMOOTH]), "top-k")
    assert r.selected == ("g1", "a1", "a2") and np.isclose(r.weights.sum(), 1)


def test_soft_weights_prefer_the_near_domain_and_drop_far_ones():
    mid = 0.7 * NOISE + 0.3 * SMOOTH
    r = route(gate(temperature=1.0, min_weight=0.0), mid[None], "soft")
    w = r.weights[0]
    assert np.isclose(w.sum(), 1) and w[0] == w[2] > w[1] > 0
    r = route(gate(temperature=0.1, min_weight=0.1), mid[None], "soft")
    assert r.selected == ("g1", "g2")


def test_uniform_runs_every_card():
    r = route(gate(), np.stack([NOISE, SMOOTH]), "uniform")
    np.testing.assert_allclose(r.weights, 0.25)
    assert r.cards_per_image == 4


def test_calibrated_without_router_says_how_to_fit_one():
    with pytest.raises(InvalidInput, match="carddeck calibrate"):
        route(gate(), NOISE[None], "calibrated")


def test_to_dict_is_json_ready():
    import json

    d = route(gate(), NOISE[None], "nearest-domain", per_sample=False).to_dict()
    assert json.loads(json.dumps(d))["selected"] == ["g1", "g2"]


def test_bad_params_and_missing_signature():
    with pytest.raises(InvalidInput, match="metric"):
        GateParams(metric="chebyshev")
    with pytest.raises(InvalidInput, match="unknown gate parameter"):
        GateParams.from_dict({"kk": 2})
    with pytest.raises(InvalidInput, match="no reference signature"):
        Gate.from_cards([("x", "fog", None)])


def test_confidence_combine_lets_a_sure_card_outvote_a_guessing_one():
    from carddeck.gating.policies import combine_weights

    probs = np.array(
        [
            [[0.9, 0.05, 0.05], [0.34, 0.33, 0.33]],  # card 0: sure on image 0, unsure on image 1
            [[0.2, 0.45, 0.35], [0.05, 0.9, 0.05]],  # card 1: unsure on image 0, sure on image 1
            [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]],  # card 2: not routed
        ],
        np.float32,
    )
    routed = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]], np.float32)
    w = combine_weights(routed, probs, "confidence")
    assert w[0, 0] > w[0, 1] and w[1, 1] > w[1, 0] and (w[:, 2] == 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    assert combine_weights(routed, probs, "mean") is routed
    with pytest.raises(InvalidInput, match="combine 'vote' is not one of mean, confidence"):
        GateParams(combine="vote")


def test_route_many_of_one_image_requests_routes_each_as_if_alone():
    """The common case under load: a micro-batch of one-image requests (each its own row, no mean taken),
    clean and corrupted digits mixed, on the default deck's router: every request gets its solo routing,
    whatever its neighbours in the merge and whatever its place among them."""
    from carddeck.data import load_dataset
    from carddeck.data.corruptions import corrupt
    from carddeck.deck import Deck, default_deck_path
    from carddeck.gating.signature import sample_features

    deck = Deck.open(default_deck_path(), run_cards=False)
    clean = load_dataset("digits32", "test").images[:8]
    images = np.concatenate([clean[:3], corrupt(clean[3:5], "gaussian_noise", 5, seed=0), clean[5:6],
                             corrupt(clean[6:8], "fog", 5, seed=0)])  # fmt: skip
    xs = [deck.prepare(images[i : i + 1]) for i in range(len(images))]
    alone = [deck.gate.route(x) for x in xs]
    assert len({r.selected for r in alone}) > 1  # the requests really route differently
    for order in (range(len(xs)), range(len(xs) - 1, -1, -1)):
        order = list(order)
        merged = sample_features(np.concatenate([xs[i] for i in order]))
        many = deck.gate.route_many(merged, [1] * len(xs))
        for i, got in zip(order, many):
            np.testing.assert_allclose(got.weights, alone[i].weights, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got.distances, alone[i].distances, rtol=1e-6)
            assert got.selected == alone[i].selected and got.weights.shape == (1, len(deck.card_names))


def test_route_many_routes_each_request_as_if_alone():
    """One features call over merged requests of mixed sizes and kinds (the default deck's calibrated
    router, clean and corrupted digits), one policy call: every request gets exactly its solo routing."""
    from carddeck.data import load_dataset
    from carddeck.data.corruptions import corrupt
    from carddeck.deck import Deck, default_deck_path
    from carddeck.gating.signature import sample_features

    deck = Deck.open(default_deck_path(), run_cards=False)
    clean = load_dataset("digits32", "test").images[:24]
    requests = [
        clean[:1],
        corrupt(clean[1:4], "gaussian_noise", 5, seed=0),
        clean[4:6],
        corrupt(clean[6:11], "fog", 5, seed=0),
        corrupt(clean[11:12], "contrast", 5, seed=0),
        clean[12:24],
    ]
    xs = [deck.prepare(r) for r in requests]
    merged = sample_features(np.concatenate(xs))
    for policy in (deck.default_policy, "nearest-domain", "soft", "top-k", "uniform"):
        for per_sample in (False, True):
            many = deck.gate.route_many(merged, [len(x) for x in xs], policy=policy, per_sample=per_sample)
            selections = set()
            for x, got in zip(xs, many):
                alone = deck.gate.route(x, policy=policy, per_sample=per_sample)
                # BLAS may sum a row in another order in a taller matrix (never with other rows' values): a
                # few ulps in the features; the decision (which cards run) is exactly the same
                np.testing.assert_allclose(got.weights, alone.weights, rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(got.distances, alone.distances, rtol=1e-6)
                np.testing.assert_allclose(got.features, alone.features, rtol=1e-5, atol=1e-6)
                assert (got.policy, got.per_sample, got.selected) == (policy, per_sample, alone.selected)
                selections.add(got.selected)
            if policy == deck.default_policy and not per_sample:
                assert len(selections) > 1  # the requests really route differently: the check has teeth
