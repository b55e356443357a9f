"""Test set-up for observability: Debian's prometheus (prometheus + promtool) must be on PATH.

When it is absent and we are root (CI), the session installs it with apt-get; when that is
impossible or fails, the tests that need it FAIL with the reason: a missing tool must not turn
into a silently skipped check. Debian's package may start its own service on :9090; the tests
never use it: each runs its own Prometheus on a free loopback port with a temporary config and
storage directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

TOOLS = ("prometheus", "promtool")


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


@pytest.fixture(scope="session")
def prometheus_tools() -> dict[str, str]:
    """Paths of ``prometheus`` and ``promtool``, installing Debian's package first if needed."""
    missing = missing_tools()
    if missing:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            pytest.fail(
                f"{', '.join(missing)} not on PATH and not root: install Debian's package: apt-get install prometheus"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        result = subprocess.run(
            "apt-get update && apt-get install -y --no-install-recommends prometheus",
            shell=True, capture_output=True, text=True, env=env, timeout=900,
        )  # fmt: skip
        if result.returncode != 0:
            tail = (result.stdout + result.stderr)[-3000:]
            pytest.fail(f"installing Debian's prometheus package failed (exit {result.returncode}):\n{tail}")
        missing = missing_tools()
        if missing:
            pytest.fail(f"apt-get installed prometheus but {', '.join(missing)} is still not on PATH")
    return {tool: str(shutil.which(tool)) for tool in TOOLS}
