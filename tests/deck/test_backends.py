"""One contract, two backends: a local directory and S3 (moto's standalone server on loopback)."""

from __future__ import annotations

import pytest

from carddeck.deck.backend import Backend, open_backend
from carddeck.deck.backends.file import LocalBackend
from carddeck.deck.backends.s3 import S3Backend
from carddeck.errors import ConcurrentChange
from tests.deck.test_s3 import bucket, s3_endpoint, s3_env  # noqa: F401 - fixtures


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> Backend:
    if request.param == "local":
        return open_backend(f"file://{tmp_path}/deck")
    name = request.getfixturevalue("bucket")
    return open_backend(f"s3://{name}/some/prefix")


def test_the_backend_is_chosen_by_the_location(backend, tmp_path):
    assert isinstance(backend, S3Backend if str(backend.root).startswith("s3://") else LocalBackend)
    assert isinstance(open_backend(tmp_path), LocalBackend) and open_backend(tmp_path).root == tmp_path


def test_read_write_list_delete(backend):
    with pytest.raises(FileNotFoundError):
        backend.read("cards/a/1/model.onnx")
    backend.write("cards/a/1/model.onnx", b"onnx")
    backend.write("cards/a/1/card.json", b"{}")
    backend.write("cards/a/10/card.json", b"{}")
    assert backend.read("cards/a/1/model.onnx") == b"onnx"
    assert backend.list("cards/a/1") == ["cards/a/1/card.json", "cards/a/1/model.onnx"]  # not cards/a/10
    backend.delete("cards/a/1")
    assert backend.list("cards") == ["cards/a/10/card.json"]
    backend.delete("cards/a/10/card.json")
    backend.delete("cards/nothing")  # absent is fine
    assert backend.list("cards") == []


def test_ages_by_the_stores_clock(backend):
    assert backend.ages("") == {}
    backend.write("cards/a/1/model.onnx", b"onnx")
    backend.write("calibration.npz", b"npz")
    ages = backend.ages("")
    assert sorted(ages) == ["calibration.npz", "cards/a/1/model.onnx"] and all(0 <= a < 30 for a in ages.values())
    assert list(backend.ages("cards")) == ["cards/a/1/model.onnx"] and backend.ages("gate") == {}


def test_conditional_commit_and_change_stamps(backend):
    assert backend.stamp("manifest.json") is None
    backend.commit("manifest.json", b"v0", expected=None)
    with pytest.raises(ConcurrentChange):
        backend.commit("manifest.json", b"again", expected=None)  # creating twice: the second loses
    data, first = backend.read_stamped("manifest.json")
    assert data == b"v0" and backend.stamp("manifest.json") == first
    backend.commit("manifest.json", b"v1", expected=first)
    second = backend.stamp("manifest.json")
    assert second is not None and second != first
    with pytest.raises(ConcurrentChange):
        backend.commit("manifest.json", b"stale", expected=first)  # written against an old read
    assert backend.read("manifest.json") == b"v1"


def test_fresh_keys(backend):
    keys = {backend.fresh("calibration.npz") for _ in range(3)}
    if backend.remote:  # writers that race must not share a key
        assert len(keys) == 3 and all(k.startswith("calibration-") and k.endswith(".npz") for k in keys)
    else:  # on disk the lock serializes writers: today's layout stays
        assert keys == {"calibration.npz"}
