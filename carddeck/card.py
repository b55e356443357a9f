"""CardMeta: the contract of one CARD.

One versioned schema, stored both in the ONNX file's ``metadata_props`` (key ``carddeck.card``)
and beside it as ``card.json``. Parsing is strict: an unknown or missing field raises
``InvalidInput`` naming the field's path, so a typo in a hand-edited card.json never passes silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

from carddeck.catalog import method_names
from carddeck.errors import InvalidInput

SCHEMA_VERSION = 2
# Schema 2 added the optional ``compression.allocation`` and ``compression.layer_sparsity``
# (lobs, dsa); a schema-1 card lacks them and still reads, with both null.
READABLE_SCHEMA_VERSIONS = (1, 2)
METADATA_KEY = "carddeck.card"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # always fullmatch: "$" also matches before a final "\n"
LAYOUTS = ("NCHW",)


@dataclass(frozen=True)
class InputSpec:
    """What the ONNX graph's ``images`` input expects (normalization happens inside the graph)."""

    height: int
    width: int
    channels: int = 3
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"


@dataclass(frozen=True)
class Compression:
    method: str = "dense"  # a declared compression method (carddeck.catalog)
    sparsity: float = 0.0  # fraction of prunable weights (or filters, when structured) removed
    weight_bits: int = 32
    structured: bool = False
    # schema 2: how the sparsity was spread over the layers (lobs, dsa), else null.
    # ``allocation``: "uniform", "global", or DSA's discovered function (an expression over per-layer
    # statistics); ``layer_sparsity``: the fraction pruned of each conv/linear layer, in
    # ``named_modules`` order (carddeck.nets.prunable_modules).
    allocation: str | None = field(default=None, metadata={"omit_null": True})
    layer_sparsity: tuple[float, ...] | None = field(default=None, metadata={"omit_null": True})


@dataclass(frozen=True)
class Accuracy:
    """Measured accuracies in [0, 1]; ``None`` where not measured."""

    clean: float | None = None
    corrupted: float | None = None
    split: str = ""  # which data they were measured on, e.g. "digits32:val"


@dataclass(frozen=True)
class Provenance:
    dataset: str = ""
    seed: int | None = None
    package_version: str = ""
    created: str = ""  # ISO-8601 UTC


@dataclass(frozen=True)
class CardMeta:
    name: str
    version: int
    architecture: str
    num_classes: int
    class_names: tuple[str, ...]
    input: InputSpec
    compression: Compression
    domain: str
    signature: tuple[float, ...] | None = None
    accuracy: Accuracy = field(default_factory=Accuracy)
    provenance: Provenance = field(default_factory=Provenance)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check(self)

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "CardMeta") -> CardMeta:
        return _from_plain(cls, data, source)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "CardMeta") -> CardMeta:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=source)

    def replace(self, **changes: Any) -> CardMeta:
        return dataclasses.replace(self, **changes)

    @property
    def key(self) -> str:
        """``name/version``, the card's identity in a deck."""
        return f"{self.name}/{self.version}"


def _check(meta: CardMeta) -> None:
    def bad(field_name: str, why: str) -> InvalidInput:
        return InvalidInput(f"CardMeta field {field_name!r}: {why}")

    if meta.schema_version not in READABLE_SCHEMA_VERSIONS:
        raise bad("schema_version", f"got {meta.schema_version}, this version reads {READABLE_SCHEMA_VERSIONS}")
    if not NAME_PATTERN.fullmatch(meta.name):
        raise bad("name", f"{meta.name!r} must match {NAME_PATTERN.pattern} (lowercase, digits, '-', '_')")
    if meta.version < 1:
        raise bad("version", f"must be a positive integer, got {meta.version}")
    if meta.num_classes < 2:
        raise bad("num_classes", f"must be at least 2, got {meta.num_classes}")
    if len(meta.class_names) != meta.num_classes:
        raise bad("class_names", f"has {len(meta.class_names)} names for num_classes={meta.num_classes}")
    spec = meta.input
    if min(spec.height, spec.width, spec.channels) < 1:
        raise bad("input", f"height, width and channels must be positive, got {spec}")
    if len(spec.mean) != spec.channels or len(spec.std) != spec.channels:
        raise bad("input.mean/std", f"need one value per channel ({spec.channels})")
    if any(s <= 0 for s in spec.std):
        raise bad("input.std", "must be positive")
    if spec.layout not in LAYOUTS:
        raise bad("input.layout", f"{spec.layout!r} is not one of {LAYOUTS}")
    comp = meta.compression
    if comp.method not in method_names():
        raise bad("compression.method", f"{comp.method!r} is not one of {method_names()}")
    if not 0.0 <= comp.sparsity < 1.0:
        raise bad("compression.sparsity", f"must be in [0, 1), got {comp.sparsity}")
    if comp.layer_sparsity is not None and not all(0.0 <= v <= 1.0 for v in comp.layer_sparsity):
        # 1.0 is possible: a global allocation may empty a layer
        raise bad("compression.layer_sparsity", "every layer's sparsity must be in [0, 1]")
    if meta.schema_version < 2 and (comp.allocation is not None or comp.layer_sparsity is not None):
        raise bad("compression.allocation", "allocation and layer_sparsity need schema_version 2")
    if comp.weight_bits not in (1, 2, 4, 8, 16, 32):
        raise bad("compression.weight_bits", f"must be one of 1, 2, 4, 8, 16, 32, got {comp.weight_bits}")
    if not meta.domain:
        raise bad("domain", "must name the augmentation domain the card was trained under")
    if meta.signature is not None and (not meta.signature or not all(math.isfinite(v) for v in meta.signature)):
        raise bad("signature", "must be a non-empty list of finite numbers or null")
    for name in ("clean", "corrupted"):
        value = getattr(meta.accuracy, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise bad(f"accuracy.{name}", f"must be in [0, 1] or null, got {value}")


# -- strict dataclass <-> plain JSON conversion ----------------------------------------------------
_D = TypeVar("_D")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: _to_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.metadata.get("omit_null") and getattr(obj, f.name) is None)  # schema-1 JSON stays as it was
        }
    if isinstance(obj, tuple | list):
        return [_to_plain(v) for v in obj]
    return obj


def _from_plain(cls: type[_D], data: Any, path: str) -> _D:
    if not isinstance(data, dict):
        raise InvalidInput(f"{path}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InvalidInput(f"{path}: unknown field {unknown[0]!r}; known fields: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                raise InvalidInput(f"{path}: missing required field {name!r}")
            continue
        kwargs[name] = _convert(hints[name], data[name], f"{path}.{name}")
    try:
        return cls(**kwargs)
    except InvalidInput as exc:
        raise InvalidInput(f"{path}: {exc}") from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise InvalidInput(f"{path}: must not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if dataclasses.is_dataclass(tp):
        return _from_plain(tp, value, path)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list):
            raise InvalidInput(f"{path}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        item = args[0]
        if len(args) == 2 and args[1] is not Ellipsis:  # fixed-length pair
            if len(value) != 2:
                raise InvalidInput(f"{path}: expected 2 values, got {len(value)}")
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise InvalidInput(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise InvalidInput(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {tp!r} at {path}")  # a schema bug, not user input


__all__ = [
    "METADATA_KEY",
    "NAME_PATTERN",
    "READABLE_SCHEMA_VERSIONS",
    "SCHEMA_VERSION",
    "Accuracy",
    "CardMeta",
    "Compression",
    "InputSpec",
    "Provenance",
]
