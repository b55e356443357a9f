"""Parity between the torch model and the exported ONNX card, on real images.

Float formats (dense, sparse) must reproduce torch: top-1 agreement >= ``min_agreement`` (99.9%)
and max |softmax difference| <= ``max_prob_diff`` (1e-3). Quantized formats (binary int8) cannot,
by design: for them the report gives agreement and the accuracy delta against the labels, and the
card is refused when ONNX accuracy is more than ``max_accuracy_drop`` points below torch's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from carddeck.errors import CardRejected, InvalidInput

MIN_AGREEMENT = 0.999
MAX_PROB_DIFF = 1e-3
MAX_ACCURACY_DROP_POINTS = 0.5


@dataclass(frozen=True)
class ParityPolicy:
    min_agreement: float = MIN_AGREEMENT
    max_prob_diff: float = MAX_PROB_DIFF
    max_accuracy_drop: float = MAX_ACCURACY_DROP_POINTS  # percentage points, quantized formats only

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 1.0:
            raise InvalidInput(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.max_prob_diff < 0:
            raise InvalidInput(f"max_prob_diff must be >= 0, got {self.max_prob_diff}")
        if not 0.0 <= self.max_accuracy_drop <= 100.0:
            raise InvalidInput(f"max_accuracy_drop is in points and must be in [0, 100], got {self.max_accuracy_drop}")


@dataclass(frozen=True)
class ParityReport:
    format: str
    quantized: bool
    images: int
    agreement: float  # top-1 agreement torch vs ONNX, [0, 1]
    max_prob_diff: float  # max |p_torch - p_onnx| over images and classes
    torch_accuracy: float | None  # against labels, [0, 1]
    onnx_accuracy: float | None
    passed: bool
    reason: str  # why it failed, or what was checked

    @property
    def accuracy_delta_points(self) -> float | None:
        """ONNX minus torch accuracy, in percentage points."""
        if self.torch_accuracy is None or self.onnx_accuracy is None:
            return None
        return 100.0 * (self.onnx_accuracy - self.torch_accuracy)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_delta_points": self.accuracy_delta_points}


class ParityError(CardRejected):
    """The exported card does not match its torch model: nothing was written."""

    def __init__(self, report: ParityReport) -> None:
        super().__init__(f"parity check failed ({report.format}): {report.reason}; card not written")
        self.report = report


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def torch_logits(model: Any, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """Logits of a torch module on float32 NCHW images, in eval mode without gradients."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            out.append(model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch]))).float().numpy())
    return np.concatenate(out)


def onnx_logits(model_bytes: bytes, images: np.ndarray, batch: int = 128, threads: int = 2) -> np.ndarray:
    """Logits from a plain ONNX Runtime CPU session, exactly as a deck would load the card."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    out = [sess.run(["logits"], {"images": images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(out)


def compare(
    torch_out: np.ndarray,
    onnx_out: np.ndarray,
    labels: np.ndarray | None,
    *,
    format: str,
    quantized: bool,
    policy: ParityPolicy | None = None,
) -> ParityReport:
    """Judge ONNX logits against torch logits (same images, same order) under ``policy``."""
    policy = policy or ParityPolicy()
    if torch_out.shape != onnx_out.shape:
        return ParityReport(
            format, quantized, len(torch_out), 0.0, float("inf"), None, None, False,
            f"output shapes differ: torch {list(torch_out.shape)}, ONNX {list(onnx_out.shape)}",
        )  # fmt: skip
    p_t, p_o = softmax(torch_out), softmax(onnx_out)
    finite = bool(np.isfinite(onnx_out).all())
    agreement = float(np.mean(p_t.argmax(1) == p_o.argmax(1))) if len(p_t) else 0.0
    max_diff = float(np.abs(p_t - p_o).max()) if finite else float("inf")
    acc_t = acc_o = None
    if labels is not None:
        acc_t = float(np.mean(p_t.argmax(1) == labels))
        acc_o = float(np.mean(p_o.argmax(1) == labels))
    n = len(p_t)
    if n == 0:
        passed, reason = False, "no images to compare on"
    elif not finite:
        passed, reason = False, "ONNX outputs contain NaN or infinity"
    elif quantized:
        if acc_t is None or acc_o is None:
            passed, reason = False, "a quantized card needs labelled images to measure its accuracy drop"
        else:
            drop = 100.0 * (acc_t - acc_o)
            passed = drop <= policy.max_accuracy_drop
            reason = (
                f"accuracy {100 * acc_o:.2f}% vs torch {100 * acc_t:.2f}% (drop {drop:.2f} points, "
                f"limit {policy.max_accuracy_drop:g}); top-1 agreement {100 * agreement:.2f}% on {n} images"
            )
    else:
        problems = []
        if agreement < policy.min_agreement:
            problems.append(f"top-1 agreement {100 * agreement:.2f}% < {100 * policy.min_agreement:.2f}%")
        if max_diff > policy.max_prob_diff:
            problems.append(f"max probability difference {max_diff:.3g} > {policy.max_prob_diff:g}")
        passed = not problems
        reason = "; ".join(problems) if problems else (
            f"top-1 agreement {100 * agreement:.2f}%, max probability difference {max_diff:.2g} on {n} images"
        )  # fmt: skip
    return ParityReport(format, quantized, n, agreement, max_diff, acc_t, acc_o, passed, reason)


__all__ = [
    "MAX_ACCURACY_DROP_POINTS",
    "MAX_PROB_DIFF",
    "MIN_AGREEMENT",
    "ParityError",
    "ParityPolicy",
    "ParityReport",
    "compare",
    "onnx_logits",
    "softmax",
    "torch_logits",
]
