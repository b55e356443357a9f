"""``carddeck ray-serve`` as the README runs it first: no ``--address``, so the command starts a local Ray cluster
of its own, deploys the deck, serves the OIP REST routes through Serve's proxy, and on SIGTERM deletes its
applications and takes the cluster down. A module of its own so that it never runs beside the module cluster of
``test_ray_serve.py`` (two clusters on two cores). Select with ``-m ray``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from carddeck.deck import Deck
from tests.observability.promql import free_port
from tests.servers import make_deck, smooth_images

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.timeout(600)]


def _get(url: str, doc: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if doc is None else json.dumps(doc).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_ray_serve_starts_its_own_cluster_serves_the_deck_and_takes_it_down_on_sigterm(tmp_path: Path) -> None:
    """Kills: a command that needs --address, a deploy that never reports, answers unlike the in-process deck's,
    a SIGTERM that leaves the command (or its cluster) running."""
    deck = make_deck(tmp_path / "deck")
    port, log_path = free_port(), tmp_path / "ray-serve.log"
    command = [sys.executable, "-m", "carddeck", "ray-serve", "--deck", str(deck), "--num-cpus", "2",
               "--http-port", str(port), "--metrics-port", "0", "--card-num-cpus", "0.25"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own, whatever the shell has
    with log_path.open("wb") as out:
        cli = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while "Ray Serve: deck " not in log_path.read_text():
            assert cli.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/v2"
        status, _ = _get(url + "/health/ready")
        assert status == 200
        x = smooth_images(4, seed=3)
        inputs = [{"name": "images", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}]
        status, doc = _get(url + "/models/carddeck/infer", {"inputs": inputs})
        assert status == 200, doc
        (probabilities,) = [o for o in doc["outputs"] if o["name"] == "probabilities"]
        want = Deck.open(deck).predict(x).probabilities
        got = np.asarray(probabilities["data"], np.float32).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert doc["parameters"]["shift_state"] in ("in_distribution", "covered", "uncovered", "unknown")
    finally:
        if cli.poll() is None:
            cli.send_signal(signal.SIGTERM)
        rc = cli.wait(timeout=120)
    assert rc == 0, log_path.read_text()[-3000:]
    with pytest.raises(OSError):  # the proxy went down with the command's cluster
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)
