"""The small frictions a new user met (issue 22, item 11): each seen from the user's side of a live server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest

from carddeck import errors
from carddeck.client.api import CardDeckClient
from carddeck.client.results import Card, CardListing
from tests.server.test_hardening import copy_default_deck
from tests.servers import ADMIN_TOKEN, ROOT, noisy_images, start_server

pytestmark = pytest.mark.integration


def carddeck(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CARDDECK_")}
    full.update({"PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.Popen([sys.executable, "-m", "carddeck.commands.cli", *args], cwd=ROOT, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # fmt: skip


def test_a_second_server_names_every_taken_port_at_once(tmp_path):
    held = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        held.append(s)
    grpc_port, http_port, metrics_port = (s.getsockname()[1] for s in held)
    try:
        proc = carddeck("serve", "--port", str(grpc_port), "--http-port", str(http_port),
                        "--metrics-port", str(metrics_port))  # fmt: skip
        _, err = proc.communicate(timeout=120)
    finally:
        for s in held:
            s.close()
    assert proc.returncode == 2, err
    (line,) = [x for x in err.splitlines() if x.startswith("carddeck: error:")]
    for port, flag in ((grpc_port, "--port"), (http_port, "--http-port"), (metrics_port, "--metrics-port")):
        assert f"port {port} (" in line and flag in line, line


@pytest.mark.parametrize("flag", ["--host", "--metrics-host"])
def test_a_host_that_is_not_this_machine_is_named_not_blamed_on_a_port(flag):
    """Mutant: no check of the host first (the metrics endpoint's bind failed first and said "stop the other
    server or choose another port" for an address of another machine, TEST-NET-3; an unresolvable name,
    which would ask DNS, went the same way)."""
    host = "203.0.113.7"
    proc = carddeck("serve", flag, host, "--port", "0", "--http-port", "0", "--metrics-port", "0")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    (line,) = [x for x in err.splitlines() if x.startswith("carddeck: error:")]
    assert f"cannot listen on {host}" in line and f"{flag} takes an address of this machine" in line, line
    assert "port" not in line, line


def test_predict_into_head_ends_quietly(server, tmp_path):
    paths = []
    for i in range(40):
        paths.append(tmp_path / f"img{i:02d}.npy")
        np.save(paths[-1], noisy_images(1, seed=i))
    proc = carddeck("predict", "--server", server.address, *map(str, paths))
    first = proc.stdout.readline()  # like `| head -1`: read one line, then go away
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(120) == 0, err
    assert first.strip() and "Broken pipe" not in err and "error" not in err, err


def test_the_client_returns_plain_results_and_raises_carddeck_errors(server):
    with CardDeckClient(server.address) as client:
        listing = client.list_cards()
        assert isinstance(listing, CardListing) and all(isinstance(c, Card) for c in listing.cards)
        assert {c.name for c in listing.cards} == {"g1", "a1"} and listing.cards[0].meta.name == listing.cards[0].name
        with pytest.raises(errors.CardNotFound) as missing:
            client.get_card("no-such-card")
        assert "no-such-card" in str(missing.value) and missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(errors.InvalidInput, match="images"):
            client.predict(np.zeros((1, 5, 5, 3), np.uint8))
        # refused by the dtype the caller sent (not as the FP32 it would have become), a list too (no AttributeError)
        for images in (np.zeros((1, 32, 32, 3), np.int64), np.zeros((1, 32, 32, 3), np.uint8).tolist()):
            with pytest.raises(errors.InvalidInput, match="dtype int64 is not accepted"):
                client.predict(images)
        with pytest.raises(errors.Unauthenticated):
            client.remove_card("g1")  # no admin token
        with pytest.raises(grpc.RpcError):  # code written against raw gRPC errors still catches them
            client.get_card("no-such-card")


def test_deck_remove_shows_the_default_policy_note_and_admin_state_is_logged_once(tmp_path):
    deck = copy_default_deck(tmp_path / "deck")
    srv = start_server(deck, tmp_path, "--log-format", "json", env={"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        proc = carddeck("deck", "remove", "resnet20-gaussian-lrr", "--server", srv.address,
                        env={"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN})  # fmt: skip
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "removed resnet20-gaussian-lrr" in out and "note: the default policy changed from" in out, out
    finally:
        srv.terminate()
    log = srv.log()
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert entries and all("color_message" not in e for e in entries) and "\x1b[" not in log
    none = start_server(deck, tmp_path)  # no admin token: admin RPCs are off, said once
    none.terminate()
    assert none.log().count("admin RPCs are disabled") == 1, none.log()[-2000:]
