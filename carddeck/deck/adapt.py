"""Test-time adaptation of a card's normalisation statistics, as an ONNX rewrite of the exported card.

Schneider et al. 2020 ("Improving robustness against common corruptions by covariate shift
adaptation") re-estimate BatchNorm's statistics on the test batch, mixed with the stored ones with a
pseudo sample size N: ``mu = (N mu_s + n mu_b) / (N + n)``, the same for the variance. Exported cards
have BatchNorm folded into their convolutions, so no BN node is left; but a folded conv's output
``y = gamma (z - mu) / sigma + beta`` is affine in the pre-BN activation z, per channel, so
re-estimating BN in z-space is the same as renormalising y per channel around its own reference
statistics (m_ref, v_ref: the mean and variance of y on clean images, i.e. beta and gamma^2)::

    m = (N m_ref + n m_b) / (N + n),   v = (N v_ref + n v_b) / (N + n)
    y' = m_ref + (y - m) * sqrt((v_ref + eps) / (v + eps))

with (m_b, v_b) the request's own per-channel batch statistics (ReduceMean over N, H, W). The rewrite
inserts that after every convolution whose output goes to a ReLU, an Add, a QuantizeLinear (int8
cards fold the ReLU into it) or anything but another convolution (a factor of a low-rank conv has no
BN of its own). It needs only the ONNX file and clean images (the deck's calibration images), so it
applies to any card, including cards added to a live deck. tests/deck/test_adapt.py checks the
equivalence against torch's BatchNorm on a small ResNet.

Statistics come from the images of one run of the adaptive graph, so the caller must run it on one
request's images alone (never a merged micro-batch): that keeps one client's images out of another's
answer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# N, the stored statistics' weight in images. On digits32 val (benchmarks/bench_adapt.py --choose, the
# default policy, every 64-image batch adapted) N=16 and N=0 were within 0.01 points (clean -0.28,
# corrupted -0.07 and -0.08 against unadapted); a prior steadies the smaller batches the trigger lets in.
DEFAULT_PRIOR = 16.0
# Smaller requests are served unadapted: with 16 images the statistics are too noisy (a natural-image
# probe of width-0.5 ResNet-20 cards lost 1.6-13 points corrupted and 6-22 clean at 16, gained at 64).
# With the served trigger (bench_adapt.py --min-batch 16,24,32,48,64, all five severities, each corruption
# held out of the detector; leaves32 --shuffled), against unadapted, mean corrupted on val: digits32 -0.03,
# -0.08, -0.01, +0.13, +0.07; leaves32 at 32, 48, 64: -0.00, +0.04, +0.08; clean never adapted. At 32 it
# gained nothing and lost single corruptions up to 0.6 (leaves32 contrast, digits32 impulse noise -0.5);
# at 48 none lost more than 0.3. So 48.
MIN_BATCH = 48
EPS = 1e-5  # relative to the reference variance (BN's eps in z-space, up to gamma^2)
REFERENCE_CHUNK = 64


def adaptable_convs(model: onnx.ModelProto) -> list[str]:
    """Output names of the convolutions whose output was batch-normalised (see the module doc)."""
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    outputs = {o.name for o in model.graph.output}
    return [
        n.output[0]
        for n in model.graph.node
        if n.op_type == "Conv" and n.output[0] not in outputs and set(consumers.get(n.output[0], ["Conv"])) != {"Conv"}
    ]


Stats = dict[str, tuple[np.ndarray, np.ndarray]]  # conv output name -> (mean [C], var [C])


def reference_statistics(model: bytes | onnx.ModelProto, images: np.ndarray) -> Stats:
    """Per-channel mean and variance of every adaptable conv's output on ``images`` (prepared float32
    [N, C, H, W], clean): conv output name -> (mean [C], var [C])."""
    import onnxruntime as ort

    proto = _proto(model)
    names = adaptable_convs(proto)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for i in range(0, len(images), REFERENCE_CHUNK):
        outs = session.run(names, {"images": np.ascontiguousarray(images[i : i + REFERENCE_CHUNK], np.float32)})
        for name, y in zip(names, outs):
            y64 = np.asarray(y, np.float64)
            sums[name] = sums.get(name, 0.0) + y64.sum(axis=(0, 2, 3))
            squares[name] = squares.get(name, 0.0) + np.square(y64).sum(axis=(0, 2, 3))
            counts[name] = counts.get(name, 0) + y64.size // y64.shape[1]
    stats = {}
    for name in names:
        mean = sums[name] / counts[name]
        var = np.maximum(squares[name] / counts[name] - mean**2, 0.0)
        stats[name] = (mean.astype(np.float32), var.astype(np.float32))
    return stats


def adaptive_model(model: bytes | onnx.ModelProto, stats: Stats, prior: float = DEFAULT_PRIOR) -> onnx.ModelProto:
    """``model`` with every conv in ``stats`` renormalised by its batch's statistics mixed with the
    reference ones at pseudo sample size ``prior`` (0: the batch's own statistics only)."""
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    proto = onnx.ModelProto()
    proto.CopyFrom(_proto(model))
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 17)
    inits = [numpy_helper.from_array(np.array([prior], np.float32), "adapt/prior")]
    inits.append(numpy_helper.from_array(np.array([0, 2, 3], np.int64), "adapt/axes"))
    # alpha = n / (N + n): the batch's share, from the images' batch dimension (dynamic)
    nodes = [
        helper.make_node("Shape", ["images"], ["adapt/shape"], start=0, end=1),
        helper.make_node("Cast", ["adapt/shape"], ["adapt/n"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["adapt/n", "adapt/prior"], ["adapt/total"]),
        helper.make_node("Div", ["adapt/n", "adapt/total"], ["adapt/alpha"]),
        helper.make_node("Div", ["adapt/prior", "adapt/total"], ["adapt/beta"]),
    ]

    def reduce_mean(x: str, out: str) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node("ReduceMean", [x, "adapt/axes"], [out], keepdims=1)
        return helper.make_node("ReduceMean", [x], [out], axes=[0, 2, 3], keepdims=1)

    rewired: dict[str, list[onnx.NodeProto]] = {}
    for k, (name, (mean, var)) in enumerate(stats.items()):
        p = f"adapt/{k}/"
        raw = p + "raw"
        v_ref = np.asarray(var, np.float32).reshape(1, -1, 1, 1)
        eps = v_ref * np.float32(EPS) + np.float32(1e-12)  # a channel dead on clean data stays finite
        inits += [
            numpy_helper.from_array(np.asarray(mean, np.float32).reshape(1, -1, 1, 1), p + "m_ref"),
            numpy_helper.from_array(v_ref + eps, p + "s2"),
            numpy_helper.from_array(v_ref, p + "v_ref"),
            numpy_helper.from_array(eps, p + "eps"),
        ]
        rewired[name] = [
            reduce_mean(raw, p + "m_b"),
            helper.make_node("Sub", [raw, p + "m_b"], [p + "d"]),
            helper.make_node("Mul", [p + "d", p + "d"], [p + "d2"]),
            reduce_mean(p + "d2", p + "v_b"),
            helper.make_node("Mul", [p + "m_b", "adapt/alpha"], [p + "am"]),
            helper.make_node("Mul", [p + "m_ref", "adapt/beta"], [p + "bm"]),
            helper.make_node("Add", [p + "am", p + "bm"], [p + "m"]),
            helper.make_node("Mul", [p + "v_b", "adapt/alpha"], [p + "av"]),
            helper.make_node("Mul", [p + "v_ref", "adapt/beta"], [p + "bv"]),
            helper.make_node("Add", [p + "av", p + "bv"], [p + "v"]),
            helper.make_node("Add", [p + "v", p + "eps"], [p + "ve"]),
            helper.make_node("Div", [p + "s2", p + "ve"], [p + "ratio"]),
            helper.make_node("Sqrt", [p + "ratio"], [p + "gain"]),
            helper.make_node("Sub", [raw, p + "m"], [p + "c"]),
            helper.make_node("Mul", [p + "c", p + "gain"], [p + "cg"]),
            helper.make_node("Add", [p + "cg", p + "m_ref"], [name]),  # the conv's old output name
        ]
    out_nodes = list(nodes)
    index = {name: k for k, name in enumerate(stats)}
    for node in graph.node:
        out_nodes.append(node)
        name = node.output[0] if node.op_type == "Conv" else ""
        if name in rewired:
            node.output[0] = f"adapt/{index[name]}/raw"
            out_nodes.extend(rewired.pop(name))
    if rewired:
        raise ValueError(f"statistics for convolutions the model lacks: {sorted(rewired)}")
    del graph.node[:]
    graph.node.extend(out_nodes)
    graph.initializer.extend(inits)
    return proto


def build_adaptive(model: bytes, images: np.ndarray, prior: float = DEFAULT_PRIOR) -> bytes | None:
    """The adaptive variant of ``model`` (reference statistics from clean ``images``, prepared float32
    NCHW), or None when it has no normalised convolution to adapt."""
    stats = reference_statistics(model, images)
    if not stats:
        return None
    return adaptive_model(model, stats, prior).SerializeToString()


def _proto(model: bytes | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)


__all__ = [
    "DEFAULT_PRIOR",
    "MIN_BATCH",
    "adaptable_convs",
    "adaptive_model",
    "build_adaptive",
    "reference_statistics",
]
