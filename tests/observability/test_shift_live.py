"""The shift signal live: the real ``carddeck serve`` on the default deck, fed clean traffic, then
foreign traffic (leaves32, batches and single-image requests), then a shift the deck covers, then a
harmful one, while a real Prometheus scrapes it and evaluates the shipped alert expressions."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from carddeck.client.api import CardDeckClient
from carddeck.data.corruptions import corrupt
from carddeck.data.datasets import load_dataset
from tests.observability.promql import alert_rules, running_prometheus
from tests.observability.scrape import scrape, value
from tests.observability.test_live_server import Live, launch, stop

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BATCH = 16
MODEL = "carddeck"  # the gated deck's model name (settings.deck_model_name)


def states(port: int, unit: str = "batch") -> tuple[float, float, float]:
    s = scrape(port)
    return tuple(  # type: ignore[return-value]
        value(s, "carddeck_shift_batches_total", model=MODEL, state=st, unit=unit)
        for st in ("in_distribution", "covered", "uncovered")
    )


def test_live_server_counts_states_and_prometheus_evaluates_the_alerts(tmp_path, prometheus_tools):
    test = load_dataset("digits32", "test").images[: 8 * BATCH]
    leaves = load_dataset("leaves32", "test").images[: 8 * BATCH + 40]
    noisy = corrupt(test, "gaussian_noise", 5, seed=0)
    fog = corrupt(test, "fog", 5, seed=0)
    rules = {r["alert"]: r["expr"] for r in alert_rules()}
    proc, log_path, address, metrics_port = launch(ROOT / "models", tmp_path)
    live = Live(proc, log_path, address, metrics_port, test, leaves)
    try:
        with (
            running_prometheus(prometheus_tools["prometheus"], f"127.0.0.1:{metrics_port}", tmp_path) as prom,
            CardDeckClient(address, timeout=30) as client,
        ):
            prom.wait_for('up{job="carddeck"} == 1')

            def send(images: np.ndarray) -> None:
                for i in range(0, len(images), BATCH):
                    client.predict(images[i : i + BATCH])

            def gauge() -> float:
                (series,) = prom.wait_for(f'carddeck_expected_accuracy{{model="{MODEL}"}}')
                return float(series["value"][1])

            def settle(expected: tuple[float, float, float]) -> None:
                """Prometheus has scraped the counts the server shows."""
                prom.wait_for(f'sum(carddeck_shift_batches_total{{model="{MODEL}", unit="batch"}}) == {sum(expected)}')

            send(test[:BATCH])  # clean: every batch in-distribution
            settle((1, 0, 0))  # Prometheus knows the series before they grow, so rate() sees every batch
            send(test[BATCH:])
            assert states(metrics_port) == (8, 0, 0), log_path.read_text()[-2000:]
            settle((8, 0, 0))
            clean_estimate = gauge()
            assert clean_estimate > 0.95
            for name, expr in rules.items():  # quiet on clean traffic
                answer = prom.query(expr)
                assert answer["status"] == "success" and answer["data"]["result"] == [], (name, answer)

            send(leaves[: 8 * BATCH])  # another world: uncovered
            assert states(metrics_port) == (8, 0, 8)
            for image in leaves[8 * BATCH :]:  # 40 single-image requests: windows at 32 and 40
                client.predict(image[None])
            assert states(metrics_port, "window") == (0, 0, 2)
            settle((8, 0, 8))
            (share,) = prom.wait_for(rules["CarddeckUncoveredShift"])  # half the batches: over the 20% line
            assert share["metric"]["model"] == MODEL and 0.3 < float(share["value"][1]) < 0.7, share

            send(noisy)  # gaussian noise at severity 5: the deck's gaussian cards cover it
            assert states(metrics_port) == (8, 8, 8)
            settle((8, 8, 8))
            assert gauge() > 0.95  # and it stays accurate there

            deadline = time.monotonic() + 90
            while True:
                send(fog[: 4 * BATCH])  # harmful: the estimate falls and stays down
                if prom.query(rules["CarddeckExpectedAccuracyLow"])["data"]["result"]:
                    break
                assert time.monotonic() < deadline, "expected-accuracy alert expression never true on fog/5"
            prom.wait_for(f'carddeck_expected_accuracy{{model="{MODEL}"}} < 0.75')
            fog_estimate = gauge()
            assert fog_estimate < 0.75 < clean_estimate, (clean_estimate, fog_estimate)
            in_dist, covered, uncovered = states(metrics_port)
            assert (in_dist, covered) == (8, 8) and uncovered > 8  # every fog batch uncovered
    finally:
        stop(live)
