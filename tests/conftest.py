"""Fixtures shared by the test packages: real decks and real server processes (:mod:`tests.servers`), and
Prometheus for every test that needs it (:mod:`tests.prometheus`, the one place it comes from)."""

import pytest

from tests import prometheus
from tests.servers import ServerProcess, deck_path, server, settled


@pytest.fixture(autouse=True)
def _settled_server(request: pytest.FixtureRequest) -> None:
    """A module's shared live server (``server``) starts each test on a settled deck: the shift detector refit a
    start or an earlier test's card change set off is stored and served, so versions a test reads stay put."""
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        if isinstance(getattr(srv, "process", srv), ServerProcess):
            settled(srv)


@pytest.fixture(scope="session")
def prometheus_tools() -> dict[str, str]:
    """Paths of ``prometheus`` and ``promtool`` (PATH, else the project's cache, fetched on first use)."""
    try:
        return prometheus.prometheus_tools()
    except prometheus.Unavailable as exc:
        pytest.fail(str(exc))


__all__ = ["deck_path", "prometheus_tools", "server"]
