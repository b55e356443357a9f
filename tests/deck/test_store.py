import hashlib
import json
import os

import numpy as np
import onnx
import pytest

import carddeck.deck.backends.file as backend_mod
from carddeck.card import METADATA_KEY
from carddeck.deck import Deck, DeckStore, default_deck_path, init_deck, read_card_meta
from carddeck.errors import CardNotFound, CardRejected, DeckConflict, InvalidInput, ReadOnlyDeck
from tests.cards import tiny_card, tiny_meta
from tests.deck.conftest import NOISE_SIG, card


def test_create_add_list_and_versions(store):
    m = store.manifest()
    assert m.version == 2 and m["version"] == 2
    assert [c.key for c in store.list_cards()] == ["g1/1", "a1/1"]
    assert m.class_names == tuple(str(i) for i in range(10)) and m.input["height"] == 32
    for entry in m.cards:  # the manifest's hashes are the stored files' hashes
        for fname, digest in entry.sha256.items():
            assert hashlib.sha256((store.root / entry.path / fname).read_bytes()).hexdigest() == digest
    on_disk = json.loads((store.root / "manifest.json").read_text())
    assert on_disk["version"] == 2 and len(on_disk["cards"]) == 2
    with pytest.raises(DeckConflict):
        DeckStore.create(store.root)
    with pytest.raises(InvalidInput, match="not a deck"):
        DeckStore(store.root / "cards")


def test_read_card_meta(tmp_path):
    data = card("g1", "gaussian")
    assert read_card_meta(data).name == "g1"
    (tmp_path / "m.onnx").write_bytes(data)
    assert read_card_meta(tmp_path / "m.onnx").signature == NOISE_SIG
    with pytest.raises(CardRejected, match="not an ONNX"):
        read_card_meta(b"garbage")
    with pytest.raises(CardRejected, match="cannot read"):
        read_card_meta(tmp_path / "missing.onnx")


def test_duplicates_and_mismatches_conflict(store):
    with pytest.raises(DeckConflict, match="already in the deck"):
        store.add_card(card("g1", "gaussian"))
    with pytest.raises(DeckConflict, match="classes"):
        store.add_card(card("c5", "gaussian", num_classes=5))
    with pytest.raises(DeckConflict, match="input"):
        store.add_card(card("big", "gaussian", size=64))
    assert store.manifest().version == 2


def test_bad_cards_are_rejected(store):
    model = tiny_card(tiny_meta("nometa", signature=NOISE_SIG))
    del model.metadata_props[:]
    with pytest.raises(CardRejected, match="no CardMeta"):
        store.add_card(model.SerializeToString())
    model = tiny_card(tiny_meta("badmeta", signature=NOISE_SIG))
    model.metadata_props[0].value = '{"name": "x"}'
    with pytest.raises(CardRejected, match="bad CardMeta"):
        store.add_card(model.SerializeToString())
    model = tiny_card(tiny_meta("renamed", signature=NOISE_SIG))
    model.graph.output[0].name = "scores"
    model.graph.node[-1].output[0] = "scores"
    with pytest.raises(CardRejected, match="logits"):
        store.add_card(model.SerializeToString())
    model = tiny_card(tiny_meta("lying", signature=NOISE_SIG))  # claims 10 classes, computes 10: make it 12
    meta = json.loads(model.metadata_props[0].value)
    meta["num_classes"], meta["class_names"] = 12, [str(i) for i in range(12)]
    model.metadata_props[0].value = json.dumps(meta)
    with pytest.raises(CardRejected, match="logits"):
        store.add_card(model.SerializeToString())
    with pytest.raises(CardRejected, match="no spectral signature"):
        store.add_card(card("nosig", "gaussian", signature=None))
    assert [c.key for c in store.list_cards()] == ["g1/1", "a1/1"]


def test_signature_dimension_must_match(store):
    with pytest.raises(CardRejected, match="signature has 3 values"):
        store.add_card(card("short", "gaussian", signature=(1.0, 2.0, 3.0)))


def test_remove(store):
    store.add_card(card("g1", "gaussian", version=2))
    assert [c.key for c in store.list_cards()] == ["g1/2", "a1/1"]  # the highest version serves
    assert store.remove_card("g1", 2) == ["g1/2"]
    assert [c.key for c in store.list_cards()] == ["g1/1", "a1/1"]
    assert (store.root / "cards/g1/2/model.onnx").exists()  # a replica on the old manifest may be loading it
    assert DeckStore(store.root, debris_grace_s=0).clean() == ["cards/g1/2"]
    with pytest.raises(CardNotFound, match="g1/1, a1/1"):
        store.remove_card("nope")
    store.remove_card("g1")
    store.remove_card("a1")
    m = store.manifest()
    assert m.cards == () and m.class_names == () and m.version == 6
    store.add_card(card("c5", "gaussian", num_classes=5))  # an empty deck takes any classes


def crash_on(monkeypatch, name: str) -> None:
    real = backend_mod.atomic_write  # the local backend does every file write of the store

    def failing(path, data):
        if path.name == name:
            raise OSError("simulated crash")
        real(path, data)

    monkeypatch.setattr(backend_mod, "atomic_write", failing)


@pytest.mark.parametrize("crash_before", ["card.json", "manifest.json"])
def test_interrupted_add_leaves_the_old_deck(store, monkeypatch, crash_before, images):
    before = Deck.open(store.root).predict(images).probabilities
    crash_on(monkeypatch, crash_before)
    with pytest.raises(OSError, match="simulated"):
        store.add_card(card("g2", "gaussian", seed=3))
    monkeypatch.undo()
    fresh = DeckStore(store.root)
    assert fresh.manifest().version == 2 and [c.key for c in fresh.list_cards()] == ["g1/1", "a1/1"]
    np.testing.assert_array_equal(Deck.open(store.root).predict(images).probabilities, before)
    fresh.add_card(card("g2", "gaussian", seed=3))  # the leftovers of the crash do not block a retry
    assert [c.key for c in fresh.list_cards()] == ["g1/1", "a1/1", "g2/1"]


def test_crash_inside_the_manifest_write_keeps_the_old_manifest(store, monkeypatch):
    real = os.replace

    def no_rename(src, dst):
        if str(dst).endswith("manifest.json"):
            raise OSError("simulated crash before rename")
        real(src, dst)

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError):
        store.add_card(card("g2", "gaussian"))
    monkeypatch.undo()
    assert DeckStore(store.root).manifest().version == 2
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]  # temporary file cleaned up


def test_manifest_polling_is_cached_and_sees_changes(store):
    other = DeckStore(store.root)  # a second replica on the same store
    first = other.manifest()
    assert other.manifest() is first
    store.add_card(card("g2", "gaussian"))
    assert other.manifest().version == 3


def test_calibration_images_sign_cards_without_a_signature(store):
    rng = np.random.default_rng(0)
    calib = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    meta = store.add_card(card("clean1", "clean", signature=(0.0,) * 17), calibration=None)
    assert meta.signature == (0.0,) * 17
    added = store.add_card(card("signed", "clean", signature=None), calibration=calib)
    assert added.signature is not None and len(added.signature) == 17
    stored = read_card_meta(store.root / "cards/signed/1/model.onnx")
    assert stored.signature == added.signature  # the ONNX file and card.json agree
    assert json.loads((store.root / "cards/signed/1/card.json").read_text())["signature"] == list(added.signature)
    store.set_calibration(calib)
    assert store.add_card(card("signed2", "clean", signature=None)).signature == added.signature


def test_metadata_key_constant_is_used():
    model = onnx.load_model_from_string(card("g1", "gaussian"))
    assert {p.key for p in model.metadata_props} == {METADATA_KEY}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_created_files_follow_the_umask(tmp_path, umask):
    """Manifest and card files get 0666 & ~umask, like any other created file (not mkstemp's 0600)."""
    old = os.umask(umask)
    try:
        s = DeckStore.create(tmp_path / "deck")
        s.add_card(card("g1", "gaussian", seed=1))
    finally:
        os.umask(old)
    files = [s.root / "manifest.json", *(s.root / "cards" / "g1" / "1").iterdir()]
    assert len(files) == 3
    for f in files:
        assert oct(f.stat().st_mode & 0o777) == oct(0o666 & ~umask), f


def test_a_read_only_deck_refuses_every_change_and_writes_nothing(store, images):
    """A deck holding the marker (the default deck, or a `cp -r` of it) names the marker, so the owner of a
    plain copy sees why (mutant: the message said "the packaged default deck" of any such copy)."""
    (store.root / "READ-ONLY").write_text("shipped")
    (store.root / ".lock").unlink()
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    for change in (
        lambda: store.add_card(card("n1", "gaussian", seed=3)),
        lambda: store.remove_card("g1"),
        lambda: store.set_gate(policy="uniform"),
        lambda: store.set_calibration(images),
    ):
        with pytest.raises(ReadOnlyDeck, match=r"read-only \(it holds the READ-ONLY marker.*deck init DIR") as info:
            change()
        assert isinstance(info.value, DeckConflict)  # -> FAILED_PRECONDITION through the status table
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before
    assert store.version == 2


def test_the_default_deck_is_read_only_and_init_copies_it(tmp_path):
    default = DeckStore(default_deck_path())
    assert default.read_only
    copy = init_deck(tmp_path / "mine")
    assert not copy.read_only
    assert copy.manifest() == default.manifest()
    assert [m.to_dict() for m in copy.list_cards()] == [m.to_dict() for m in default.list_cards()]
    for entry in copy.manifest().cards:
        assert copy.read_model(entry) == default.read_model(entry)  # sha256 checked against the manifest
    assert Deck.open(copy.root).version == default.version  # router and calibration came along
    copy.remove_card(copy.manifest().cards[0].name)  # and it can change
    with pytest.raises(DeckConflict, match="already holds a deck"):
        init_deck(tmp_path / "mine")
    empty = init_deck(tmp_path / "empty", empty=True)
    assert empty.manifest().cards == () and not empty.read_only


def test_debris_is_swept_at_once_or_after_the_grace_period(store, monkeypatch):
    """kill -9 leftovers go at the next sweep; what a replica may still read (removed cards, old routers) after the
    grace period."""
    crash_on(monkeypatch, "manifest.json")  # an add that died before its manifest: an orphan card dir
    with pytest.raises(OSError, match="simulated"):
        store.add_card(card("g2", "gaussian", seed=3))
    monkeypatch.undo()
    tmp = [store.root / ".manifest.json.x1.tmp", store.root / "cards/a1/1/.model.onnx.x2.tmp"]
    for path in tmp:  # a writer killed inside atomic_write
        path.write_bytes(b"partial")
    (store.root / "gate").mkdir()
    (store.root / "gate/router-1.npz").write_bytes(b"superseded")
    version = store.version
    swept = [".manifest.json.x1.tmp", "cards/a1/1/.model.onnx.x2.tmp", "cards/g2/1"]  # g2: never in a manifest
    assert DeckStore(store.root).clean() == swept
    assert not (store.root / "cards/g2").exists() and store.version == version  # sweeping is not a change
    store.remove_card("g1")  # a change sweeps too
    assert (store.root / "cards/g1/1/model.onnx").exists() and (store.root / "gate/router-1.npz").exists()
    assert DeckStore(store.root, debris_grace_s=0).clean() == ["cards/g1/1", "gate/router-1.npz"]
    assert DeckStore(store.root).clean() == []
    assert [c.key for c in store.list_cards()] == ["a1/1"]


def test_a_change_sweeps_debris_past_the_grace_period(store):
    (store.root / "cards/old/3").mkdir(parents=True)
    (store.root / "cards/old/3/model.onnx").write_bytes(b"from a crashed add")
    (store.root / "cards/gone/1").mkdir(parents=True)
    (store.root / "cards/gone/1/.removed").write_bytes(b"")
    os.utime(store.root / "cards/gone/1/.removed", (0, 0))  # removed long ago
    (store.root / ".calibration.npz.x.tmp").write_bytes(b"")
    DeckStore(store.root, debris_grace_s=30).remove_card("a1")
    assert sorted(p.name for p in store.root.iterdir() if p.name.endswith(".tmp")) == []
    assert not (store.root / "cards/old").exists() and not (store.root / "cards/gone").exists()
    assert (store.root / "cards/a1/1/model.onnx").exists()  # just removed: kept for the grace period
    store.add_card(card("a1", "augmix", seed=2))  # back within the grace period: no longer marked removed
    assert DeckStore(store.root, debris_grace_s=0).clean() == [] and [c.key for c in store.list_cards()][-1] == "a1/1"


def test_re_adding_the_same_bytes_is_idempotent(store):
    data = card("g2", "gaussian", seed=3)
    first = store.add_card(data)
    assert store.last_add_was_new and store.version == 3
    again = store.add_card(data)  # a retry whose first answer was lost
    assert again == first and not store.last_add_was_new and store.version == 3
    with pytest.raises(DeckConflict, match="other bytes"):
        store.add_card(card("g2", "gaussian", seed=4))
    unsigned = card("s1", "gaussian", seed=5, signature=None)  # signed from calibration images at add time
    calib = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    store.add_card(unsigned, calibration=calib)
    assert store.add_card(unsigned, calibration=calib).signature is not None and not store.last_add_was_new


def test_the_deck_model_name_is_reserved(store):
    with pytest.raises(CardRejected, match="'carddeck' is reserved"):
        store.add_card(card("carddeck", "gaussian"))
    with pytest.raises(CardRejected, match="'ensemble' is reserved"):
        store.add_card(card("ensemble", "gaussian"), reserved=("ensemble",))
    assert [c.key for c in store.list_cards()] == ["g1/1", "a1/1"]


def test_a_read_only_deck_is_never_swept(store):
    (store.root / "READ-ONLY").write_text("shipped")
    debris = store.root / ".manifest.json.0123.tmp"
    debris.write_bytes(b"half a manifest")
    assert store.clean() == []  # not ReadOnlyDeck: a server on the shipped deck must still start
    assert debris.exists()


def test_a_card_file_changed_behind_the_manifest_is_refused(store):
    """The manifest's sha256 is checked on every read: a card file edited (or half-copied) after its
    commit is refused, naming the file, and never served."""
    entry = store.manifest().find("g1")
    path = store.root / entry.path / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CardRejected, match="g1/1.*does not match the manifest sha256"):
        store.read_model(entry)
    with pytest.raises(CardRejected, match="does not match the manifest sha256"):
        Deck.open(store.root)
