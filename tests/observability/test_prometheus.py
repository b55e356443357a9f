"""A real Prometheus scrapes a live server; every dashboard and alert expression must be valid and return series.

Also: promtool accepts the shipped rules and config, and promtool unit tests show the uncovered-shift
and expected-accuracy alerts fire on sustained trouble and stay quiet otherwise.
"""

from __future__ import annotations

import subprocess
import threading
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from carddeck.observability.metrics import start_metrics_server
from tests.observability.deck_traffic import announce_deck, build_deck, serve_batch
from tests.observability.promql import (
    ALERTS_YML,
    PROMETHEUS_YML,
    RAY_PROMETHEUS_YML,
    alert_rules,
    check_every_expression,
    dashboard_exprs,
    running_prometheus,
)
from tests.observability.tiny_server import SERVICE, start_tiny_server

pytestmark = pytest.mark.integration


def test_promtool_accepts_rules_and_config(prometheus_tools):
    configs = (["check", "config", str(PROMETHEUS_YML)], ["check", "config", str(RAY_PROMETHEUS_YML)])
    for args in (["check", "rules", str(ALERTS_YML)], *configs):
        result = subprocess.run([prometheus_tools["promtool"], *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def promtool_test(promtool: str, tmp_path, series: list[dict], alert: str, exp: list[dict]) -> None:
    """promtool unit test: ``alert`` fires for exactly ``exp`` at 30 min and for nobody at 8 min (for: 10m)."""
    unit_test = {
        "rule_files": [str(ALERTS_YML)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "8m", "alertname": alert, "exp_alerts": []},
                    {"eval_time": "30m", "alertname": alert, "exp_alerts": exp},
                ],
            }
        ],
    }
    path = tmp_path / f"{alert}_test.yml"
    path.write_text(yaml.safe_dump(unit_test))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def fired(alert: str, model: str, value: str) -> list[dict]:
    """The alert promtool must see firing for ``model`` on instance "i", annotations filled in."""
    (rule,) = [r for r in alert_rules() if r["alert"] == alert]
    annotations = {
        k: v.replace("{{ $labels.instance }}", "i")
        .replace("{{ $labels.model }}", model)
        .replace("{{ $value | humanizePercentage }}", value)
        for k, v in rule["annotations"].items()
    }
    labels = {"severity": "warning", "job": "carddeck", "instance": "i", "model": model}
    return [{"exp_labels": labels, "exp_annotations": annotations}]


def test_uncovered_shift_alert_fires_only_on_sustained_uncovered_traffic(prometheus_tools, tmp_path):
    # 10 tested batches a minute per model. "a": 6/min uncovered (60%); "b": 1/min (10%, under the
    # 20% line); "c": 6/min covered (a shift the deck handles: no alert).
    series = []
    for model, state, n in (("a", "uncovered", 6), ("b", "uncovered", 1), ("c", "covered", 6)):
        labels = f'job="carddeck", instance="i", model="{model}", unit="batch"'
        series.append({"series": f'carddeck_shift_batches_total{{{labels}, state="in_distribution"}}',
                       "values": f"0+{10 - n}x40"})  # fmt: skip
        series.append({"series": f'carddeck_shift_batches_total{{{labels}, state="{state}"}}', "values": f"0+{n}x40"})
    promtool_test(
        prometheus_tools["promtool"],
        tmp_path,
        series,
        "CarddeckUncoveredShift",
        fired("CarddeckUncoveredShift", "a", "60%"),
    )


def test_expected_accuracy_alert_fires_only_when_the_estimate_stays_low(prometheus_tools, tmp_path):
    # "a" drops to 0.6 and stays there; "b" stays at 0.98; "c" dips to 0.85 for 3 minutes only
    # (the 10-minute average, 0.94, stays above the line).
    labels = 'job="carddeck", instance="i"'
    series = [
        {"series": f'carddeck_expected_accuracy{{{labels}, model="a"}}', "values": "0.98 0.6x40"},
        {"series": f'carddeck_expected_accuracy{{{labels}, model="b"}}', "values": "0.98x40"},
        {"series": f'carddeck_expected_accuracy{{{labels}, model="c"}}', "values": "0.98x10 0.85x3 0.98x27"},
    ]
    promtool_test(
        prometheus_tools["promtool"],
        tmp_path,
        series,
        "CarddeckExpectedAccuracyLow",
        fired("CarddeckExpectedAccuracyLow", "a", "60%"),
    )


def test_store_stale_alert_fires_only_while_polls_keep_failing(prometheus_tools, tmp_path):
    # "a": last in sync at 0, polls failing ever since; "b": in sync every minute; "c": never polls
    # (--poll-interval-s 0), so its last sync stays at start without a single failed poll.
    series = []
    for instance, synced, errors in (("a", "0x40", "0+12x40"), ("b", "0+60x40", "0x40"), ("c", "0x40", "0x40")):
        labels = f'job="carddeck", instance="{instance}"'
        series.append({"series": f"carddeck_store_last_sync_timestamp_seconds{{{labels}}}", "values": synced})
        series.append({"series": f"carddeck_store_poll_errors_total{{{labels}}}", "values": errors})
    (rule,) = [r for r in alert_rules() if r["alert"] == "CarddeckStoreStale"]
    annotations = {k: v.replace("{{ $labels.instance }}", "a") for k, v in rule["annotations"].items()}
    exp = [{"exp_labels": {"severity": "warning", "job": "carddeck", "instance": "a"}, "exp_annotations": annotations}]
    promtool_test(prometheus_tools["promtool"], tmp_path, series, "CarddeckStoreStale", exp)


def test_dashboard_has_the_required_panels():
    exprs = " ".join(e for _, e in dashboard_exprs())
    for metric in (
        "carddeck_gate_weight_total",  # routing share per CARD
        "carddeck_domain_distance_bucket",  # distance heatmap
        "carddeck_shift_batches_total",  # the three states
        "carddeck_expected_accuracy",
        "carddeck_shift_statistic_bucket",
        "carddeck_requests_total",
        "carddeck_request_duration_seconds_bucket",
        "carddeck_card_duration_seconds_bucket",
        "carddeck_batch_size_bucket",
        "carddeck_deck_cards",
        "carddeck_card_changes_total",
        "carddeck_store_last_sync_timestamp_seconds",
        "carddeck_store_up",
    ):
        assert metric in exprs, metric


def test_every_dashboard_and_alert_expression_on_a_live_server(prometheus_tools, tmp_path):
    rig = build_deck(tmp_path / "deck")
    tiny = start_tiny_server()
    metrics = tiny.metrics
    endpoint = start_metrics_server(metrics, "127.0.0.1", 0)
    shift = announce_deck(metrics, rig.deck)
    channel = grpc.insecure_channel(tiny.target)
    health = health_pb2_grpc.HealthStub(channel)
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            health.Check(health_pb2.HealthCheckRequest())
            with pytest.raises(grpc.RpcError):
                channel.unary_unary(f"/{SERVICE}/Abort")(b"")
            # One in-domain batch to three shifted ones, and a per-sample batch now and then.
            start = 16 * (i % 20)
            serve_batch(metrics, rig.deck, rig.clean[start : start + 16], shift=shift)
            for _ in range(3):
                serve_batch(metrics, rig.deck, rig.shifted[start : start + 16], shift=shift)
            if i % 5 == 0:
                serve_batch(metrics, rig.deck, rig.clean[:8], per_sample=True)
                serve_batch(metrics, rig.deck, rig.clean[:8], policy="uniform")  # every card gets a share
            metrics.card_change("add", "ok")
            metrics.set_store(False, time.time() - 600, True)  # a store outage: CarddeckStoreStale's series
            metrics.set_queue_depth(i % 3)
            i += 1
            stop.wait(0.2)

    worker = threading.Thread(target=traffic, daemon=True)
    try:
        with running_prometheus(prometheus_tools["prometheus"], f"127.0.0.1:{endpoint.port}", tmp_path) as prom:
            worker.start()
            prom.wait_for('up{job="carddeck"} == 1')
            counts = check_every_expression(prom, timeout=30)
            # Both alerts are evaluated by Prometheus itself, from the shipped rule file: 75% of the
            # batches are far from everything the detector knows, and the tiny cards are random.
            deadline = time.monotonic() + 30
            while True:
                alerts = {a["labels"]["alertname"] for a in prom.api("alerts")["data"]["alerts"]}
                if alerts >= {"CarddeckUncoveredShift", "CarddeckExpectedAccuracyLow"}:
                    break
                assert time.monotonic() < deadline, f"alerts never became pending: {alerts}"
                time.sleep(0.5)
    finally:
        stop.set()
        worker.join(timeout=10)
        channel.close()
        endpoint.stop()
        tiny.stop()
    # One series per card in the routing share, one per domain in the distance quantiles.
    share = [n for k, n in counts.items() if "Routing share" in k]
    assert share == [3], counts
