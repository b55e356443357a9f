"""Compact weight formats for exported cards, chosen by what the card is.

- ``dense``: fp32 initializers as exported (dense cards, and filter-pruned cards, which are already the
  physically smaller network).
- ``sparse`` (LRR): each mostly-zero fp32 weight is stored losslessly as a packed bit mask (1 bit per
  weight) plus its nonzero values, and rebuilt by a small constant subgraph (BitShift, Mod, CumSum,
  Gather, Reshape) that ONNX Runtime folds once at session load. ONNX's own ``sparse_initializer``
  (encoding ``sparse-initializer``) also loads in ORT, but the ONNX spec requires int64 indices:
  4 + 8 bytes per nonzero makes it only ~3.3x smaller than dense at 90% sparsity, against ~6x for the
  mask (resnet20). Both are lossless; neither is faster at run time (ORT densifies either way).
- ``binary`` (biprop): QDQ int8 via onnxruntime.quantization (U8 activations calibrated on real images,
  S8 weights), then every ternary weight is rewritten exactly: int8 in {-1, 0, +1} with the weight's
  own magnitude as scale (one per layer; one per output channel where export folded BatchNorm's
  per-channel scale into the weights). Weights of magnitude 1 also keep the U8xS8 products of
  CPUs without VNNI far from int16 saturation. Logits stay float (no output Q/DQ pair), and internal
  tensor names are shortened (the quantizer's long names are ~10% of an int8 resnet20 file).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from carddeck.catalog import method_specs
from carddeck.errors import InvalidInput

log = logging.getLogger(__name__)

FORMATS = ("dense", "sparse", "binary")
SPARSE_ENCODINGS = ("bitmask", "sparse-initializer")
QUANTIZED_FORMATS = ("binary",)


def formats_for(method: str) -> tuple[str, ...]:
    """The formats a card of ``method`` may be written in, its own first. Dense and sparse are lossless for any
    card (sparse stores only what is sparse enough); binary rewrites ternary weights exactly and quantizes the
    rest to int8, so it belongs to the methods whose weights are binary: on others it is plain int8
    quantization under a CardMeta that says 32-bit weights."""
    specs = method_specs()  # each method declares how its cards are stored
    if method not in specs:
        raise InvalidInput(f"no export format for compression method {method!r}; known: {', '.join(specs)}")
    own = specs[method].export_format
    return (own, *(f for f in FORMATS if f != own and f not in QUANTIZED_FORMATS))


def format_for(method: str, requested: str | None = None) -> str:
    """The format to write: ``requested`` when given (checked against what applies to ``method``), else the
    one ``method`` declares."""
    if requested in (None, "auto"):
        return formats_for(method)[0]
    if requested not in FORMATS:
        raise InvalidInput(f"unknown export format {requested!r}; valid formats: auto, {', '.join(FORMATS)}")
    applicable = formats_for(method)
    if requested not in applicable:
        raise InvalidInput(
            f"--format {requested} does not apply to a {method!r} card (its weights are not binary); "
            f"formats for it: auto ({applicable[0]}), {', '.join(applicable)}"
        )
    return requested


# -- sparse ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseStats:
    tensors: int  # weights stored compactly
    elements: int  # their elements
    nonzeros: int  # their nonzero elements

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.elements if self.elements else 0.0


def _encoded_bytes(size: int, nonzeros: int, encoding: str) -> float:
    if encoding == "bitmask":
        return size / 8 + 4 * (nonzeros + 1)
    return 12 * nonzeros  # float32 value + int64 index


def _candidates(
    model: onnx.ModelProto, min_elements: int, min_sparsity: float, encoding: str
) -> Iterator[tuple[int, np.ndarray]]:
    """fp32 initializers sparse enough that ``encoding`` stores them in fewer bytes than dense."""
    for i, init in enumerate(model.graph.initializer):
        if init.data_type != TensorProto.FLOAT or init.data_location == TensorProto.EXTERNAL:
            continue
        arr = numpy_helper.to_array(init)
        nnz = int(np.count_nonzero(arr))
        if (
            arr.size >= min_elements
            and nnz <= (1.0 - min_sparsity) * arr.size
            and _encoded_bytes(arr.size, nnz, encoding) < 4 * arr.size
        ):
            yield i, arr


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def to_sparse(
    model: onnx.ModelProto,
    *,
    encoding: str = "bitmask",
    min_elements: int = 128,
    min_sparsity: float = 0.3,
) -> tuple[onnx.ModelProto, SparseStats]:
    """A copy of ``model`` whose mostly-zero fp32 initializers are stored compactly and losslessly."""
    if encoding not in SPARSE_ENCODINGS:
        raise InvalidInput(f"unknown sparse encoding {encoding!r}; valid: {', '.join(SPARSE_ENCODINGS)}")
    if _opset(model) < 11:
        raise InvalidInput(f"sparse export needs opset >= 11 (BitShift, CumSum), model has {_opset(model)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    chosen = list(_candidates(out, min_elements, min_sparsity, encoding))
    decode_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    nnz_total = elements = 0
    if chosen and encoding == "bitmask":
        new_inits += [
            numpy_helper.from_array(np.arange(8, dtype=np.uint8), "carddeck_bit_shifts"),
            numpy_helper.from_array(np.array([2], dtype=np.uint8), "carddeck_two_u8"),
            numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "carddeck_col_shape"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "carddeck_flat_shape"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "carddeck_zero_i64"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "carddeck_axis0"),
        ]
    for _, arr in chosen:
        elements += arr.size
        nnz_total += int(np.count_nonzero(arr))
    for index, arr in sorted(chosen, key=lambda t: -t[0]):  # delete from the back so indices stay valid
        name = graph.initializer[index].name
        del graph.initializer[index]
        flat = arr.reshape(-1)
        nz = np.flatnonzero(flat)
        if encoding == "sparse-initializer":
            sparse_values = numpy_helper.from_array(flat[nz].astype(np.float32), name)
            indices = numpy_helper.from_array(nz.astype(np.int64), f"{name}_indices")
            graph.sparse_initializer.append(helper.make_sparse_tensor(sparse_values, indices, list(arr.shape)))
            continue
        p = f"{name}_cd"
        mask = np.packbits(flat != 0, bitorder="little")  # bit j of byte i <-> element 8i+j
        # values[0] = 0 so position 0 of the gather is the zero every masked element reads
        values = np.concatenate([np.zeros(1, np.float32), flat[nz].astype(np.float32)])
        new_inits += [
            numpy_helper.from_array(mask, f"{p}_mask"),
            numpy_helper.from_array(values, f"{p}_values"),
            numpy_helper.from_array(np.array([arr.size], dtype=np.int64), f"{p}_size"),
            numpy_helper.from_array(np.array(arr.shape, dtype=np.int64), f"{p}_shape"),
        ]
        decode_nodes += [
            helper.make_node("Reshape", [f"{p}_mask", "carddeck_col_shape"], [f"{p}_col"]),
            helper.make_node("BitShift", [f"{p}_col", "carddeck_bit_shifts"], [f"{p}_shifted"], direction="RIGHT"),
            helper.make_node("Mod", [f"{p}_shifted", "carddeck_two_u8"], [f"{p}_bits8"]),
            helper.make_node("Reshape", [f"{p}_bits8", "carddeck_flat_shape"], [f"{p}_bitsflat"]),
            helper.make_node("Slice", [f"{p}_bitsflat", "carddeck_zero_i64", f"{p}_size"], [f"{p}_bits"]),
            helper.make_node("Cast", [f"{p}_bits"], [f"{p}_bits64"], to=TensorProto.INT64),
            helper.make_node("CumSum", [f"{p}_bits64", "carddeck_axis0"], [f"{p}_rank"]),
            helper.make_node("Mul", [f"{p}_rank", f"{p}_bits64"], [f"{p}_index"]),
            helper.make_node("Gather", [f"{p}_values", f"{p}_index"], [f"{p}_flat"], axis=0),
            helper.make_node("Reshape", [f"{p}_flat", f"{p}_shape"], [name]),
        ]
    graph.initializer.extend(new_inits)
    if decode_nodes:  # the decoders run first: every consumer of a weight comes after them
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(decode_nodes + nodes)
    onnx.checker.check_model(out)
    return out, SparseStats(len(chosen), elements, nnz_total)


# -- binary (int8 QDQ) -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BinaryStats:
    exact_tensors: int  # weights rewritten as exactly {-1, 0, +1} x scale
    other_tensors: int  # quantized weights that were not ternary (kept as ORT quantized them, lossy)
    per_layer_scale: int  # exact tensors with one scale for the whole layer (the rest: per output channel)


def ternary_scales(w: np.ndarray, axis: int) -> np.ndarray | None:
    """Per-slice (along ``axis``) magnitude when every nonzero of ``w`` in a slice has the same |value|."""
    moved = np.moveaxis(np.abs(w), axis, 0).reshape(w.shape[axis], -1)
    scales = moved.max(axis=1)
    ok = np.all((moved == 0) | (moved == scales[:, None]))
    return scales.astype(np.float32) if ok else None


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over float32 NCHW batches."""

    def __init__(self, images: np.ndarray, batch: int) -> None:
        # equal batches only: ORT's histogram calibrators (percentile, entropy) fail on a short last one
        batch = min(batch, len(images))
        self._batches = iter([images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self._batches, None)
        return None if b is None else {"images": b}


CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def to_binary(
    model: onnx.ModelProto, calibration: np.ndarray, *, calibration_batch: int = 32, method: str = "minmax"
) -> tuple[onnx.ModelProto, BinaryStats]:
    """Int8 QDQ copy of ``model``; calibration: float32 [N,3,H,W] in [0,1] real images.

    ``method`` sets the activation ranges: "minmax" (observed range), "percentile" (99.999th
    percentile, clips rare outliers for finer steps) or "entropy" (KL-optimal clipping).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
    if method not in methods:
        raise InvalidInput(f"unknown calibration method {method!r}; valid: {', '.join(methods)}")
    if calibration.dtype != np.float32 or calibration.ndim != 4 or len(calibration) == 0:
        raise InvalidInput(f"calibration images must be float32 [N,3,H,W] with N > 0, got {calibration.dtype}")
    with tempfile.TemporaryDirectory(prefix="carddeck-quant-") as tmp:
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "q.onnx")
        onnx.save(model, src)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        pre_model = onnx.load(pre)
        quantize_static(
            str(pre),
            str(dst),
            _Reader(calibration, calibration_batch),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=getattr(CalibrationMethod, methods[method]),
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        qmodel = onnx.load(dst)
    stats = _exact_ternary(qmodel, pre_model)
    _float_outputs(qmodel)
    shorten_names(qmodel)
    onnx.checker.check_model(qmodel)
    return qmodel, stats


def shorten_names(model: onnx.ModelProto) -> None:
    """Rename internal tensors to short ids and drop node names and value_info.

    The quantizer's names ("/layer1/layer1.0/conv1/Conv_output_0_QuantizeLinear_Output") cost ~250
    bytes per node: 10% of an int8 resnet20. Graph inputs and outputs keep their contract names.
    """
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            n, digits = len(names), ""
            while True:
                n, r = divmod(n, 36)
                digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
                if n == 0:
                    break
            names[name] = digits
        return names[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(i) for i in node.input]
        node.output[:] = [short(o) for o in node.output]
    del graph.value_info[:]


def _float_outputs(qmodel: onnx.ModelProto) -> None:
    """Drop the QuantizeLinear/DequantizeLinear pair on graph outputs: uint8 logits would create ties
    between close classes (top-1 flips) and cost nothing to keep in float (ORT's QGemm emits float)."""
    graph = qmodel.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    dropped: set[str] = set()
    for out in graph.output:
        dq = producers.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or consumers.get(q.output[0], 0) != 1:
            continue
        source = producers.get(q.input[0])
        if source is None or consumers.get(q.input[0], 0) != 1:
            continue
        source.output[list(source.output).index(q.input[0])] = out.name
        graph.node.remove(dq)
        graph.node.remove(q)
        dropped.update([*q.input[1:], *dq.input[1:]])
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name in dropped and i.name not in used]:
        graph.initializer.remove(init)


def _exact_ternary(qmodel: onnx.ModelProto, fp32: onnx.ModelProto) -> BinaryStats:
    """Rewrite each ternary weight (and its int32 bias) of ``qmodel`` as exactly {-1,0,+1} x magnitude."""
    floats = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
    inits = {i.name: i for i in qmodel.graph.initializer}
    producers = {o: n for n in qmodel.graph.node for o in n.output}
    exact = other = per_layer = 0
    for node in qmodel.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        wdq = producers.get(node.input[1])
        if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in inits:
            continue
        qname, sname = wdq.input[0], wdq.input[1]
        original = floats.get(qname.removesuffix("_quantized"))
        if original is None:
            continue
        axis = next((a.i for a in wdq.attribute if a.name == "axis"), 1)
        scale_init = inits[sname]
        per_channel = len(scale_init.dims) == 1 and scale_init.dims[0] > 1
        if node.op_type == "Gemm" and per_channel is False:
            axis = 0
        scales = ternary_scales(original, axis if per_channel else 0)
        if scales is None or not np.all(np.isfinite(scales)):
            other += 1
            continue
        if not per_channel:
            if not np.all(scales == scales.max()):
                other += 1
                continue
            scales = scales.max(keepdims=True)
        scales = np.where(scales == 0, np.float32(1.0), scales).astype(np.float32)  # all-zero slice: any scale
        shape = [1] * original.ndim
        shape[axis if per_channel else 0] = -1
        q = np.sign(original).astype(np.int8)
        if not np.array_equal(q.astype(np.float32) * (scales.reshape(shape) if per_channel else scales[0]), original):
            other += 1
            continue
        inits[qname].CopyFrom(numpy_helper.from_array(q, qname))
        new_scale = scales if per_channel else scales.reshape(())
        inits[sname].CopyFrom(numpy_helper.from_array(new_scale.astype(np.float32), sname))
        exact += 1
        per_layer += 0 if per_channel and len(np.unique(scales)) > 1 else 1
        if len(node.input) > 2 and node.input[2]:
            _requantize_bias(node.input[2], producers, inits, floats, producers.get(node.input[0]), new_scale)
    return BinaryStats(exact, other, per_layer)


def _requantize_bias(
    bias_out: str,
    producers: dict[str, onnx.NodeProto],
    inits: dict[str, TensorProto],
    floats: dict[str, np.ndarray],
    x_dq: onnx.NodeProto | None,
    w_scale: np.ndarray,
) -> None:
    """ORT quantizes a bias as int32 with scale x_scale * w_scale: follow the new weight scale."""
    bdq = producers.get(bias_out)
    if bdq is None or bdq.op_type != "DequantizeLinear" or x_dq is None or x_dq.op_type != "DequantizeLinear":
        return
    bq, bs = bdq.input[0], bdq.input[1]
    original = floats.get(bq.removesuffix("_quantized"))
    if original is None or bq not in inits or bs not in inits or x_dq.input[1] not in inits:
        return
    x_scale = numpy_helper.to_array(inits[x_dq.input[1]]).astype(np.float64)
    scale = (x_scale * w_scale.astype(np.float64)).astype(np.float32)
    scale = np.broadcast_to(scale, original.shape).copy() if len(inits[bs].dims) else scale.reshape(())
    q = np.clip(np.round(original / scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
    inits[bq].CopyFrom(numpy_helper.from_array(q, bq))
    inits[bs].CopyFrom(numpy_helper.from_array(scale.astype(np.float32), bs))


def int8_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The int8 initializers of a quantized model (for checks and reports)."""
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == TensorProto.INT8}


__all__ = [
    "CALIBRATION_METHODS",
    "FORMATS",
    "QUANTIZED_FORMATS",
    "SPARSE_ENCODINGS",
    "BinaryStats",
    "SparseStats",
    "format_for",
    "formats_for",
    "int8_weights",
    "shorten_names",
    "ternary_scales",
    "to_binary",
    "to_sparse",
]
