"""The deck's table of contents (``manifest.json``): its card entries, its gate, and how it is encoded.

The manifest is the one file a change commits, last; everything else in the deck is named by it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from carddeck.card import InputSpec
from carddeck.errors import CardNotFound, InvalidInput

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "carddeck-deck/1"
CALIBRATION = "calibration.npz"
MODEL_FILE = "model.onnx"
META_FILE = "card.json"
GATE_FILES = ("router", "shift")  # manifest.gate keys that name fitted files under gate/ (set_gate writes them)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def input_to_dict(spec: InputSpec) -> dict[str, Any]:
    return {
        "height": spec.height,
        "width": spec.width,
        "channels": spec.channels,
        "value_range": list(spec.value_range),
        "layout": spec.layout,
    }


def named(manifest: Manifest) -> set[str]:
    """The keys and card folders ``manifest`` names (what a sweep never removes)."""
    gate = {str(manifest.gate[k]) for k in GATE_FILES if manifest.gate.get(k)}
    return {c.path for c in manifest.cards} | gate | ({manifest.calibration} if manifest.calibration else set())


def encode(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode()


__all__ = [
    "CALIBRATION",
    "GATE_FILES",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "META_FILE",
    "MODEL_FILE",
    "CardEntry",
    "Manifest",
    "batching_config",
    "encode",
    "input_to_dict",
    "named",
    "now",
    "sha256",
]
