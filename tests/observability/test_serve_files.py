"""The shipped serve/ files fit together: dashboard, alert rules, provisioning, compose and Dockerfile.

Static checks (no Grafana or Docker here): every metric the PromQL names is one Metrics defines,
the dashboard is importable by Grafana (uid, schemaVersion, a datasource variable every panel uses),
and every path the compose file mounts or the Dockerfile copies exists.
"""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client import CollectorRegistry

from carddeck.gating.shift import Verdict
from carddeck.observability.metrics import Metrics
from tests.observability.promql import ALERTS_YML, DASHBOARD, PROMETHEUS_YML, ROOT, SERVE, alert_rules, dashboard_exprs

METRIC = re.compile(r"\bcarddeck_[a-z0-9_]+")


def defined_samples() -> set[str]:
    metrics = Metrics(CollectorRegistry())
    metrics.observe_rpc("s", "r", "OK", 0.1)  # labelled families only show samples once used
    metrics.observe_card("c", 0.1)
    metrics.card_change("add", "ok")
    metrics.domain_distance.labels(domain="d").observe(1.0)
    metrics.gate_decisions.labels(policy="p", mode="batch").inc()
    for counter in (metrics.gate_selections, metrics.gate_images, metrics.gate_weight):
        counter.labels(card="c", domain="d").inc()
    metrics.in_flight_requests.labels(service="s", rpc="r")
    metrics.observe_shift("m", "batch", Verdict("covered", 3.0, 0.5, "fog/1", 0.97, 16))
    return {s.name for family in metrics.registry.collect() for s in family.samples}


def test_every_promql_metric_is_defined():
    defined = defined_samples()
    used = {m for _, expr in dashboard_exprs() for m in METRIC.findall(expr)}
    used |= {m for rule in alert_rules() for m in METRIC.findall(rule["expr"])}
    assert used and used <= defined, sorted(used - defined)


def test_dashboard_is_importable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "carddeck-overview" and dash["schemaVersion"] >= 36 and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS"]["type"] == "datasource" and variables["DS"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS}" and target["expr"].strip()
    for name in ("instance", "domain"):
        assert variables[name]["datasource"]["uid"] == "${DS}"


def test_provisioning_matches_compose():
    compose = yaml.safe_load((SERVE / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"carddeck", "prometheus", "grafana"}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (SERVE / source).exists(), f"{name} mounts missing {source}"
    build = services["carddeck"]["build"]
    assert (SERVE / build["context"] / build["dockerfile"]).is_file()
    datasource = yaml.safe_load((SERVE / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (ds,) = datasource["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((SERVE / "grafana/provisioning/dashboards/carddeck.yaml").read_text())
    dashboards_mount = next(v for v in services["grafana"]["volumes"] if v.startswith("./grafana/dashboards:"))
    assert provider["providers"][0]["options"]["path"] == dashboards_mount.split(":")[1]
    # Prometheus scrapes the compose service on the server's metrics port.
    prometheus = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["carddeck:8002"] and "8002:8002" in services["carddeck"]["ports"]
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert {f"/etc/prometheus/{r}" for r in prometheus["rule_files"]} <= mounted
    assert ALERTS_YML.name in prometheus["rule_files"]


def test_dockerfile_copies_what_exists():
    text = (SERVE / "Dockerfile").read_text()
    sources = [s for line in re.findall(r"^COPY (.+)$", text, flags=re.M) for s in line.split()[:-1]]
    assert sources
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"serve/Dockerfile copies {missing}, absent from the repository"
