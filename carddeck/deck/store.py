"""The deck store: a directory of cards and a manifest, changed only by atomic writes.

Layout::

    ROOT/manifest.json                      deck version, cards (with sha256 of their files), gate
    ROOT/cards/<name>/<version>/model.onnx  the ONNX card (CardMeta in metadata_props)
    ROOT/cards/<name>/<version>/card.json   the same CardMeta
    ROOT/gate/router-<deck version>.npz     the calibrated router, when fitted
    ROOT/calibration.npz                    optional clean images to sign cards added without a signature

Every file is written to a temporary name, flushed, fsynced and renamed into place; the manifest is
written last, so a crash at any point leaves the previous manifest, which names only complete files.
Files no manifest names (from an interrupted add) are harmless and overwritten by the next add.
Writers take an exclusive ``flock`` on ``ROOT/.lock``; readers never lock. ``manifest()`` re-reads
the file only when its inode, size or mtime changed, so replicas can poll the version cheaply.
A deck serves the highest version of each card name; older versions stay until removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from carddeck.card import METADATA_KEY, CardMeta, InputSpec
from carddeck.deck.cardfile import atomic_write, check_contract, check_runs, read_card_bytes, read_card_meta
from carddeck.errors import CardNotFound, CardRejected, DeckConflict, InvalidInput

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "carddeck-deck/1"
CALIBRATION = "calibration.npz"
MODEL_FILE = "model.onnx"
META_FILE = "card.json"


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "updated": self.updated,
            "class_names": list(self.class_names),
            "input": dict(self.input) if self.input is not None else None,
            "gate": dict(self.gate),
            "calibration": self.calibration,
            "cards": [c.to_dict() for c in self.cards],
        }

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
        have = ", ".join(c.key for c in self.cards) or "none"
        want = name if version is None else f"{name}/{version}"
        raise CardNotFound(f"no card {want!r} in the deck (cards: {have})")


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
    """Read and change a deck directory. Methods that change it take the store lock."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if not (self.root / MANIFEST).is_file():
            raise InvalidInput(f"{self.root} is not a deck: no {MANIFEST} (create one with `DeckStore.create(root)`)")
        self._cache: tuple[tuple[int, int, int], Manifest] | None = None

    @classmethod
    def create(cls, root: Path | str, *, exist_ok: bool = False) -> DeckStore:
        """An empty deck (version 0) at ``root``."""
        root = Path(root)
        if (root / MANIFEST).exists():
            if exist_ok:
                return cls(root)
            raise DeckConflict(f"{root} already holds a deck")
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(root / MANIFEST, _encode(Manifest(version=0, updated=_now())))
        return cls(root)

    # -- reading ------------------------------------------------------------------------------
    def manifest(self) -> Manifest:
        path = self.root / MANIFEST
        try:
            st = os.stat(path)
        except OSError as exc:
            raise InvalidInput(f"{self.root} is not a deck: {exc.strerror}") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._cache is not None and self._cache[0] == stamp:
            return self._cache[1]
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"{path}: unreadable manifest ({exc})") from None
        manifest = Manifest.from_dict(data, str(path))
        self._cache = (stamp, manifest)
        return manifest

    @property
    def version(self) -> int:
        return self.manifest().version

    def card_dir(self, entry: CardEntry) -> Path:
        return self.root / entry.path

    def read_meta(self, entry: CardEntry) -> CardMeta:
        path = self.card_dir(entry) / META_FILE
        try:
            return CardMeta.from_json(path.read_bytes(), source=str(path))
        except OSError as exc:
            raise CardRejected(f"card {entry.key}: cannot read {path}: {exc.strerror}") from None

    def list_cards(self, *, all_versions: bool = False) -> list[CardMeta]:
        """CardMeta of the served cards (the highest version of each name), or of every stored version."""
        m = self.manifest()
        return [self.read_meta(e) for e in (m.cards if all_versions else m.active())]

    def read_model(self, entry: CardEntry, *, verify: bool = True) -> bytes:
        path = self.card_dir(entry) / MODEL_FILE
        data = path.read_bytes()
        if verify and sha256(data) != entry.sha256.get(MODEL_FILE):
            raise CardRejected(f"card {entry.key}: {path} does not match the sha256 in the manifest")
        return data

    def calibration_images(self) -> np.ndarray | None:
        m = self.manifest()
        if not m.calibration:
            return None
        with np.load(self.root / m.calibration, allow_pickle=False) as z:
            return np.asarray(z["images"])

    # -- changing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[Manifest]:
        with open(self.root / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._cache = None
                yield self.manifest()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _commit(self, manifest: Manifest) -> Manifest:
        atomic_write(self.root / MANIFEST, _encode(manifest))
        self._cache = None
        log.info("deck %s: version %d (%d cards)", self.root, manifest.version, len(manifest.cards))
        return manifest

    def add_card(self, model: bytes | Path | str, *, calibration: np.ndarray | None = None) -> CardMeta:
        """Validate an ONNX card and add it. Returns its CardMeta (with the signature it is served with).

        CardRejected: unreadable ONNX, fails onnx.checker, bad CardMeta, graph digest mismatch, contract
        mismatch (all from :func:`carddeck.deck.cardfile.read_card`), ONNX Runtime cannot run it, no
        signature and nothing to compute one from. DeckConflict: name/version already there, classes
        or input size differ from the deck's cards.
        """
        proto, meta, data = read_card_bytes(model)
        check_runs(data, meta)
        with self._locked() as m:
            if any(c.name == meta.name and c.version == meta.version for c in m.cards):
                raise DeckConflict(f"card {meta.key} is already in the deck; bump its version to replace it")
            if m.class_names and tuple(meta.class_names) != tuple(m.class_names):
                raise DeckConflict(
                    f"card {meta.key} has {meta.num_classes} classes {list(meta.class_names)[:5]}..., the deck has "
                    f"{len(m.class_names)} classes {list(m.class_names)[:5]}...; every card must share the classes"
                )
            if m.input is not None and input_to_dict(meta.input) != dict(m.input):
                raise DeckConflict(
                    f"card {meta.key} takes input {input_to_dict(meta.input)}, the deck's cards take {dict(m.input)}"
                )
            if meta.signature is None:
                images = calibration if calibration is not None else self.calibration_images()
                if images is None:
                    raise CardRejected(
                        f"card {meta.key} has no spectral signature and none can be computed: pass calibration "
                        f"images (clean uint8 [N,H,W,3]) or store {CALIBRATION} in the deck"
                    )
                from carddeck.gating.signature import domain_signature

                meta = meta.replace(signature=domain_signature(meta.domain, images, seed=0))
                # replace only the CardMeta: other props (the graph digest) stay valid, the graph is unchanged
                for prop in proto.metadata_props:
                    if prop.key == METADATA_KEY:
                        prop.value = meta.to_json()
                data = proto.SerializeToString()
            signature = meta.signature or ()
            others = [self.read_meta(e) for e in m.active() if e.name != meta.name]
            dims = {len(o.signature) for o in others if o.signature is not None}
            if dims and len(signature) not in dims:
                raise CardRejected(
                    f"card {meta.key}: signature has {len(signature)} values, the deck's cards have {dims.pop()}"
                )
            rel = f"cards/{meta.name}/{meta.version}"
            meta_bytes = meta.to_json().encode()
            atomic_write(self.root / rel / MODEL_FILE, data)
            atomic_write(self.root / rel / META_FILE, meta_bytes)
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
        log.info("deck %s: added card %s (domain %s)", self.root, meta.key, meta.domain)
        return meta

    def remove_card(self, name: str, version: int | None = None) -> list[str]:
        """Remove one version of a card, or every version when ``version`` is None. CardNotFound if absent.

        The manifest is rewritten first, then the files are deleted (a crash in between leaves
        unreferenced files, never a manifest naming missing ones). Returns the removed keys.
        """
        with self._locked() as m:
            gone = [c for c in m.cards if c.name == name and (version is None or c.version == version)]
            if not gone:
                m.find(name, version)  # raises CardNotFound naming what is there
            keep = tuple(c for c in m.cards if c not in gone)
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
        for c in gone:
            shutil.rmtree(self.card_dir(c), ignore_errors=True)
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
        shift detector (``carddeck.server.shift.ShiftDetector``, saved beside the router)."""
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
                if fitted is not None:
                    rel = f"gate/{key}-{m.version + 1}.npz"
                    buf = io.BytesIO()
                    fitted.save(buf)
                    atomic_write(self.root / rel, buf.getvalue())
                    gate[key] = rel
            return self._commit(replace(m, version=m.version + 1, gate=gate, updated=_now()))

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
            atomic_write(self.root / CALIBRATION, buf.getvalue())
            return self._commit(replace(m, version=m.version + 1, calibration=CALIBRATION, updated=_now()))


def _encode(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode()


__all__ = [
    "CALIBRATION",
    "MANIFEST",
    "CardEntry",
    "DeckStore",
    "Manifest",
    "atomic_write",
    "check_contract",
    "check_runs",
    "read_card_meta",
]
