"""A deck's input contract, checked in one place with one message: which images a deck accepts.

Every way in is checked here against the deck's :class:`~carddeck.card.InputSpec`: arrays given to the
Python API (:func:`prepare_images`), and tensors of every transport, whose declared datatype and shape
the codec (:mod:`carddeck.serving.codec`) checks with :func:`check_layout` before it reads their bytes.
Datatypes go by the Open Inference Protocol's names (numpy's uint8 and float32; carddeck.v1's
DTYPE_UINT8 and DTYPE_FLOAT32).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import numpy as np

from carddeck.card import InputSpec
from carddeck.errors import InvalidInput, TooLarge, shown

# the datatypes an images input may have (OIP names): uint8 NHWC (0..255) or float32 NCHW in the value range
IMAGE_DTYPES: dict[str, np.dtype] = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype(np.float32)}
_NAMES = {dtype: name for name, dtype in IMAGE_DTYPES.items()}


def accepted(spec: InputSpec) -> str:
    """What a deck of contract ``spec`` accepts: the one text every rejection of an images input ends with."""
    (lo, hi), c, h, w = spec.value_range, spec.channels, spec.height, spec.width
    return f"UINT8 [N, {h}, {w}, {c}] or FP32 [N, {c}, {h}, {w}] in [{lo:g}, {hi:g}]"


def check_layout(
    datatype: str,
    shape: Sequence[int],
    spec: InputSpec,
    *,
    fields: tuple[str, str] = ("images.dtype", "images.shape"),
    max_images: int | None = None,
) -> np.dtype:
    """Check an images tensor's datatype (an OIP name) and shape against ``spec`` before its values are read;
    its numpy dtype. ``fields``: how the caller's message names the datatype and the shape. More than
    ``max_images`` images is TooLarge."""
    dtype = IMAGE_DTYPES.get(datatype)
    c, h, w = spec.channels, spec.height, spec.width
    if (
        dtype is not None
        and len(shape) == 4
        and 0 < shape[0] <= (shape[0] if max_images is None else max_images)
        and tuple(shape[1:]) == ((h, w, c) if datatype == "UINT8" else (c, h, w))
    ):
        return dtype  # every request that is right pays only this (the messages below are built on refusal)
    _refuse(datatype, [int(d) for d in shape], spec, fields, max_images)


def _refuse(
    datatype: str, shape: list[int], spec: InputSpec, fields: tuple[str, str], max_images: int | None
) -> NoReturn:
    """Raise the error that names what is wrong with a tensor :func:`check_layout` refused."""
    dtype_field, shape_field = fields
    send = accepted(spec)
    if datatype not in IMAGE_DTYPES:
        raise InvalidInput(f"{dtype_field}: {shown(datatype)} is not accepted; send {send}")
    if len(shape) != 4:
        raise InvalidInput(f"{shape_field}: expected 4 dimensions ({send}), got {shown(shape)}")
    if shape[0] == 0:
        raise InvalidInput(f"{shape_field}: empty batch; send at least one image ({send})")
    if any(d <= 0 for d in shape):
        raise InvalidInput(f"{shape_field}: every dimension must be positive ({send}), got {shown(shape)}")
    if max_images is not None and shape[0] > max_images:
        raise TooLarge(f"{shape_field}: {shape[0]} images in one request; the server accepts at most {max_images}")
    raise InvalidInput(f"{shape_field}: {datatype} {shown(shape)} is not this deck's input; send {send}")


def prepare_images(images: object, spec: InputSpec) -> np.ndarray:
    """Check ``images`` against the input contract and return float32 [N, C, H, W] in the value range.

    Accepted: uint8 [N, H, W, C] (0..255, scaled to the value range) or float32 [N, C, H, W] in the range.
    """
    if not isinstance(images, np.ndarray):
        raise InvalidInput(f"images: expected a numpy array ({accepted(spec)}), got {type(images).__name__}")
    c, h, w = spec.channels, spec.height, spec.width
    lo, hi = spec.value_range
    check_layout(_NAMES.get(images.dtype) or str(images.dtype), images.shape, spec)
    if images.dtype == np.uint8:
        out = np.empty((len(images), c, h, w), np.float32)
        out[...] = images.transpose(0, 3, 1, 2)  # one strided pass; astype-then-copy is ~7x slower
        out *= np.float32((hi - lo) / 255.0)
        if lo:
            out += np.float32(lo)
        return out
    if not np.isfinite(images).all():
        raise InvalidInput(f"images: NaN or infinite values; send {accepted(spec)}")
    vmin, vmax = float(images.min()), float(images.max())
    if vmin < lo or vmax > hi:
        # float32 digits, so that 1 + 1 ulp does not read as [1, 1]
        raise InvalidInput(f"images: values in [{vmin:.9g}, {vmax:.9g}] are out of range; send {accepted(spec)}")
    return np.ascontiguousarray(images)


__all__ = ["IMAGE_DTYPES", "accepted", "check_layout", "prepare_images"]
