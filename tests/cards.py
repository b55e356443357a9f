"""Tiny but real ONNX cards for tests that need a deck without training one.

A card here is a seeded linear classifier over the normalized pixels, built with onnx.helper and
following the card contract (input ``images`` float32 [N,3,H,W] in [0,1], normalization inside the
graph, output ``logits`` [N,C], dynamic batch, CardMeta in metadata_props).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from carddeck.card import METADATA_KEY, Accuracy, CardMeta, Compression, InputSpec, Provenance


def tiny_meta(
    name: str = "tiny",
    *,
    version: int = 1,
    domain: str = "clean",
    num_classes: int = 10,
    size: int = 32,
    signature: tuple[float, ...] | None = None,
) -> CardMeta:
    return CardMeta(
        name=name,
        version=version,
        architecture="linear",
        num_classes=num_classes,
        class_names=tuple(str(i) for i in range(num_classes)),
        input=InputSpec(height=size, width=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        compression=Compression(),
        domain=domain,
        signature=signature,
        accuracy=Accuracy(),
        provenance=Provenance(dataset="synthetic", seed=0),
    )


def tiny_card(meta: CardMeta, *, seed: int = 0) -> onnx.ModelProto:
    """A real ONNX model honouring ``meta``'s input contract, with seeded random weights."""
    spec = meta.input
    features = spec.channels * spec.height * spec.width
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((features, meta.num_classes)) / np.sqrt(features)).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(spec.mean, np.float32).reshape(1, -1, 1, 1), "mean"),
        numpy_helper.from_array(np.array(spec.std, np.float32).reshape(1, -1, 1, 1), "std"),
        numpy_helper.from_array(weight, "weight"),
        numpy_helper.from_array(rng.standard_normal(meta.num_classes).astype(np.float32) * 0.1, "bias"),
    ]
    nodes = [
        helper.make_node("Sub", ["images", "mean"], ["centered"]),
        helper.make_node("Div", ["centered", "std"], ["normalized"]),
        helper.make_node("Flatten", ["normalized"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        meta.name,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", spec.channels, spec.height, spec.width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", meta.num_classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {METADATA_KEY: meta.to_json()})
    onnx.checker.check_model(model)
    return model


def tiny_card_bytes(meta: CardMeta, *, seed: int = 0) -> bytes:
    return tiny_card(meta, seed=seed).SerializeToString()
