"""The parity check refuses exports that do not reproduce the torch model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from carddeck.errors import CardRejected, InvalidInput
from carddeck.export import ParityError, ParityPolicy, card_export, export_model
from carddeck.export.onnx_export import to_onnx
from carddeck.export.parity import compare
from tests.export.conftest import card_meta


def test_export_without_normalization_is_refused(dense_net, digits, tmp_path, monkeypatch):
    """A deliberately wrong export: the graph lacks the model's Normalize step."""

    def forgetful_export(model, *args, **kwargs):
        class NoNorm(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, x):
                saved = self.inner.norm
                self.inner.norm = torch.nn.Identity()
                try:
                    return self.inner(x)
                finally:
                    self.inner.norm = saved

        return to_onnx(NoNorm(), *args, **kwargs)

    monkeypatch.setattr(card_export, "to_onnx", forgetful_export)
    out = tmp_path / "wrong.onnx"
    val = digits["val"]
    with pytest.raises(ParityError, match="parity check failed.*(agreement|probability difference)") as info:
        export_model(dense_net, card_meta("wrong", "dense"), out, images=val.images, labels=val.labels)
    assert isinstance(info.value, CardRejected)
    assert not info.value.report.passed and info.value.report.max_prob_diff > 1e-3
    assert not out.exists() and not (tmp_path / "card.json").exists()


def test_same_model_passes(dense_net, digits, tmp_path):
    val = digits["val"]
    report = export_model(
        dense_net, card_meta("right", "dense"), tmp_path / "ok.onnx", images=val.images, labels=val.labels
    )
    assert report.parity.passed and report.parity.agreement == 1.0 and report.parity.max_prob_diff < 1e-5
    assert report.parity.torch_accuracy == report.parity.onnx_accuracy > 0.5


def _logits(labels: np.ndarray, wrong: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((len(labels), 10)).astype(np.float32)
    pred = labels.copy()
    pred[:wrong] = (labels[:wrong] + 1) % 10
    logits[np.arange(len(labels)), pred] += 8.0
    return logits


def test_float_thresholds():
    labels = np.arange(1000) % 10
    ref = _logits(labels, 0)
    assert compare(ref, ref + 1e-5, labels, format="dense", quantized=False).passed
    shifted = ref.copy()
    shifted[:, 0] += 0.05  # probabilities move by more than 1e-3, top-1 unchanged
    report = compare(ref, shifted, labels, format="dense", quantized=False)
    assert not report.passed and "probability difference" in report.reason and report.agreement == 1.0
    flipped = _logits(labels, 2)  # 2 of 1000 disagree: 99.8% < 99.9%
    report = compare(ref, flipped, labels, format="sparse", quantized=False, policy=ParityPolicy(max_prob_diff=1.0))
    assert not report.passed and "agreement 99.80%" in report.reason
    nan = ref.copy()
    nan[3, 3] = np.nan
    assert "NaN" in compare(ref, nan, labels, format="dense", quantized=False).reason


def test_quantized_accuracy_drop_policy():
    labels = np.arange(1000) % 10
    ref = _logits(labels, 0)
    q = _logits(labels, 7, seed=1)  # 0.7 points less accurate
    report = compare(ref, q, labels, format="binary", quantized=True)
    assert not report.passed and "drop 0.70 points, limit 0.5" in report.reason
    assert report.accuracy_delta_points == pytest.approx(-0.7)
    relaxed = compare(ref, q, labels, format="binary", quantized=True, policy=ParityPolicy(max_accuracy_drop=1.0))
    assert relaxed.passed and relaxed.agreement == pytest.approx(0.993)
    assert not compare(ref, q, None, format="binary", quantized=True).passed  # needs labels


def test_quantized_export_refused_above_the_configured_drop(binary_net, digits, tmp_path, monkeypatch):
    """A quantizer that ruins the weights: the drop is measured on real images and the card refused."""
    from carddeck.export import formats

    real = formats.to_binary

    def ruined(model, calibration, **kw):
        q, stats = real(model, calibration, **kw)
        for init in q.graph.initializer:
            if init.data_type == onnx.TensorProto.INT8 and len(init.dims) > 1:  # weights, not zero points
                init.raw_data = bytes(len(init.raw_data))  # all zero
        return q, stats

    monkeypatch.setattr(card_export, "to_binary", ruined)
    val = digits["val"]
    out = tmp_path / "b.onnx"
    with pytest.raises(ParityError, match=r"drop .* points, limit 0.5"):
        export_model(binary_net, card_meta("ruined", "biprop", 0.5, 1), out, images=val.images, labels=val.labels)
    assert not out.exists()


def test_policy_and_input_validation(dense_net, digits, tmp_path):
    with pytest.raises(InvalidInput, match="max_accuracy_drop"):
        ParityPolicy(max_accuracy_drop=-1)
    with pytest.raises(InvalidInput, match="expects \\[3, 32, 32\\]"):
        export_model(dense_net, card_meta("x", "dense"), tmp_path / "x.onnx", images=np.zeros((4, 28, 28, 3), np.uint8))
    five = card_meta("five", "dense").replace(num_classes=5, class_names=tuple("abcde"))
    with pytest.raises(CardRejected, match="outputs 10 logits, CardMeta says num_classes=5"):
        export_model(dense_net, five, tmp_path / "five.onnx", images=digits["val"].images[:4])
    with pytest.raises(InvalidInput, match="must end in .onnx"):
        export_model(dense_net, card_meta("x", "dense"), tmp_path / "x.pb", images=digits["val"].images[:4])
