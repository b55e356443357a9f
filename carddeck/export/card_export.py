"""Export a CARD: torch -> ONNX -> compact format -> parity on real images -> CardMeta -> files.

Nothing is written unless parity holds (see :mod:`carddeck.export.parity`); the ONNX file and
``card.json`` are each written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carddeck.card import CardMeta
from carddeck.deck.cardfile import atomic_write, read_card
from carddeck.errors import CardRejected, InvalidInput
from carddeck.export.formats import QUANTIZED_FORMATS, format_for, to_binary, to_sparse
from carddeck.export.metadata import card_json_path, embed_meta, write_card_json
from carddeck.export.onnx_export import DEFAULT_OPSET, to_onnx
from carddeck.export.parity import ParityError, ParityPolicy, ParityReport, compare, onnx_logits, torch_logits

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "carddeck-card/1"


@dataclass(frozen=True)
class ExportReport:
    path: Path
    card_json: Path | None
    format: str
    meta: CardMeta
    size_bytes: int  # the written ONNX file
    dense_size_bytes: int  # the same network as a plain fp32 ONNX file (with the same metadata)
    parity: ParityReport
    details: dict[str, Any] = field(default_factory=dict)  # format statistics, notes

    @property
    def compression_ratio(self) -> float:
        return self.dense_size_bytes / self.size_bytes

    def summary(self) -> str:
        p = self.parity
        size = f"{self.size_bytes / 1024:.1f} KiB"
        if self.format != "dense":
            size += f", {self.compression_ratio:.2f}x smaller than dense fp32 {self.dense_size_bytes / 1024:.1f} KiB"
        lines = [
            f"wrote {self.path} ({self.format}, {size})",
            f"card {self.meta.key}: {self.meta.architecture}, {self.meta.compression.method}, "
            f"domain {self.meta.domain}",
            f"parity on {p.images} images: {p.reason}",
        ]
        lines += [f"{k}: {v}" for k, v in self.details.items()]
        if self.card_json is not None:
            lines.append(f"wrote {self.card_json}")
        return "\n".join(lines)


def as_float_nchw(images: np.ndarray, meta: CardMeta, what: str = "images") -> np.ndarray:
    """uint8 [N,H,W,C] (datasets) or float32 [N,C,H,W] in [0,1] -> float32 NCHW, checked against meta.input."""
    spec = meta.input
    images = np.asarray(images)
    if images.dtype == np.uint8 and images.ndim == 4:
        images = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    elif images.dtype != np.float32 or images.ndim != 4:
        raise InvalidInput(f"{what} must be uint8 [N,H,W,3] or float32 [N,3,H,W] in [0,1], got {images.dtype}")
    if images.shape[1:] != (spec.channels, spec.height, spec.width):
        raise InvalidInput(
            f"{what} have shape {list(images.shape[1:])} per image, card {meta.key} expects "
            f"[{spec.channels}, {spec.height}, {spec.width}]"
        )
    if len(images) == 0:
        raise InvalidInput(f"{what}: need at least one image")
    return np.ascontiguousarray(images)


def _with_signature(meta: CardMeta, images: np.ndarray | None) -> tuple[CardMeta, str]:
    if meta.signature is not None:
        return meta, "kept from the checkpoint"
    if images is None:
        return meta, "none (no uint8 training images given)"
    from carddeck.gating import domain_signature

    signature = domain_signature(meta.domain, images, seed=0)
    note = f"domain {meta.domain!r} on {len(images)} training images"
    return meta.replace(signature=tuple(float(v) for v in signature)), note


def export_model(
    model: Any,
    meta: CardMeta,
    out: Path,
    *,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    format: str | None = None,
    calibration: np.ndarray | None = None,
    signature_images: np.ndarray | None = None,
    policy: ParityPolicy | None = None,
    sparse_encoding: str = "bitmask",
    calibration_method: str = "minmax",
    opset: int = DEFAULT_OPSET,
    write_json: bool = True,
) -> ExportReport:
    """Export ``model`` (torch, float32 NCHW [0,1] in, logits out, normalization inside) as a card.

    ``images`` (and ``labels``): real validation images for the parity check; ``calibration``:
    images for int8 activation ranges (default: ``images``); ``signature_images``: uint8 NHWC
    training images for the domain signature. Raises ParityError (a CardRejected) and writes
    nothing when the ONNX card does not reproduce the torch model.
    """
    out = Path(out)
    if out.suffix != ".onnx":
        raise InvalidInput(f"output path must end in .onnx, got {out}")
    fmt = format_for(meta.compression.method, format)
    x = as_float_nchw(images, meta)
    if labels is not None and len(labels) != len(x):
        raise InvalidInput(f"{len(x)} parity images but {len(labels)} labels")
    spec = meta.input
    fp32 = to_onnx(model, spec.height, spec.width, spec.channels, opset=opset)
    n_out = fp32.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    if n_out not in (0, meta.num_classes):  # 0: not statically known; read_card checks the graph again
        raise CardRejected(f"the model outputs {n_out} logits, CardMeta says num_classes={meta.num_classes}")

    meta, note = _with_signature(meta, signature_images)
    details: dict[str, Any] = {"signature": note}
    if fmt == "sparse":
        compact, sstats = to_sparse(fp32, encoding=sparse_encoding)
        details["sparse"] = (
            f"{sstats.tensors} weights as {sparse_encoding}, {sstats.nonzeros}/{sstats.elements} nonzero "
            f"({100 * sstats.sparsity:.1f}% sparse)"
        )
        if sstats.tensors == 0:
            log.warning("sparse format: no weight is sparse enough to store compactly; file stays dense")
    elif fmt == "binary":
        cal = x if calibration is None else as_float_nchw(calibration, meta, "calibration images")
        compact, bstats = to_binary(fp32, cal, method=calibration_method)
        details["binary"] = (
            f"{bstats.exact_tensors} weights exactly int8 {{-1,0,+1}} x scale ({bstats.per_layer_scale} with one "
            f"scale per layer, the rest per output channel after BatchNorm folding), {bstats.other_tensors} other "
            f"int8 weights; activations uint8 calibrated ({calibration_method}) on {len(cal)} images"
        )
    else:
        compact = fp32

    embed_meta(fp32, meta)
    dense_size = len(fp32.SerializeToString())
    embed_meta(compact, meta)
    data = compact.SerializeToString()
    read_card(data)  # the file we are about to write must pass the loader's own checks

    report = compare(
        torch_logits(model, x),
        onnx_logits(data, x),
        labels,
        format=fmt,
        quantized=fmt in QUANTIZED_FORMATS,
        policy=policy,
    )
    if not report.passed:
        raise ParityError(report)
    atomic_write(out, data)
    json_path = None
    if write_json:
        json_path = card_json_path(out)
        write_card_json(meta, json_path)
    result = ExportReport(out, json_path, fmt, meta, len(data), dense_size, report, details)
    log.debug("%s", result.summary())
    return result


def load_checkpoint(checkpoint: Path) -> tuple[Any, CardMeta]:
    """Rebuild the torch model of ``DIR/card.pt`` (format carddeck-card/1) and its CardMeta."""
    from carddeck.compress.checkpoint import load_card  # the one reader of what compress writes

    model, meta, _ = load_card(checkpoint)
    return model, meta


NEAR_CHANCE = 2.0  # refuse below this multiple of chance accuracy (20% for 10 classes)


def _refuse_near_chance(model: Any, meta: CardMeta, val: Any, data: str) -> None:
    from carddeck.export.parity import torch_logits

    x = as_float_nchw(val.images, meta)
    accuracy = float((torch_logits(model, x).argmax(axis=1) == val.labels).mean())
    chance = 1.0 / meta.num_classes
    if accuracy < NEAR_CHANCE * chance:
        why = (
            "the card has not learned its own data: train it longer (carddeck compress --epochs)"
            if data == meta.provenance.dataset
            else f"this is not the data it was trained for (its CardMeta says {meta.provenance.dataset or 'nothing'})"
        )
        raise CardRejected(
            f"card {meta.key} scores {100 * accuracy:.2f}% on {data} val ({len(x)} images), near chance "
            f"({100 * chance:.1f}%): {why}, so a parity check on it would prove nothing"
        )


def export_card(
    checkpoint: Path,
    out: Path,
    *,
    data: str | None = None,
    format: str | None = None,
    policy: ParityPolicy | None = None,
    parity_images: int | None = None,
    calibration_images: int = 256,
    signature_images: int = 512,
    sparse_encoding: str = "bitmask",
    calibration_method: str = "minmax",
    opset: int = DEFAULT_OPSET,
) -> ExportReport:
    """Export ``checkpoint`` (card.pt or its directory) to ``out``, checking parity on ``data``'s val split.

    ``data`` defaults to the card's own dataset (CardMeta provenance); other data is announced on
    stderr. int8 calibration and the domain signature use (seeded subsets of) the train split. A
    card whose accuracy on the check data is near chance is refused: its parity would prove nothing.
    """
    from carddeck.data.datasets import data_for_cards, load_dataset

    model, meta = load_checkpoint(checkpoint)
    data = data_for_cards(data, [meta.provenance.dataset], f"card {meta.key}")
    val = load_dataset(data, "val")
    train = load_dataset(data, "train")
    if val.num_classes != meta.num_classes:
        raise InvalidInput(f"dataset {data!r} has {val.num_classes} classes, card {meta.key} has {meta.num_classes}")
    rng = np.random.default_rng(0)
    if parity_images is not None and parity_images < len(val):
        val = val.subset(np.sort(rng.choice(len(val), parity_images, replace=False)))
    cal = train.images[np.sort(rng.choice(len(train), min(calibration_images, len(train)), replace=False))]
    sig = train.images[np.sort(rng.choice(len(train), min(signature_images, len(train)), replace=False))]
    _refuse_near_chance(model, meta, val, data)
    return export_model(
        model,
        meta,
        out,
        images=val.images,
        labels=val.labels,
        format=format,
        calibration=cal,
        signature_images=sig,
        policy=policy,
        sparse_encoding=sparse_encoding,
        calibration_method=calibration_method,
        opset=opset,
    )


__all__ = ["CHECKPOINT_FORMAT", "ExportReport", "as_float_nchw", "export_card", "export_model", "load_checkpoint"]
