"""Each compact format loads in a plain onnxruntime.InferenceSession and matches torch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from carddeck.export import export_model
from carddeck.export.formats import format_for, to_binary, to_sparse
from carddeck.export.onnx_export import to_onnx
from carddeck.export.parity import MAX_PROB_DIFF, softmax
from carddeck.nets import build_net, prunable_modules
from tests.export.conftest import card_meta, to_tensor


def plain_session(data: bytes, optimized: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if optimized:
        opts.optimized_model_filepath = optimized
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run(data: bytes, x: np.ndarray) -> np.ndarray:
    return plain_session(data).run(["logits"], {"images": x})[0]


def torch_out(model, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def val_x(digits, n: int = 128) -> np.ndarray:
    return to_tensor(digits["val"].images[:n]).numpy()


def masked_resnet20(sparsity: float, seed: int = 0) -> torch.nn.Module:
    """carddeck's resnet20 with each conv/linear weight magnitude-pruned to ``sparsity`` (exact zeros)."""
    torch.manual_seed(seed)
    net = build_net("resnet20", 10).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                k = int(sparsity * m.weight.numel())
                threshold = m.weight.abs().flatten().kthvalue(max(k, 1)).values
                m.weight.mul_((m.weight.abs() > threshold).float())
    return net


def float_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]


def quantized_weights(model: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray]]:
    """(int8 weight, scale) of each Conv/Gemm of a QDQ model, in graph order."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int8
            out.append((inits[dq.input[0]], inits[dq.input[1]]))
    return out


def test_format_follows_the_compression_method():
    assert [format_for(m) for m in ("dense", "lrr", "biprop", "filter")] == ["dense", "sparse", "binary", "dense"]
    assert format_for("lrr", "dense") == "dense"
    with pytest.raises(ValueError, match="valid formats: auto, dense, sparse, binary"):
        format_for("lrr", "int4")


@pytest.mark.parametrize("method", ["dense", "filter", "lrr", "dipgo"])
def test_binary_is_refused_for_a_card_whose_weights_are_not_binary(method):
    """Mutant: any format accepted for any card (as before: a dense card came out int8-quantized under a CardMeta
    that says 32-bit weights)."""
    own = format_for(method)
    with pytest.raises(ValueError, match=rf"--format binary does not apply to a '{method}' card .* formats for it: "
                                         rf"auto \({own}\), {own}, "):  # fmt: skip
        format_for(method, "binary")
    assert format_for(method, "dense") == "dense" and format_for(method, "sparse") == "sparse"  # lossless: any card
    assert format_for("biprop", "binary") == "binary" and format_for("biprop", "dense") == "dense"


def test_sparse_card_is_lossless_and_matches_torch(sparse_net, digits, tmp_path):
    meta = card_meta("lrr-card", "lrr", sparsity=0.9)
    val = digits["val"]
    report = export_model(sparse_net, meta, tmp_path / "m.onnx", images=val.images, labels=val.labels)
    assert report.format == "sparse" and report.parity.passed
    assert report.parity.agreement >= 0.999 and report.parity.max_prob_diff <= MAX_PROB_DIFF
    data = report.path.read_bytes()
    x = val_x(digits)
    dense = to_onnx(sparse_net, 32, 32).SerializeToString()
    assert np.array_equal(run(data, x), run(dense, x))  # the packed weights decode bit-exactly
    np.testing.assert_allclose(softmax(run(data, x)), softmax(torch_out(sparse_net, x)), atol=MAX_PROB_DIFF)
    assert report.size_bytes < report.dense_size_bytes / 2.5  # tiny net: node overhead; resnet20 below


@pytest.mark.parametrize("encoding, min_ratio", [("bitmask", 4.0), ("sparse-initializer", 3.0)])
def test_sparse_size_at_90_percent(encoding, min_ratio, digits):
    net = masked_resnet20(0.9)
    dense = to_onnx(net, 32, 32)
    packed, stats = to_sparse(dense, encoding=encoding)
    assert stats.tensors == len(prunable_modules(net)) and 0.89 < stats.sparsity < 0.91
    dense_bytes, packed_bytes = dense.SerializeToString(), packed.SerializeToString()
    ratio = len(dense_bytes) / len(packed_bytes)
    assert ratio >= min_ratio, f"{encoding}: only {ratio:.2f}x smaller"
    if encoding == "sparse-initializer":
        assert len(packed.graph.sparse_initializer) == stats.tensors
    x = val_x(digits, 16)
    assert np.array_equal(run(packed_bytes, x), run(dense_bytes, x))  # ORT loads it as is, lossless


def test_binary_card_is_exactly_ternary_int8(binary_net, digits, tmp_path):
    meta = card_meta("biprop-card", "biprop", sparsity=0.5, bits=1)
    val, train, test = digits["val"], digits["train"], digits["test"]
    # val + test: on a 16-channel net a single flipped image is 0.28 points of 359
    images, labels = np.concatenate([val.images, test.images]), np.concatenate([val.labels, test.labels])
    # 1024 calibration images: minmax ranges of 256 clipped enough of the parity images to drop 0.56 points on a
    # CPU whose float kernels trained this fixture differently (limit 0.5)
    report = export_model(
        binary_net, meta, tmp_path / "b.onnx", images=images, labels=labels, calibration=train.images[:1024]
    )
    assert report.format == "binary" and report.parity.quantized and report.parity.passed
    assert report.parity.accuracy_delta_points >= -0.5
    model = onnx.load(report.path)
    fp32 = to_onnx(binary_net, 32, 32)
    exact = 0
    for (q, scale), w in zip(quantized_weights(model), float_weights(fp32), strict=True):
        assert set(np.unique(q)) <= {-1, 0, 1}
        dequantized = q.astype(np.float32) * (scale.reshape([-1] + [1] * (q.ndim - 1)) if scale.ndim else scale)
        assert np.array_equal(dequantized, w)  # exactly {-alpha, 0, +alpha}
        exact += 1
    assert exact == 4  # conv1..3 and fc
    # ONNX Runtime turns the QDQ pattern into int8 convolutions
    optimized = str(tmp_path / "optimized.onnx")
    plain_session(report.path.read_bytes(), optimized)
    ops = {n.op_type for n in onnx.load(optimized).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops, ops


def test_binary_size_on_resnet20(digits):
    torch.manual_seed(0)
    net = build_net("resnet20", 10).eval()
    with torch.no_grad():  # biprop effective weights: sign * alpha * mask, one alpha per layer
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                mask = (torch.rand_like(m.weight) > 0.5).float()
                m.weight.copy_(torch.sign(m.weight) * (m.weight.abs() * mask).sum() / mask.sum() * mask)
    dense = to_onnx(net, 32, 32)
    quantized, stats = to_binary(dense, val_x(digits, 40), method="percentile")  # 40: a short last batch
    assert stats.exact_tensors == len(prunable_modules(net)) and stats.other_tensors == 0
    ratio = len(dense.SerializeToString()) / len(quantized.SerializeToString())
    assert ratio >= 3.5, f"only {ratio:.2f}x smaller"


def test_structured_card_is_the_smaller_dense_network(filter_net, dense_net, digits, tmp_path):
    val = digits["val"]
    meta = card_meta("filter-card", "filter", sparsity=0.5, structured=True)
    report = export_model(filter_net, meta, tmp_path / "f.onnx", images=val.images, labels=val.labels)
    full = export_model(dense_net, card_meta("full", "dense"), tmp_path / "d" / "d.onnx", images=val.images[:32])
    assert report.format == "dense" and report.parity.passed
    assert report.size_bytes < full.size_bytes / 3  # half the filters: ~1/4 of the weights
    x = val_x(digits)
    np.testing.assert_allclose(
        softmax(run(report.path.read_bytes(), x)), softmax(torch_out(filter_net, x)), atol=MAX_PROB_DIFF
    )
