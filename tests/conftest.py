"""Fixtures shared by the test packages: real decks and real server processes (:mod:`tests.servers`), and
Prometheus for every test that needs it (:mod:`tests.prometheus`, the one place it comes from)."""

import pytest

from tests import prometheus
from tests.servers import deck_path, server


@pytest.fixture(scope="session")
def prometheus_tools() -> dict[str, str]:
    """Paths of ``prometheus`` and ``promtool`` (PATH, else the project's cache, fetched on first use)."""
    try:
        return prometheus.prometheus_tools()
    except prometheus.Unavailable as exc:
        pytest.fail(str(exc))


__all__ = ["deck_path", "prometheus_tools", "server"]
