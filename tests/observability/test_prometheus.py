"""A real Prometheus scrapes a live server; every dashboard and alert expression must be valid and return series.

Also: promtool accepts the shipped rules and config, and a promtool unit test shows the
distribution-shift alert fires on sustained out-of-domain traffic and stays quiet otherwise.
"""

from __future__ import annotations

import subprocess
import threading
import time

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from carddeck.server.metrics import start_metrics_server
from tests.observability.deck_traffic import announce_deck, build_deck, serve_batch
from tests.observability.promql import (
    ALERTS_YML,
    PROMETHEUS_YML,
    alert_rules,
    check_every_expression,
    dashboard_exprs,
    running_prometheus,
)
from tests.observability.tiny_server import SERVICE, start_tiny_server

pytestmark = pytest.mark.integration


def test_promtool_accepts_rules_and_config(prometheus_tools):
    for args in (["check", "rules", str(ALERTS_YML)], ["check", "config", str(PROMETHEUS_YML)]):
        result = subprocess.run([prometheus_tools["promtool"], *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_shift_alert_fires_only_on_sustained_out_of_domain_traffic(prometheus_tools, tmp_path):
    # 10 decisions a minute on two instances; out of domain 6/min (60%) on "a", 1/min (10%) on "b".
    (rule,) = alert_rules()
    annotations = {
        k: v.replace("{{ $labels.instance }}", "a").replace("{{ $value | humanizePercentage }}", "60%")
        for k, v in rule["annotations"].items()
    }
    series = []
    for instance, far in (("a", 6), ("b", 1)):
        labels = f'job="carddeck", instance="{instance}"'
        series.append({"series": f'carddeck_gate_decisions_total{{{labels}, policy="nearest-domain", mode="batch"}}',
                       "values": "0+10x40"})  # fmt: skip
        series.append({"series": f'carddeck_out_of_domain_total{{{labels}, mode="batch"}}', "values": f"0+{far}x40"})
    unit_test = {
        "rule_files": [str(ALERTS_YML)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "CarddeckDistributionShift", "exp_alerts": []},  # not yet 15m
                    {
                        "eval_time": "30m",
                        "alertname": "CarddeckDistributionShift",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "job": "carddeck", "instance": "a"},
                                "exp_annotations": annotations,
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(unit_test))
    result = subprocess.run([prometheus_tools["promtool"], "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_has_the_required_panels():
    exprs = " ".join(e for _, e in dashboard_exprs())
    for metric in (
        "carddeck_gate_weight_total",  # routing share per CARD
        "carddeck_domain_distance_bucket",  # distance heatmap
        "carddeck_out_of_domain_total",
        "carddeck_requests_total",
        "carddeck_request_duration_seconds_bucket",
        "carddeck_card_duration_seconds_bucket",
        "carddeck_batch_size_bucket",
        "carddeck_deck_cards",
        "carddeck_card_changes_total",
    ):
        assert metric in exprs, metric


def test_every_dashboard_and_alert_expression_on_a_live_server(prometheus_tools, tmp_path):
    rig = build_deck(tmp_path / "deck")
    tiny = start_tiny_server()
    metrics = tiny.metrics
    endpoint = start_metrics_server(metrics, "127.0.0.1", 0)
    announce_deck(metrics, rig.deck)
    assert metrics.shift is not None, "the deck holds calibration images: thresholds must be calibrated"
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
            serve_batch(metrics, rig.deck, rig.clean[start : start + 16])
            for _ in range(3):
                serve_batch(metrics, rig.deck, rig.shifted[start : start + 16])
            if i % 5 == 0:
                serve_batch(metrics, rig.deck, rig.clean[:8], per_sample=True)
                serve_batch(metrics, rig.deck, rig.clean[:8], policy="uniform")  # every card gets a share
            metrics.card_change("add", "ok")
            metrics.set_queue_depth(i % 3)
            i += 1
            stop.wait(0.2)

    worker = threading.Thread(target=traffic, daemon=True)
    try:
        with running_prometheus(prometheus_tools["prometheus"], f"127.0.0.1:{endpoint.port}", tmp_path) as prom:
            worker.start()
            prom.wait_for('up{job="carddeck"} == 1')
            counts = check_every_expression(prom, timeout=30)
            # The shift alert is evaluated by Prometheus itself, from the shipped rule file.
            deadline = time.monotonic() + 20
            while True:
                alerts = prom.api("alerts")["data"]["alerts"]
                if any(a["labels"]["alertname"] == "CarddeckDistributionShift" for a in alerts):
                    break
                assert time.monotonic() < deadline, f"shift alert never became pending: {alerts}"
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
