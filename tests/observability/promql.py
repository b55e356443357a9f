"""Run a real Prometheus against a live metrics endpoint and evaluate the shipped PromQL through its HTTP API."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "serve"
DASHBOARD = SERVE / "grafana" / "dashboards" / "carddeck.json"
PROMETHEUS_YML = SERVE / "prometheus" / "prometheus.yml"
ALERTS_YML = SERVE / "prometheus" / "alerts.yml"
RAY_PROMETHEUS_YML = SERVE / "ray" / "prometheus.yml"  # Ray's metrics export, the ray_ prefix stripped

# Grafana template variables -> what Prometheus evaluates in their place (all instances, all domains,
# and a rate window that spans the whole test).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".+", "$domain": ".+"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query target of every panel, template queries included."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"]
            metric = query.removeprefix("label_values(").split(",")[0]
            out.append((f"variable {var['name']}", metric))  # label_values(m, l) is Grafana's; m must exist
    return out


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS_YML.read_text())["groups"] for rule in group["rules"]]


def substitute(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen

    def api(self, path: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400 for a bad expression: return its error body
            return json.loads(exc.read())

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def wait_for(self, expr: str, timeout: float = 30.0) -> list:
        """Poll until ``expr`` returns at least one series; return the series."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.query(expr)
            result = answer.get("data", {}).get("result", [])
            if answer.get("status") == "success" and result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr!r} returned no series within {timeout}s: {answer}")
            time.sleep(0.25)


@contextlib.contextmanager
def running_prometheus(
    prometheus_bin: str,
    target: str,
    workdir: Path,
    *,
    labels: dict[str, str] | None = None,
    config_file: Path = PROMETHEUS_YML,
) -> Iterator[Prometheus]:
    """The shipped ``config_file`` (its scrape job and relabelling) and alerts.yml, scraping ``target`` every
    second, on a free port.

    ``labels``: added to every scraped series (as Kubernetes service discovery adds namespace and pod).
    """
    config = yaml.safe_load(config_file.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS_YML)]
    (job,) = config["scrape_configs"]
    job.pop("file_sd_configs", None)  # Ray's service discovery file: the target is given here instead
    job["static_configs"] = [{"targets": [target], **({"labels": labels} if labels else {})}]
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                output = (workdir / "prometheus.log").read_text()
                raise AssertionError(f"prometheus exited {process.returncode}: {output}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError("prometheus did not become ready in 30 s")
            time.sleep(0.2)
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def check_every_expression(
    prom: Prometheus, timeout: float = 20.0, quiet: frozenset[str] = frozenset()
) -> dict[str, int]:
    """Every dashboard and alert expression: valid, and at least one series. Returns series counts.

    Alerts named in ``quiet`` must only be valid: their condition cannot arise while the test runs.
    """
    exprs = [(f"panel {title!r}", substitute(e)) for title, e in dashboard_exprs()]
    exprs += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
    for name in quiet:
        answer = prom.query(next(r["expr"] for r in alert_rules() if r["alert"] == name))
        assert answer.get("status") == "success", f"alert {name}: invalid: {answer.get('error')}"
    exprs = [(where, expr) for where, expr in exprs if where.removeprefix("alert ") not in quiet]
    counts: dict[str, int] = {}
    problems = []
    deadline = time.monotonic() + timeout
    pending = list(exprs)
    while pending:
        still = []
        for where, expr in pending:
            answer = prom.query(expr)
            if answer.get("status") != "success":
                problems.append(f"{where}: invalid: {answer.get('error')} in {expr!r}")
            elif not answer["data"]["result"]:
                still.append((where, expr))
            else:
                counts[f"{where}: {expr}"] = len(answer["data"]["result"])
        pending = still
        if pending and time.monotonic() > deadline:
            problems += [f"{where}: no series for {expr!r}" for where, expr in pending]
            break
        if pending:
            time.sleep(0.5)
    assert not problems, "\n".join(problems)
    return counts
