"""Prometheus comes to every test from one place (tests/prometheus.py), and a fresh machine gets it there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests import prometheus

TESTS = Path(__file__).resolve().parent


def test_no_test_looks_for_prometheus_on_its_own():
    """Every user of a Prometheus binary takes the session fixture (a test that looked on PATH itself ran
    before the fixture that fetched it, and failed on a fresh machine)."""
    for path in TESTS.rglob("*.py"):
        if path.name in ("prometheus.py", "conftest.py", Path(__file__).name):
            continue
        text = path.read_text()
        assert not re.search(r"which\(\s*[\"'](prometheus|promtool)", text), path
        if "running_prometheus(" in text and "def running_prometheus" not in text:
            assert "prometheus_tools" in text, f"{path} runs Prometheus without the prometheus_tools fixture"


@pytest.mark.integration
def test_an_empty_cache_is_filled_with_working_tools(tmp_path, monkeypatch):
    monkeypatch.setenv("CARDDECK_TEST_TOOLS", str(tmp_path / "tools"))
    monkeypatch.setenv("CARDDECK_TEST_PROMETHEUS", "cache")  # as CI: whatever is on PATH is not used
    try:
        tools = prometheus.prometheus_tools()
    except prometheus.Unavailable as exc:
        pytest.fail(str(exc))
    assert set(tools) == {"prometheus", "promtool"}
    for tool, path in tools.items():
        assert Path(path).is_relative_to(tmp_path / "tools"), path
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        assert version.returncode == 0 and version.stdout.startswith(tool), version
    assert prometheus.prometheus_tools() == tools  # the second call uses the cache
