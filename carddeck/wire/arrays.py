"""carddeck.v1 Tensor and Matrix messages <-> numpy arrays: what client and server both convert."""

from __future__ import annotations

import numpy as np

from carddeck.errors import InvalidInput
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb


def tensor_from_images(images: np.ndarray) -> pb.Tensor:
    """uint8 images as they are, floating-point ones as float32; anything else is refused here, by its own
    dtype (as float32 the server would name a dtype the caller never sent)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return pb.Tensor(dtype=pb.DTYPE_UINT8, shape=images.shape, data=np.ascontiguousarray(images).tobytes())
    if images.dtype.kind != "f":
        raise InvalidInput(
            f"images: dtype {images.dtype} is not accepted; send uint8 [N, H, W, 3] (0..255) "
            "or float32 [N, 3, H, W] in [0, 1]"
        )
    arr = np.ascontiguousarray(images, dtype="<f4")
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=arr.shape, data=arr.tobytes())


def matrix(values: np.ndarray) -> pb.Matrix:
    arr = np.ascontiguousarray(values, dtype="<f4")
    if arr.ndim != 2:
        arr = arr.reshape(len(arr), -1)
    return pb.Matrix(rows=arr.shape[0], cols=arr.shape[1], data=arr.tobytes())


def from_matrix(m: pb.Matrix) -> np.ndarray:
    return np.frombuffer(m.data, dtype="<f4").reshape(m.rows, m.cols).astype(np.float32)


__all__ = ["from_matrix", "matrix", "tensor_from_images"]
