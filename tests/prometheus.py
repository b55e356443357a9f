"""The one place the tests get Prometheus (``prometheus`` and ``promtool``) from.

In order: both on PATH (unless ``CARDDECK_TEST_PROMETHEUS=cache``, which CI sets to prove the fresh-machine
path); else a project-local cache (``build/test-tools/prometheus``, or ``$CARDDECK_TEST_TOOLS``), filled
on first use with Debian's package, unpacked rather than installed (``apt-get download prometheus`` and
``dpkg-deb -x``: nothing changes on the machine outside the cache; ``apt-get update`` first when the
package lists are empty and we are root). When none of that works the tests that need Prometheus FAIL
with the command to run: a missing tool must not turn into a silently skipped check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("prometheus", "promtool")
PACKAGE = "prometheus"  # Debian's: static Go binaries, no runtime dependencies


class Unavailable(RuntimeError):
    """Prometheus could not be found or fetched; the message says what to run."""


def cache_dir() -> Path:
    return Path(os.environ.get("CARDDECK_TEST_TOOLS") or ROOT / "build" / "test-tools") / "prometheus"


def _cached() -> dict[str, str] | None:
    paths = {tool: cache_dir() / "usr" / "bin" / tool for tool in TOOLS}
    return {t: str(p) for t, p in paths.items()} if all(os.access(p, os.X_OK) for p in paths.values()) else None


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)


def _download() -> dict[str, str]:
    """Debian's package, unpacked into the cache (atomically: a half-unpacked cache is never used)."""
    how = f"apt-get download {PACKAGE} && dpkg-deb -x {PACKAGE}_*.deb {cache_dir()}"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise Unavailable("prometheus and promtool are not on PATH and this is not a Debian-like system (no "
                          "apt-get/dpkg-deb): install Prometheus and put both on PATH")  # fmt: skip
    cache_dir().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir().parent) as tmp:
        work = Path(tmp)
        got = _run(["apt-get", "download", PACKAGE], work)
        if got.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:  # empty package lists
            update = _run(["apt-get", "update"], work)
            if update.returncode != 0:
                raise Unavailable(f"apt-get update failed (exit {update.returncode}): {update.stderr[-2000:]}")
            got = _run(["apt-get", "download", PACKAGE], work)
        if got.returncode != 0:
            raise Unavailable(f"could not fetch Prometheus: `{how}` failed (exit {got.returncode}; as root, "
                              f"`apt-get update` first): {got.stderr[-2000:]}")  # fmt: skip
        (deb,) = work.glob(f"{PACKAGE}_*.deb")
        unpacked = work / "root"
        result = _run(["dpkg-deb", "-x", str(deb), str(unpacked)], work)
        if result.returncode != 0:
            raise Unavailable(f"`dpkg-deb -x {deb.name}` failed: {result.stderr[-2000:]}")
        shutil.rmtree(cache_dir(), ignore_errors=True)
        unpacked.rename(cache_dir())
    tools = _cached()
    if tools is None:
        raise Unavailable(f"{deb.name} unpacked into {cache_dir()} holds no usr/bin/prometheus and promtool")
    return tools


def prometheus_tools() -> dict[str, str]:
    """Paths of ``prometheus`` and ``promtool``: PATH, else the project cache, else fetched into it."""
    if os.environ.get("CARDDECK_TEST_PROMETHEUS") != "cache":
        found = {tool: shutil.which(tool) for tool in TOOLS}
        if all(found.values()):
            return {tool: str(path) for tool, path in found.items()}
    return _cached() or _download()


__all__ = ["Unavailable", "cache_dir", "prometheus_tools"]
