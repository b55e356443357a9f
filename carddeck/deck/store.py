"""The deck store: a directory of cards and a manifest, changed only by atomic writes.

Layout::

    ROOT/manifest.json                      deck version, cards (with sha256 of their files), gate
    ROOT/cards/<name>/<version>/model.onnx  the ONNX card (CardMeta in metadata_props)
    ROOT/cards/<name>/<version>/card.json   the same CardMeta
    ROOT/gate/router-<deck version>.npz     the calibrated router, when fitted
    ROOT/calibration.npz                    optional clean images to sign cards added without a signature
    ROOT/READ-ONLY                          present in the packaged default deck: every change is refused

The files live in a backend chosen by the location (:mod:`carddeck.deck.backend`: a directory, or
``s3://bucket/prefix``). Every file is written whole (on disk: a temporary name, fsynced, renamed
into place); the manifest is written last, by a conditional commit that fails with DeckConflict if
another writer committed since this one read it, so a crash or a lost race at any point leaves the
previous manifest, which names only complete files. On disk, writers take an exclusive ``flock`` on
``ROOT/.lock``; readers never lock. ``manifest()`` re-reads the manifest only when its change stamp
(inode/size/mtime, ETag) moved, so replicas can poll the version cheaply. Remote card files are
cached locally by sha256 (:mod:`carddeck.deck.cache`). A deck serves the highest version of each card
name; older versions stay until removed.
Debris (on disk) is swept at every change and by :meth:`DeckStore.clean`, under the lock (so no
writer is mid-write): temporary files and the card directories of interrupted adds (never named by a
manifest) at once; the directories of removed cards (marked ``.removed``) and superseded routers once
unnamed for ``debris_grace_s`` (60 s by default), since a replica that read the previous manifest may
still be loading them. On S3 a loser's or failed writer's files are deleted by the writer itself and a
removed card's objects at once; objects a killed writer left behind (files under cards/, gate/ or
a calibration file that no manifest names) go with the sweep at every change and by :meth:`clean` once
older than ``debris_grace_s`` by the store's clock (younger ones may be a live writer's, not yet committed).
Adding a card that is already there with the same bytes answers it again (a retried add); other
bytes under the same name and version are a DeckConflict.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from carddeck.card import CardMeta, InputSpec
from carddeck.deck.backend import open_backend
from carddeck.deck.cache import FileCache
from carddeck.deck.cardfile import (
    atomic_write,
    check_contract,
    check_runs,
    read_card_bytes,
    read_card_meta,
    set_card_meta,
)
from carddeck.errors import CarddeckError, CardNotFound, CardRejected, DeckConflict, InvalidInput, ReadOnlyDeck

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "carddeck-deck/1"
CALIBRATION = "calibration.npz"
MODEL_FILE = "model.onnx"
META_FILE = "card.json"
READ_ONLY = "READ-ONLY"  # marker file: the deck is shipped (in the package, in the repository), never changed
RESERVED_NAMES = frozenset({"carddeck"})  # the deck's own model name in the Open Inference Protocol
REMOVED_MARK = ".removed"  # in a removed card's directory: kept for the grace period, from the mark's time
GATE_FILES = ("router", "shift")  # manifest.gate keys that name fitted files under gate/ (set_gate writes them)
DEBRIS_GRACE_S = 60.0  # replicas poll every few seconds and load a deck in seconds: ample margin


# card files: reading, checking and atomic writes live in carddeck.deck.cardfile (shared with export)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the manifest ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CardEntry:
    name: str
    version: int
    domain: str
    path: str  # relative to the deck root: cards/<name>/<version>
    sha256: Mapping[str, str]  # file name -> hex digest

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "domain": self.domain,
            "path": self.path,
            "sha256": dict(self.sha256),
        }


@dataclass(frozen=True)
class Manifest:
    """The deck's table of contents. ``version`` increments on every change."""

    version: int
    cards: tuple[CardEntry, ...] = ()
    gate: Mapping[str, Any] = field(default_factory=dict)  # policy, params, references, router
    calibration: str | None = None
    class_names: tuple[str, ...] = ()
    input: Mapping[str, Any] | None = None
    updated: str = ""
    batching: Mapping[str, Any] = field(default_factory=dict)  # checked by batching_config

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "updated": self.updated,
            "class_names": list(self.class_names),
            "input": dict(self.input) if self.input is not None else None,
            "gate": dict(self.gate),
            "calibration": self.calibration,
            "cards": [c.to_dict() for c in self.cards],
        }
        if self.batching:  # absent unless set: older readers see the manifest they know
            out["batching"] = dict(self.batching)
        return out

    def __getitem__(self, key: str) -> Any:  # manifest()["version"] works as well as .version
        return self.to_dict()[key]

    @classmethod
    def from_dict(cls, data: Any, source: str) -> Manifest:
        try:
            if data.get("format") != MANIFEST_FORMAT:
                raise InvalidInput(f"{source}: format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            cards = tuple(
                CardEntry(c["name"], int(c["version"]), c["domain"], c["path"], dict(c["sha256"]))
                for c in data["cards"]
            )
            return cls(
                version=int(data["version"]),
                cards=cards,
                gate=dict(data.get("gate") or {}),
                calibration=data.get("calibration"),
                class_names=tuple(data.get("class_names") or ()),
                input=data.get("input"),
                updated=data.get("updated", ""),
                batching=batching_config(data.get("batching") or {}, f"{source}: batching"),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{source}: malformed deck manifest ({type(exc).__name__}: {exc})") from None

    def active(self) -> tuple[CardEntry, ...]:
        """The highest version of each card name, in the order names first joined the deck."""
        best: dict[str, CardEntry] = {}
        for c in self.cards:
            if c.name not in best or c.version > best[c.name].version:
                best[c.name] = c
        order = list(dict.fromkeys(c.name for c in self.cards))
        return tuple(best[n] for n in order)

    def find(self, name: str, version: int | None = None) -> CardEntry:
        for c in self.active() if version is None else self.cards:
            if c.name == name and (version is None or c.version == version):
                return c
        raise CardNotFound.among(name if version is None else f"{name}/{version}", (c.key for c in self.cards))


BATCHING_KEYS = ("max_batch_size", "max_queue_delay_microseconds", "preferred_batch_size")


def batching_config(config: Any, field: str = "batching") -> dict[str, Any]:
    """A deck's batching settings, checked: Triton's names (``max_batch_size``,
    ``max_queue_delay_microseconds``, ``preferred_batch_size``) for the deck model, and the same under
    ``cards: {name: {...}}`` for a card served as a model of its own. Unset keys take the server's flags."""

    def check(values: Any, where: str) -> dict[str, Any]:
        if not isinstance(values, Mapping):
            raise InvalidInput(f"{where}: must be an object, got {type(values).__name__}")
        unknown = sorted(set(values) - set(BATCHING_KEYS))
        if unknown:
            raise InvalidInput(f"{where}: unknown key(s) {unknown}; accepted: {', '.join(BATCHING_KEYS)}")
        most = values.get("max_batch_size", 1)
        if "max_batch_size" in values and not (isinstance(most, int) and most >= 1):
            raise InvalidInput(f"{where}.max_batch_size: must be an integer >= 1, got {most!r}")
        delay = values.get("max_queue_delay_microseconds", 0)
        if not isinstance(delay, int) or delay < 0:
            raise InvalidInput(f"{where}.max_queue_delay_microseconds: must be an integer >= 0, got {delay!r}")
        preferred = values.get("preferred_batch_size", [])
        if not isinstance(preferred, list) or not all(isinstance(v, int) and v >= 1 for v in preferred):
            raise InvalidInput(f"{where}.preferred_batch_size: must be a list of integers >= 1, got {preferred!r}")
        if "max_batch_size" in values and any(v > most for v in preferred):
            raise InvalidInput(f"{where}.preferred_batch_size: {preferred} exceeds max_batch_size {most}")
        return dict(values)

    if not isinstance(config, Mapping):
        raise InvalidInput(f"{field}: must be an object, got {type(config).__name__}")
    cards = config.get("cards", {})
    if not isinstance(cards, Mapping):
        raise InvalidInput(f"{field}.cards: must be an object of card name -> settings")
    out = check({k: v for k, v in config.items() if k != "cards"}, field)
    if cards:
        out["cards"] = {str(name): check(v, f"{field}.cards[{name!r}]") for name, v in cards.items()}
    return out


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def input_to_dict(spec: InputSpec) -> dict[str, Any]:
    return {
        "height": spec.height,
        "width": spec.width,
        "channels": spec.channels,
        "value_range": list(spec.value_range),
        "layout": spec.layout,
    }


class DeckStore:
    """Read and change a deck (a directory or ``s3://bucket/prefix``). Changes commit the manifest last."""

    def __init__(self, root: Path | str, *, debris_grace_s: float = DEBRIS_GRACE_S) -> None:
        self.backend = open_backend(root)
        self.root = self.backend.root
        self.debris_grace_s = debris_grace_s
        if self.backend.stamp(MANIFEST) is None:
            raise InvalidInput(
                f"{self.root} is not a deck: no {MANIFEST} (make one with `carddeck deck init DIR`, "
                "or `DeckStore.create(root)` in Python)"
            )
        self._cache: tuple[str, Manifest] | None = None
        self._files = FileCache() if self.backend.remote else None
        self._change = threading.local()  # the change in progress in this thread: its base stamp, its files
        self.last_add_was_new = True  # False when the last add_card found the same card already there

    @classmethod
    def create(cls, root: Path | str, *, exist_ok: bool = False) -> DeckStore:
        """An empty deck (version 0) at ``root``."""
        backend = open_backend(root)
        if backend.stamp(MANIFEST) is not None:
            if exist_ok:
                return cls(root)
            raise DeckConflict(f"{backend.root} already holds a deck")
        backend.commit(MANIFEST, _encode(Manifest(version=0, updated=_now())), expected=None)
        return cls(root)

    # -- reading ------------------------------------------------------------------------------
    def manifest(self) -> Manifest:
        return self._stamped_manifest()[1]

    def _stamped_manifest(self) -> tuple[str, Manifest]:
        stamp = self.backend.stamp(MANIFEST)
        if stamp is None:
            raise InvalidInput(f"{self.root} is not a deck: no {MANIFEST}")
        cached = self._cache
        if cached is not None and cached[0] == stamp:
            return cached
        source = f"{self.root}/{MANIFEST}"
        try:
            raw, stamp = self.backend.read_stamped(MANIFEST)
            data = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"{source}: unreadable manifest ({exc})") from None
        manifest = Manifest.from_dict(data, source)
        self._cache = (stamp, manifest)
        return stamp, manifest

    @property
    def version(self) -> int:
        return self.manifest().version

    def read_file(self, key: str) -> bytes:
        """A file of the deck by its key (``calibration.npz``, ``gate/router-3.npz``)."""
        try:
            return self.backend.read(key)
        except OSError as exc:
            raise InvalidInput(f"{self.root}/{key}: cannot read ({exc.strerror or exc})") from None

    def _card_file(self, entry: CardEntry, name: str, *, verify: bool = True) -> bytes:
        """A card file, from the local cache when its sha256 is there; checked against the manifest."""
        digest = entry.sha256.get(name, "")
        data = self._files.get(digest) if self._files is not None else None
        if data is not None:
            return data
        try:
            data = self.backend.read(f"{entry.path}/{name}")
        except OSError as exc:
            raise CardRejected(f"card {entry.key}: cannot read {self.root}/{entry.path}/{name}: {exc}") from None
        if verify and sha256(data) != digest:
            raise CardRejected(f"card {entry.key}: {self.root}/{entry.path}/{name} does not match the manifest sha256")
        if self._files is not None and verify:
            self._files.put(digest, data)
        return data

    def read_meta(self, entry: CardEntry) -> CardMeta:
        source = f"{self.root}/{entry.path}/{META_FILE}"
        return CardMeta.from_json(self._card_file(entry, META_FILE), source=source)

    def list_cards(self, *, all_versions: bool = False) -> list[CardMeta]:
        """CardMeta of the served cards (the highest version of each name), or of every stored version."""
        m = self.manifest()
        return [self.read_meta(e) for e in (m.cards if all_versions else m.active())]

    def read_model(self, entry: CardEntry, *, verify: bool = True) -> bytes:
        return self._card_file(entry, MODEL_FILE, verify=verify)

    def calibration_images(self) -> np.ndarray | None:
        m = self.manifest()
        if not m.calibration:
            return None
        with np.load(io.BytesIO(self.read_file(m.calibration)), allow_pickle=False) as z:
            return np.asarray(z["images"])

    # -- changing -----------------------------------------------------------------------------
    @property
    def read_only(self) -> bool:
        return self.backend.stamp(READ_ONLY) is not None

    def check_writable(self) -> None:
        """ReadOnlyDeck (naming the way out) when the deck may not be changed."""
        if self.read_only:
            raise ReadOnlyDeck(
                f"the deck {self.root} is read-only (the packaged default deck): make a copy you can change with "
                "`carddeck deck init DIR` and serve that with `carddeck serve --deck DIR`"
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Manifest]:
        """One change: the manifest it starts from; files it writes are deleted again if it does not commit."""
        self.check_writable()
        change = self._change
        with self.backend.lock():
            self._cache = None
            change.base, manifest = self._stamped_manifest()
            change.written = []
            try:
                yield manifest
            except BaseException:
                if self.backend.remote:  # fresh keys: nobody else's files (on disk the lock kept others out)
                    for key in change.written:
                        with contextlib.suppress(Exception):
                            self.backend.delete(key)
                raise
            finally:
                change.base, change.written = None, []

    def _write(self, key: str, data: bytes) -> None:
        self._change.written.append(key)
        self.backend.write(key, data)

    def _commit(self, manifest: Manifest) -> Manifest:
        """Write the manifest, if it is still the one :meth:`_locked` read (else DeckConflict)."""
        base = getattr(self._change, "base", None)
        assert base is not None, "commit outside _locked"
        self.backend.commit(MANIFEST, _encode(manifest), expected=base)
        self._cache = None
        log.info("deck %s: version %d (%d cards)", self.root, manifest.version, len(manifest.cards))
        try:
            self._sweep(manifest)
        except (OSError, CarddeckError) as exc:  # the change is committed; debris waits for the next sweep
            log.warning("deck %s: could not remove debris: %s", self.root, exc)
        return manifest

    # -- debris -------------------------------------------------------------------------------
    def clean(self) -> list[str]:
        """Remove debris (see the module docstring); returns what was removed, relative to the root.

        Takes the lock only when there is debris: a clean deck is not written to, a read-only one never.
        """
        if self.read_only:
            return []
        if self.backend.remote:  # no lock to take: the sweep itself is all
            return self._sweep(self.manifest())
        if not self._debris(self.manifest()):
            return []
        with self._locked() as m:
            return self._sweep(m)

    def _debris(self, manifest: Manifest) -> list[Path]:
        """What :meth:`clean` removes now from a deck on disk, given ``manifest`` (see the module docstring)."""
        if self.backend.remote:
            return []
        root = Path(self.root)
        named = _named(manifest)
        cutoff = time.time() - self.debris_grace_s

        def unnamed(path: Path) -> bool:
            return path.relative_to(root).as_posix() not in named

        def expired(path: Path) -> bool:
            with contextlib.suppress(FileNotFoundError):
                return path.stat().st_mtime < cutoff
            return True

        tmp = [*root.glob(".*.tmp"), *root.glob("cards/*/*/.*.tmp"), *root.glob("gate/.*.tmp")]
        cards = [
            d
            for d in root.glob("cards/*/*")
            if d.is_dir() and unnamed(d) and (not (d / REMOVED_MARK).exists() or expired(d / REMOVED_MARK))
        ]
        routers = [r for r in root.glob("gate/*-*.npz") if unnamed(r) and expired(r)]  # routers, shift detectors
        return tmp + cards + routers

    def _orphans(self, manifest: Manifest) -> list[str]:
        """Objects of a remote deck that no manifest names and no live writer can still commit (killed writers').

        No lock spans machines, so age decides: a writer commits within seconds of writing its files
        (under fresh keys), so unnamed files older than the grace period, by the store's clock, are
        orphans; younger ones may be a concurrent writer's, not yet committed, and stay.
        """
        named = _named(manifest)

        def ours(key: str) -> bool:  # only what a writer puts there: cards, fitted gate files, calibration
            return key.startswith(("cards/", "gate/")) or (key.startswith("calibration") and "/" not in key)

        def unnamed(key: str) -> bool:
            parts = key.split("/")
            return not any("/".join(parts[:i]) in named for i in range(1, len(parts) + 1))

        ages = self.backend.ages("")
        return sorted(k for k, age in ages.items() if ours(k) and unnamed(k) and age > self.debris_grace_s)

    def _sweep(self, manifest: Manifest) -> list[str]:
        """Under the lock (no writer is mid-write): remove the debris, then card-name directories left empty."""
        if self.backend.remote:
            orphans = self._orphans(manifest)
            for key in orphans:
                self.backend.delete(key)
            if orphans:
                log.info(
                    "deck %s: removed objects no manifest names (killed writers): %s", self.root, ", ".join(orphans)
                )
            return orphans
        removed = self._debris(manifest)
        root = Path(self.root)
        for path in removed:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        for name_dir in root.glob("cards/*"):
            if name_dir.is_dir() and not any(name_dir.iterdir()):
                name_dir.rmdir()
        names = sorted(p.relative_to(root).as_posix() for p in removed)
        if names:
            log.info("deck %s: removed debris %s", self.root, ", ".join(names))
        return names

    def add_card(
        self,
        model: bytes | Path | str,
        *,
        calibration: np.ndarray | None = None,
        reserved: Iterable[str] = (),
    ) -> CardMeta:
        """Validate an ONNX card and add it. Returns its CardMeta (with the signature it is served with).

        CardRejected: unreadable ONNX, fails onnx.checker, bad CardMeta, graph digest mismatch, contract
        mismatch (all from :func:`carddeck.deck.cardfile.read_card`), ONNX Runtime cannot run it, a
        reserved name (:data:`RESERVED_NAMES` and ``reserved``), no signature and nothing to compute one
        from. DeckConflict: name/version already there with other bytes, classes or input size differ
        from the deck's cards. The same bytes again change nothing (:attr:`last_add_was_new` is False).
        """
        self.check_writable()  # before the costly checks
        proto, meta, data = read_card_bytes(model)
        taken = RESERVED_NAMES | set(reserved)
        if meta.name in taken:
            raise CardRejected(
                f"card name {meta.name!r} is reserved: it is the deck's own model name in the Open Inference "
                f"Protocol (reserved: {', '.join(sorted(taken))}); export the card under another name"
            )
        check_runs(data, meta)
        with self._locked() as m:
            if meta.signature is None:
                images = calibration if calibration is not None else self.calibration_images()
                if images is None:
                    raise CardRejected(
                        f"card {meta.key} has no spectral signature and none can be computed: pass calibration "
                        f"images (clean uint8 [N,H,W,3]) or store {CALIBRATION} in the deck"
                    )
                from carddeck.gating.signature import domain_signature

                meta = meta.replace(signature=domain_signature(meta.domain, images, seed=0))
                set_card_meta(proto, meta)
                data = proto.SerializeToString()
            same = next((c for c in m.cards if c.name == meta.name and c.version == meta.version), None)
            if same is not None:
                if same.sha256.get(MODEL_FILE) == sha256(data):  # a retry of an add that landed
                    self.last_add_was_new = False
                    log.info("deck %s: card %s is already present with the same bytes", self.root, meta.key)
                    return self.read_meta(same)
                raise DeckConflict(
                    f"card {meta.key} is already in the deck with other bytes; bump its version to replace it"
                )
            if m.class_names and tuple(meta.class_names) != tuple(m.class_names):
                raise DeckConflict(
                    f"card {meta.key} has {meta.num_classes} classes {list(meta.class_names)[:5]}..., the deck has "
                    f"{len(m.class_names)} classes {list(m.class_names)[:5]}...; every card must share the classes"
                )
            if m.input is not None and input_to_dict(meta.input) != dict(m.input):
                raise DeckConflict(
                    f"card {meta.key} takes input {input_to_dict(meta.input)}, the deck's cards take {dict(m.input)}"
                )
            signature = meta.signature or ()
            others = [self.read_meta(e) for e in m.active() if e.name != meta.name]
            dims = {len(o.signature) for o in others if o.signature is not None}
            if dims and len(signature) not in dims:
                raise CardRejected(
                    f"card {meta.key}: signature has {len(signature)} values, the deck's cards have {dims.pop()}"
                )
            rel = self.backend.fresh(f"cards/{meta.name}/{meta.version}")
            meta_bytes = meta.to_json().encode()
            if not self.backend.remote:  # the key comes back within the grace period: no longer removed
                (Path(self.root) / rel / REMOVED_MARK).unlink(missing_ok=True)
            self._write(f"{rel}/{MODEL_FILE}", data)
            self._write(f"{rel}/{META_FILE}", meta_bytes)
            entry_ = CardEntry(
                meta.name, meta.version, meta.domain, rel, {MODEL_FILE: sha256(data), META_FILE: sha256(meta_bytes)}
            )
            self._commit(
                replace(
                    m,
                    version=m.version + 1,
                    cards=(*m.cards, entry_),
                    class_names=tuple(meta.class_names),
                    input=input_to_dict(meta.input),
                    updated=_now(),
                )
            )
        self.last_add_was_new = True
        log.info("deck %s: added card %s (domain %s)", self.root, meta.key, meta.domain)
        return meta

    def remove_card(self, name: str, version: int | None = None) -> list[str]:
        """Remove one version of a card, or every version when ``version`` is None. CardNotFound if absent.

        Only the manifest changes now; the files, marked removed, stay for the grace period (a replica may
        be loading the previous manifest) and go with a later sweep. Returns the removed keys.
        """
        with self._locked() as m:
            gone = [c for c in m.cards if c.name == name and (version is None or c.version == version)]
            if not gone:
                m.find(name, version)  # raises CardNotFound naming what is there
            keep = tuple(c for c in m.cards if c not in gone)
            if not self.backend.remote:  # on disk: kept for the grace period, counted from now
                for c in gone:
                    with contextlib.suppress(OSError):
                        (Path(self.root) / c.path / REMOVED_MARK).touch()
            self._commit(
                replace(
                    m,
                    version=m.version + 1,
                    cards=keep,
                    class_names=m.class_names if keep else (),
                    input=m.input if keep else None,
                    updated=_now(),
                )
            )
        if self.backend.remote:  # on disk they are marked and swept after the grace period
            for c in gone:
                self.backend.delete(c.path)
        return [c.key for c in gone]

    def set_gate(
        self,
        *,
        policy: str | None = None,
        params: Mapping[str, Any] | None = None,
        references: Mapping[str, tuple[float, ...]] | None = None,
        router: Any | None = None,
        shift: Any | None = None,
    ) -> Manifest:
        """Change the default gate policy, its parameters, the domain references, the router or the
        shift detector (``carddeck.observability.shift.ShiftDetector``, saved beside the router)."""
        from carddeck.gating.policies import POLICIES, GateParams

        if policy is not None:
            POLICIES.get(policy)  # InvalidInput listing the valid names
        if params is not None:
            GateParams.from_dict(params)
        with self._locked() as m:
            gate = dict(m.gate)
            if policy is not None:
                gate["policy"] = policy
            if params is not None:
                gate["params"] = dict(params)
            if references is not None:
                gate["references"] = {d: [float(v) for v in s] for d, s in references.items()}
            for key, fitted in (("router", router), ("shift", shift)):
                if fitted is None:
                    continue
                old = m.gate.get(key)
                if old and not self.backend.remote:  # superseded: kept for the grace period, counted from now
                    with contextlib.suppress(OSError):
                        os.utime(Path(self.root) / old)
                rel = self.backend.fresh(f"gate/{key}-{m.version + 1}.npz")
                buf = io.BytesIO()
                fitted.save(buf)
                self._write(rel, buf.getvalue())
                gate[key] = rel
            return self._commit(replace(m, version=m.version + 1, gate=gate, updated=_now()))

    def set_batching(self, config: Mapping[str, Any]) -> Manifest:
        """Replace the deck's batching settings (:func:`batching_config`); replicas take them with the next snapshot."""
        checked = batching_config(config)
        with self._locked() as m:
            return self._commit(replace(m, version=m.version + 1, batching=checked, updated=_now()))

    def set_calibration(self, images: np.ndarray) -> Manifest:
        """Store clean uint8 [N,H,W,3] images used to sign cards that arrive without a signature."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
            raise InvalidInput(
                f"calibration images must be uint8 [N,H,W,3] with N > 0, got {images.dtype} {images.shape}"
            )
        buf = io.BytesIO()
        np.savez(buf, images=images)
        with self._locked() as m:
            rel = self.backend.fresh(CALIBRATION)
            self._write(rel, buf.getvalue())
            return self._commit(replace(m, version=m.version + 1, calibration=rel, updated=_now()))


def _named(manifest: Manifest) -> set[str]:
    """The keys and card folders ``manifest`` names (what a sweep never removes)."""
    gate = {str(manifest.gate[k]) for k in GATE_FILES if manifest.gate.get(k)}
    return {c.path for c in manifest.cards} | gate | ({manifest.calibration} if manifest.calibration else set())


def _encode(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode()


__all__ = [
    "CALIBRATION",
    "DEBRIS_GRACE_S",
    "GATE_FILES",
    "MANIFEST",
    "READ_ONLY",
    "RESERVED_NAMES",
    "CardEntry",
    "DeckStore",
    "Manifest",
    "atomic_write",
    "batching_config",
    "check_contract",
    "check_runs",
    "read_card_meta",
]
