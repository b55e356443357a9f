"""The deck store: a directory of cards and a manifest, changed only by atomic writes.

Layout::

    ROOT/manifest.json                      deck version, cards (with sha256 of their files), gate
    ROOT/cards/<name>/<version>/model.onnx  the ONNX card (CardMeta in metadata_props)
    ROOT/cards/<name>/<version>/card.json   the same CardMeta
    ROOT/gate/router-<deck version>.npz     the calibrated router, when fitted
    ROOT/calibration.npz                    optional clean images to sign cards added without a signature
    ROOT/READ-ONLY                          present in the packaged default deck: every change is refused

The files live in a backend chosen by the location (:mod:`carddeck.deck.backend`: a directory, or
``s3://bucket/prefix``, one module per scheme). The manifest is :mod:`carddeck.deck.manifest`; every
change is a transaction that commits it last (:mod:`carddeck.deck.transactions`); what changes leave
behind is swept at every change and by :meth:`DeckStore.clean`, by the backend's rule
(:mod:`carddeck.deck.debris`). Remote card files are cached locally by sha256 (:mod:`carddeck.deck.cache`).
A deck serves the highest version of each card name; older versions stay until removed.
Adding a card that is already there with the same bytes answers it again (a retried add); other
bytes under the same name and version are a DeckConflict.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from carddeck.card import CardMeta
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
from carddeck.deck.manifest import (
    CALIBRATION,
    GATE_FILES,
    MANIFEST,
    META_FILE,
    MODEL_FILE,
    CardEntry,
    Manifest,
    batching_config,
    encode,
    input_to_dict,
    now,
    sha256,
)
from carddeck.deck.transactions import DEBRIS_GRACE_S, READ_ONLY, Transactions
from carddeck.errors import CardRejected, DeckConflict, InvalidInput

log = logging.getLogger(__name__)

RESERVED_NAMES = frozenset({"carddeck"})  # the deck's own model name in the Open Inference Protocol


class DeckStore(Transactions):
    """Read and change a deck (a directory or ``s3://bucket/prefix``). Changes commit the manifest last."""

    def __init__(self, root: Path | str, *, debris_grace_s: float = DEBRIS_GRACE_S) -> None:
        super().__init__(root, debris_grace_s=debris_grace_s)
        self._files = FileCache() if self.backend.remote else None  # remote card files cost a download
        self.last_add_was_new = True  # False when the last add_card found the same card already there

    @classmethod
    def create(cls, root: Path | str, *, exist_ok: bool = False) -> DeckStore:
        """An empty deck (version 0) at ``root``."""
        backend = open_backend(root)
        if backend.stamp(MANIFEST) is not None:
            if exist_ok:
                return cls(root)
            raise DeckConflict(f"{backend.root} already holds a deck")
        backend.commit(MANIFEST, encode(Manifest(version=0, updated=now())), expected=None)
        return cls(root)

    # -- reading ------------------------------------------------------------------------------
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
            self.debris.revive(rel)
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
                    updated=now(),
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
            for c in gone:
                self.debris.retire(c.path)
            self._commit(
                replace(
                    m,
                    version=m.version + 1,
                    cards=keep,
                    class_names=m.class_names if keep else (),
                    input=m.input if keep else None,
                    updated=now(),
                )
            )
        self.debris.retired(c.path for c in gone)
        return [c.key for c in gone]

    def set_gate(
        self,
        *,
        policy: str | None = None,
        params: Mapping[str, Any] | None = None,
        references: Mapping[str, tuple[float, ...]] | None = None,
        router: Any | None = None,
        shift: Any | None = None,
        calibration: np.ndarray | None = None,
    ) -> Manifest:
        """Change the default gate policy, its parameters, the domain references, the router, the
        shift detector (``carddeck.observability.shift.ShiftDetector``, saved beside the router) or the
        calibration images (see :meth:`set_calibration`): whatever is given, in one transaction."""
        from carddeck.gating.policies import POLICIES, GateParams

        if policy is not None:
            POLICIES.get(policy)  # InvalidInput listing the valid names
        if params is not None:
            GateParams.from_dict(params)
        images = None if calibration is None else _calibration_npz(calibration)
        with self._locked() as m:
            extra: dict[str, Any] = {}
            if images is not None:
                extra["calibration"] = self.backend.fresh(CALIBRATION)
                self._write(extra["calibration"], images)
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
                if old:
                    self.debris.supersede(old)
                rel = self.backend.fresh(f"gate/{key}-{m.version + 1}.npz")
                buf = io.BytesIO()
                fitted.save(buf)
                self._write(rel, buf.getvalue())
                gate[key] = rel
            return self._commit(replace(m, version=m.version + 1, gate=gate, updated=now(), **extra))

    def set_batching(self, config: Mapping[str, Any]) -> Manifest:
        """Replace the deck's batching settings (:func:`batching_config`); replicas take them with the next snapshot."""
        checked = batching_config(config)
        with self._locked() as m:
            return self._commit(replace(m, version=m.version + 1, batching=checked, updated=now()))

    def set_calibration(self, images: np.ndarray) -> Manifest:
        """Store clean uint8 [N,H,W,3] images used to sign cards that arrive without a signature."""
        return self.set_gate(calibration=images)


def _calibration_npz(images: np.ndarray) -> bytes:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise InvalidInput(f"calibration images must be uint8 [N,H,W,3] with N > 0, got {images.dtype} {images.shape}")
    buf = io.BytesIO()
    np.savez(buf, images=images)
    return buf.getvalue()


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
