"""The deck store on a real S3 API: moto's standalone server on a loopback port, spoken to over HTTP by boto3."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer

from carddeck.commands.cli import main
from carddeck.deck import Deck, DeckStore
from carddeck.deck.backends.s3 import S3Backend
from carddeck.errors import CardRejected, ConcurrentChange, DeckConflict, InvalidInput
from tests.deck.conftest import add_noise, card

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
AWS_VARS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per S3 call otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch, tmp_path) -> dict[str, str]:
    """Credentials, region and endpoint the standard way: environment variables boto3 reads itself."""
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "CARDDECK_CACHE_DIR": str(tmp_path / "cache"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def bucket(s3_env) -> str:
    name = f"deck-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def location(bucket) -> str:
    s = DeckStore.create(f"s3://{bucket}/decks/one")
    s.add_card(card("g1", "gaussian", seed=1))
    s.add_card(card("a1", "augmix", seed=2))
    return f"s3://{bucket}/decks/one"


def keys(bucket: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))


def test_add_remove_and_serve_from_s3(location, bucket, tmp_path, images):
    store = DeckStore(location)
    assert store.root == location and store.version == 2
    local = DeckStore.create(tmp_path / "local")
    local.add_card(card("g1", "gaussian", seed=1))
    local.add_card(card("a1", "augmix", seed=2))
    for x in (images, add_noise(images)):  # the same deck, from S3 or from disk, predicts the same
        got, want = Deck.open(location).predict(x), Deck.open(local.root).predict(x)
        np.testing.assert_array_equal(got.probabilities, want.probabilities)
        assert got.routing.selected == want.routing.selected
    assert "decks/one/manifest.json" in keys(bucket)
    store.add_card(card("g1", "gaussian", seed=1))  # a retried add of the same bytes changes nothing
    assert not store.last_add_was_new and store.version == 2
    with pytest.raises(DeckConflict, match="already in the deck with other bytes"):
        store.add_card(card("g1", "gaussian", seed=7))
    gone = store.manifest().find("g1").path
    assert store.remove_card("g1") == ["g1/1"]
    assert not [k for k in keys(bucket) if k.startswith(f"decks/one/{gone}")]  # its objects are deleted
    assert Deck.open(location).card_names == ("a1",)
    with pytest.raises(DeckConflict, match="already holds a deck"):
        DeckStore.create(location)


def test_calibrate_on_s3(location, images):
    store = DeckStore(location)
    store.set_calibration(images)
    store.add_card(card("n1", "gaussian", seed=4, signature=None))  # signed from the stored calibration images
    assert DeckStore(location).list_cards()[-1].signature is not None
    # the test cards record a synthetic dataset: name a real one to calibrate on
    args = ["calibrate", "--deck", location, "--data", "digits32", "--train-images", "32", "--val-images", "32"]
    assert main([*args, "--corruptions", "gaussian_noise", "--severities", "5", "--policy", "calibrated"]) == 0
    deck = Deck.open(location)
    assert deck.default_policy == "calibrated" and deck.manifest.gate["router"].startswith("gate/router-")
    assert deck.predict(images).routing.policy == "calibrated"


def test_remote_card_files_come_from_the_sha256_cache(location, bucket, s3_env, tmp_path, images):
    want = Deck.open(location).predict(images).probabilities  # fills the cache
    client = boto3.client("s3")
    for key in keys(bucket):
        if key.endswith(("model.onnx", "card.json")):
            client.delete_object(Bucket=bucket, Key=key)
    np.testing.assert_array_equal(Deck.open(location).predict(images).probabilities, want)  # no download needed
    os.environ["CARDDECK_CACHE_DIR"] = str(tmp_path / "empty-cache")  # s3_env's monkeypatch restores it
    with pytest.raises(CardRejected, match="cannot read"):
        Deck.open(location)


class _OrderedCommits(S3Backend):
    """Holds each commit until both writers have read the manifest and written their card files.

    moto checks a precondition and then writes without a lock between them (AWS S3 serializes the
    two itself), so the second commit is sent after the first has landed: the race is in what both
    writers read, which is what the conditional write must catch.
    """

    def __init__(self, backend: S3Backend, gate: threading.Barrier, delay_s: float) -> None:
        self.__dict__.update(backend.__dict__)
        self.gate, self.delay_s = gate, delay_s

    def commit(self, key: str, data: bytes, expected: str | None) -> None:
        if key == "manifest.json":
            self.gate.wait(timeout=30)
            time.sleep(self.delay_s)
        super().commit(key, data, expected)


def test_two_racing_writers_exactly_one_wins(location, bucket):
    gate = threading.Barrier(2)
    stores = [DeckStore(location), DeckStore(location)]
    for i, s in enumerate(stores):
        s.backend = _OrderedCommits(s.backend, gate, delay_s=0.5 * i)  # type: ignore[arg-type]
    outcomes: dict[str, object] = {}

    def add(i: int) -> None:
        try:
            outcomes[f"w{i}"] = stores[i].add_card(card(f"w{i}", "gaussian", seed=10 + i))
        except DeckConflict as exc:
            outcomes[f"w{i}"] = exc

    threads = [threading.Thread(target=add, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(outcomes["w1"], ConcurrentChange) and "another writer committed first" in str(outcomes["w1"])
    assert not isinstance(outcomes["w0"], Exception)
    m = DeckStore(location).manifest()
    assert m.version == 3 and [c.name for c in m.cards] == ["g1", "a1", "w0"]
    assert not [k for k in keys(bucket) if "/cards/w1/" in k]  # nothing of the loser's write stays
    assert Deck.open(location).card_names == ("g1", "a1", "w0")


KILLED_WRITER = """
import os, signal, sys
from carddeck.deck import DeckStore
store = DeckStore(sys.argv[1])
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # the card files are written; the manifest is not
store.backend.commit = die
store.add_card(open(sys.argv[2], "rb").read())
"""


def kill_a_writer(location: str, model: Path) -> None:
    """A real writer process, killed (SIGKILL) after uploading its card files and before its manifest commit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = textwrap.dedent(KILLED_WRITER)
    done = subprocess.run([sys.executable, "-c", script, location, str(model)], env=env, timeout=120)
    assert done.returncode == -9


def test_a_writer_killed_between_card_and_manifest_leaves_the_deck_loadable(location, bucket, tmp_path, images):
    before = Deck.open(location).predict(images).probabilities
    (tmp_path / "k1.onnx").write_bytes(card("k1", "gaussian", seed=7))
    kill_a_writer(location, tmp_path / "k1.onnx")
    assert [k for k in keys(bucket) if "/cards/k1/" in k]  # it died with its card files written
    store = DeckStore(location)
    assert store.version == 2 and "k1" not in [c.name for c in store.manifest().cards]
    np.testing.assert_array_equal(Deck.open(location).predict(images).probabilities, before)
    store.add_card((tmp_path / "k1.onnx").read_bytes())  # the leftovers do not block a retry
    assert Deck.open(location).card_names == ("g1", "a1", "k1")


def test_a_killed_writers_objects_are_swept_once_older_than_the_grace_period(location, bucket, tmp_path, images):
    """moto cannot back-date an object, so the objects really age: a grace of 2 s, and a wait past it."""
    named = keys(bucket)
    (tmp_path / "k1.onnx").write_bytes(card("k1", "gaussian", seed=7))
    kill_a_writer(location, tmp_path / "k1.onnx")
    orphans = sorted(set(keys(bucket)) - set(named))
    assert len(orphans) == 2 and all("/cards/k1/1-" in k for k in orphans)  # model.onnx and card.json

    grace_s = 2.0
    store = DeckStore(location, debris_grace_s=grace_s)
    assert store.clean() == []  # young: a live writer's files look the same until they are committed
    assert keys(bucket) == sorted([*named, *orphans])
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key="decks/one/notes.txt", Body=b"not the deck's")  # not a writer's file
    for key in ("gate/router-3-0123456789ab.npz", "calibration-0123456789ab.npz"):  # a killed calibrate's
        client.put_object(Bucket=bucket, Key=f"decks/one/{key}", Body=b"npz")
    time.sleep(grace_s + 1.5)  # past the grace period by the store's clock (whole seconds)
    store.add_card(card("late", "augmix", seed=8))  # a writer still within grace of its own files
    assert store.version == 3
    # the sweep at that commit took the old orphans; every object the manifest names stays
    assert [k for k in keys(bucket) if "/cards/k1/" in k or "0123456789ab" in k] == []
    assert set(named) - {"decks/one/manifest.json"} <= set(keys(bucket))
    assert "decks/one/notes.txt" in keys(bucket)
    deck = Deck.open(location)
    assert deck.card_names == ("g1", "a1", "late") and deck.predict(images).labels.shape == (len(images),)


def test_clean_sweeps_orphans_at_start_without_a_change(location, bucket, tmp_path):
    """What `carddeck serve` runs at start (and now and then while polling): the sweep with no writer."""
    (tmp_path / "k2.onnx").write_bytes(card("k2", "gaussian", seed=9))
    kill_a_writer(location, tmp_path / "k2.onnx")
    orphans = [k for k in keys(bucket) if "/cards/k2/" in k]
    time.sleep(2.5)
    gone = DeckStore(location, debris_grace_s=1.0).clean()
    assert ["decks/one/" + k for k in gone] == orphans and not [k for k in keys(bucket) if "/cards/k2/" in k]
    assert DeckStore(location).version == 2 and Deck.open(location).card_names == ("g1", "a1")


def test_clear_errors_at_start(s3_env, bucket, monkeypatch):
    with pytest.raises(InvalidInput, match="no such bucket 'missing-bucket-x'"):
        DeckStore("s3://missing-bucket-x/deck")
    with pytest.raises(InvalidInput, match=f"s3://{bucket}/nothing is not a deck: no manifest.json"):
        DeckStore(f"s3://{bucket}/nothing")
    with pytest.raises(InvalidInput, match="expected s3://BUCKET"):
        DeckStore("s3:///deck")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(InvalidInput, match="no AWS credentials found; set AWS_ACCESS_KEY_ID"):
        DeckStore(f"s3://{bucket}/deck")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bad_credentials_are_a_clear_error(s3_env, tmp_path):
    """A moto server that checks credentials (none are known to it) refuses ours: 403 at start."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    log = open(tmp_path / "moto.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "moto.log").read_text()
            time.sleep(0.1)
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"  # s3_env's monkeypatch restores it
        with pytest.raises(InvalidInput, match="access denied .*AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
            DeckStore("s3://any-bucket/deck")
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
