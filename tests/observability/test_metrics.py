"""Metrics: exact values on a live /metrics endpoint after known calls, with a real gate's routing."""

from __future__ import annotations

import re

import numpy as np
import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from carddeck.gating import Gate, batch_signature, sample_signatures
from carddeck.gating.shift import Verdict
from carddeck.observability.metrics import Metrics, start_metrics_server
from tests.cards import tiny_meta
from tests.observability.scrape import scrape, scrape_text, value


@pytest.fixture
def live():
    metrics = Metrics(CollectorRegistry())
    endpoint = start_metrics_server(metrics, "127.0.0.1", 0)
    yield metrics, endpoint
    endpoint.stop()


def images(seed: int, n: int, noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.repeat(np.linspace(0, 255, 32)[None, None, :, None], 32, axis=1)  # smooth ramps
    x = base * rng.uniform(0.5, 1.0, (n, 1, 1, 1)) + rng.normal(0, noise, (n, 32, 32, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def deck_gate() -> tuple[Gate, list]:
    """Two domains: 'clean' (smooth images) and 'gaussian' (heavily noised), three cards."""
    clean_sig = tuple(float(v) for v in batch_signature(images(0, 64)))
    noisy_sig = tuple(float(v) for v in batch_signature(images(1, 64, noise=60)))
    metas = [
        tiny_meta("clean-a", domain="clean", signature=clean_sig),
        tiny_meta("clean-b", domain="clean", signature=clean_sig),
        tiny_meta("noise-a", domain="gaussian", signature=noisy_sig),
    ]
    gate = Gate.from_cards([(m.name, m.domain, m.signature) for m in metas])
    return gate, metas


def test_every_metric_is_named_and_labelled_by_convention(live):
    metrics, endpoint = live
    text = scrape_text(endpoint.port)
    families = set(re.findall(r"^# TYPE (\S+) (\S+)", text, flags=re.M))
    names = {n for n, _ in families}
    for name, kind in families:
        assert name.startswith("carddeck_"), name
        if kind == "counter":
            assert name.endswith("_total"), name
    for expected in (
        "carddeck_requests_total",
        "carddeck_request_duration_seconds",
        "carddeck_requests_in_flight",
        "carddeck_card_duration_seconds",
        "carddeck_batch_size",
        "carddeck_queue_depth",
        "carddeck_images_in_flight",
        "carddeck_queue_wait_seconds",
        "carddeck_gate_decisions_total",
        "carddeck_gate_selections_total",
        "carddeck_gate_images_total",
        "carddeck_gate_weight_total",
        "carddeck_domain_distance",
        "carddeck_nearest_domain_distance",
        "carddeck_shift_false_alarm_rate",
        "carddeck_deck_version",
        "carddeck_deck_cards",
        "carddeck_card_changes_total",
        "carddeck_store_up",
        "carddeck_store_last_sync_timestamp_seconds",
        "carddeck_store_poll_errors_total",
        "carddeck_build_info",
    ):
        assert expected in names, expected
    labels = {label for m in metrics.registry.collect() for s in m.samples for label in s.labels}
    assert not labels & {"request_id", "peer", "client", "address", "id"}
    # Injected registry only: nothing leaks into the process-wide default registry.
    assert not [m.name for m in REGISTRY.collect() if m.name.startswith("carddeck")]


def test_request_batch_card_and_deck_values(live):
    metrics, endpoint = live
    for seconds in (0.0005, 0.003, 0.003, 2.0):
        metrics.observe_rpc("inference.GRPCInferenceService", "ModelInfer", "OK", seconds)
    metrics.observe_rpc("inference.GRPCInferenceService", "ModelInfer", "INVALID_ARGUMENT", 0.001)
    for size, waits in ((3, [0.001, 0.002, 0.0001]), (32, [0.004]), (1, 0.5)):
        metrics.observe_batch(size, waits)
    metrics.set_queue_depth(7)
    metrics.observe_card("clean-a", 0.004)
    metrics.observe_card("clean-a", 0.006)
    metrics.set_deck(5, deck_gate()[1])
    metrics.card_change("add", "ok")
    metrics.card_change("add", "ok")
    metrics.card_change("add", "rejected")
    metrics.card_change("remove", "not_found")
    with metrics.in_flight("carddeck.v1.Deck", "Predict"):
        inside = scrape(endpoint.port)
    s = scrape(endpoint.port)
    svc, rpc = "inference.GRPCInferenceService", "ModelInfer"
    assert value(s, "carddeck_requests_total", service=svc, rpc=rpc, code="OK") == 4
    assert value(s, "carddeck_requests_total", service=svc, rpc=rpc, code="INVALID_ARGUMENT") == 1
    bucket = "carddeck_request_duration_seconds_bucket"
    assert value(s, bucket, service=svc, rpc=rpc, le="0.001") == 2
    assert value(s, bucket, service=svc, rpc=rpc, le="0.005") == 4
    assert value(s, bucket, service=svc, rpc=rpc, le="2.5") == 5
    assert value(s, "carddeck_request_duration_seconds_sum", service=svc, rpc=rpc) == pytest.approx(2.0075)
    assert value(s, "carddeck_batch_size_count") == 3
    assert value(s, "carddeck_batch_size_sum") == 36
    assert value(s, "carddeck_batch_size_bucket", le="4.0") == 2
    assert value(s, "carddeck_queue_wait_seconds_count") == 5
    assert value(s, "carddeck_queue_wait_seconds_bucket", le="0.0001") == 1
    assert value(s, "carddeck_queue_depth") == 7
    assert value(s, "carddeck_card_duration_seconds_count", card="clean-a") == 2
    assert value(s, "carddeck_card_duration_seconds_sum", card="clean-a") == pytest.approx(0.01)
    assert value(s, "carddeck_deck_version") == 5
    assert value(s, "carddeck_deck_cards") == 3
    assert value(s, "carddeck_card_changes_total", op="add", outcome="ok") == 2
    assert value(s, "carddeck_card_changes_total", op="add", outcome="rejected") == 1
    assert value(s, "carddeck_card_changes_total", op="remove", outcome="not_found") == 1
    assert value(inside, "carddeck_requests_in_flight", service="carddeck.v1.Deck", rpc="Predict") == 1
    assert value(s, "carddeck_requests_in_flight", service="carddeck.v1.Deck", rpc="Predict") == 0
    info = [k for k in s if k[0] == "carddeck_build_info"]
    assert len(info) == 1 and dict(info[0][1])["version"] and s[info[0]] == 1


def test_routing_per_batch_exact_counts(live):
    metrics, endpoint = live
    gate, metas = deck_gate()
    metrics.set_deck(1, metas)
    clean = images(10, 16)
    noisy = images(11, 16, noise=60)
    shifted = images(12, 16) // 8  # nearly black: far from both domains
    dist = {name: gate.route(x).distances[0] for name, x in (("clean", clean), ("noisy", noisy), ("shifted", shifted))}

    for _ in range(3):
        metrics.observe_routing(gate.route(clean, policy="nearest-domain"))
    metrics.observe_routing(gate.route(noisy, policy="nearest-domain"))
    metrics.observe_routing(gate.route(shifted, policy="uniform"))
    s = scrape(endpoint.port)
    assert value(s, "carddeck_gate_decisions_total", policy="nearest-domain", mode="batch") == 4
    assert value(s, "carddeck_gate_decisions_total", policy="uniform", mode="batch") == 1
    # nearest-domain on a clean batch runs both clean cards with weight 1/2 on each of 16 images.
    assert value(s, "carddeck_gate_selections_total", card="clean-a", domain="clean") == 3 + 1
    assert value(s, "carddeck_gate_selections_total", card="noise-a", domain="gaussian") == 1 + 1
    assert value(s, "carddeck_gate_images_total", card="clean-b", domain="clean") == 3 * 16 + 16
    assert value(s, "carddeck_gate_images_total", card="noise-a", domain="gaussian") == 16 + 16
    assert value(s, "carddeck_gate_weight_total", card="clean-a", domain="clean") == pytest.approx(3 * 8 + 16 / 3)
    assert value(s, "carddeck_gate_weight_total", card="noise-a", domain="gaussian") == pytest.approx(16 + 16 / 3)
    total_weight = sum(v for (n, _), v in s.items() if n == "carddeck_gate_weight_total")
    assert total_weight == pytest.approx(5 * 16)  # shares sum to the images routed
    # One distance observation per domain per batch, and the nearest one per batch.
    assert value(s, "carddeck_domain_distance_count", domain="clean") == 5
    assert value(s, "carddeck_domain_distance_count", domain="gaussian") == 5
    assert value(s, "carddeck_nearest_domain_distance_count") == 5
    nearest_sum = 3 * dist["clean"].min() + dist["noisy"].min() + dist["shifted"].min()
    assert value(s, "carddeck_nearest_domain_distance_sum") == pytest.approx(nearest_sum, rel=1e-5)


def test_routing_per_sample_counts_images(live):
    metrics, endpoint = live
    gate, metas = deck_gate()
    metrics.set_deck(1, metas)
    batch = np.concatenate([images(20, 5), images(21, 3, noise=60)])
    routing = gate.route(batch, per_sample=True)
    metrics.observe_routing(routing)
    s = scrape(endpoint.port)
    assert value(s, "carddeck_gate_decisions_total", policy="nearest-domain", mode="sample") == 8
    ran = routing.weights > 0
    for k, card in enumerate(routing.card_names):
        domain = metas[k].domain
        assert value(s, "carddeck_gate_images_total", card=card, domain=domain) == ran[:, k].sum()
        assert value(s, "carddeck_gate_selections_total", card=card, domain=domain) == ran[:, k].sum()
    assert value(s, "carddeck_domain_distance_count", domain="clean") == 8
    # Per-sample distances are single-image signatures (a batch of one).
    assert np.allclose(routing.distances, gate.route_signatures(
        sample_signatures(batch), per_sample=True, batch_size=8).distances)  # fmt: skip


def test_cards_the_deck_did_not_announce_are_labelled_unknown(live):
    metrics, endpoint = live
    gate, _ = deck_gate()
    metrics.observe_routing(gate.route(images(30, 4)))
    s = scrape(endpoint.port)
    assert value(s, "carddeck_nearest_domain_distance_count") == 1
    assert value(s, "carddeck_gate_images_total", card="clean-a", domain="unknown") == 4


def test_shift_verdicts_count_per_model_state_and_unit(live):
    metrics, endpoint = live
    metrics.observe_shift("m", "batch", Verdict("covered", 3.0, 0.5, "fog/1", 0.97, 16))
    metrics.observe_shift("m", "batch", Verdict("uncovered", 400.0, 50.0, "fog/5", 0.41, 16))
    metrics.observe_shift("m", "window", Verdict("in_distribution", 0.2, float("inf"), "", 0.99, 32))
    s = scrape(endpoint.port)
    assert value(s, "carddeck_shift_batches_total", model="m", state="covered", unit="batch") == 1
    assert value(s, "carddeck_shift_batches_total", model="m", state="uncovered", unit="batch") == 1
    # Every state exists from a model's first test on, so rate() starts at 0 rather than missing.
    assert value(s, "carddeck_shift_batches_total", model="m", state="in_distribution", unit="batch") == 0
    assert value(s, "carddeck_shift_batches_total", model="m", state="in_distribution", unit="window") == 1
    assert value(s, "carddeck_shift_statistic_sum", model="m", unit="batch") == pytest.approx(403.0)
    assert value(s, "carddeck_shift_distance_count", model="m", unit="window") == 0  # no known condition: skipped
    assert value(s, "carddeck_expected_accuracy", model="m") == pytest.approx(0.99)  # the latest test


def test_an_unknown_expected_accuracy_is_exported_as_zero(live):
    """A NaN sample would make avg_over_time (and CarddeckExpectedAccuracyLow) NaN for the whole window; no
    sample would hide the drop. Unknown is what the deck can vouch for: 0."""
    metrics, endpoint = live
    metrics.observe_shift("u", "batch", Verdict("covered", 3.0, 0.5, "fog/1", 0.9, 16))
    assert value(scrape(endpoint.port), "carddeck_expected_accuracy", model="u") == pytest.approx(0.9)
    metrics.observe_shift("u", "batch", Verdict("uncovered", 400.0, 50.0, "", float("nan"), 16, "unknown"))
    assert scrape(endpoint.port)[("carddeck_expected_accuracy", frozenset({("model", "u")}))] == 0.0


def test_bad_routing_shape_is_rejected():
    metrics = Metrics(CollectorRegistry())
    gate, _ = deck_gate()
    routing = gate.route(images(40, 2))
    broken = type(routing)(routing.policy, False, routing.card_names[:2], routing.weights, routing.domains,
                           routing.distances)  # fmt: skip
    with pytest.raises(ValueError, match=r"weights must be \[N, 2\]"):
        metrics.observe_routing(broken)


def test_two_servers_in_one_process_do_not_share_metrics():
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.card_change("add", "ok")
    ea, eb = start_metrics_server(a, "127.0.0.1", 0), start_metrics_server(b, "127.0.0.1", 0)
    try:
        assert value(scrape(ea.port), "carddeck_card_changes_total", op="add", outcome="ok") == 1
        assert value(scrape(eb.port), "carddeck_card_changes_total", op="add", outcome="ok") == 0
    finally:
        ea.stop()
        eb.stop()
