"""The Open Inference Protocol's view of a deck, free of any transport.

The gated deck answers as one model (``deck_name``, default ``carddeck``; version = deck version)
with outputs ``probabilities`` FP32 [N, C], ``labels`` INT64 [N] and ``routing_weights`` FP32
[N, K] (columns in card order, named in the result parameter ``card_names``). Each card answers
under its own name (version = card version) with ``probabilities`` and ``labels``. Input:
``images``, FP32 [N, C, H, W] in the deck's value range or UINT8 [N, H, W, C] (the deck's
:class:`~carddeck.card.InputSpec`). Request parameters: ``policy`` (string), ``per_sample`` (bool),
``abstain_above_risk`` (number in [0, 1]). The deck model's answer carries its verdict as parameters
(``shift_state``, ``shift_scope``, ``expected_accuracy``, ``expected_accuracy_kind``, ``shift_covered_by``,
``out_of_scope_images``, ``abstained_images``) and, when requested by name, the output ``out_of_scope``
FP32 [N] (per-image scores, > 1: out of scope).

The gRPC servicer (:mod:`carddeck.server.oip_servicer`) and the HTTP routes (:mod:`carddeck.http`)
only convert their wire formats to an :class:`~carddeck.serving.codec.InferRequest` and back, so both
transports resolve models (through :mod:`carddeck.serving.models`), decode tensors (the codec), validate
and answer the same way, with the same messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

import carddeck
from carddeck.deck import read_card_meta
from carddeck.deck.deck import top_labels
from carddeck.errors import CardNotFound, InvalidInput, shown
from carddeck.gating.shift import Trust
from carddeck.serving.batching import then
from carddeck.serving.codec import InferRequest, InferResult
from carddeck.serving.models import Model, check_card_name, model_names, resolve
from carddeck.serving.uploads import CardUpload

if TYPE_CHECKING:
    from carddeck.serving.plane import Plane

CARD_FILE = "file:model.onnx"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for a variable dimension


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    platform: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


# -- answers ------------------------------------------------------------------------------------
def verdict_parameters(trust: Trust | None, n: int, abstain_above_risk: float | None) -> dict[str, str]:
    """The verdict as OIP response parameters (strings; numbers as text, ``unknown`` where there is none)."""
    trust = trust or Trust.unknown(n)
    acc = trust.expected_accuracy
    out = {
        "shift_state": trust.state,
        "shift_scope": trust.scope,
        "expected_accuracy": "unknown" if math.isnan(acc) else f"{acc:.4f}",
        "expected_accuracy_kind": trust.expected_kind,
        "shift_covered_by": trust.covered_by,  # why "covered" (empty otherwise)
        "out_of_scope_images": ",".join(str(i) for i in np.flatnonzero(~trust.in_scope)),
    }
    if abstain_above_risk is not None:
        out["abstained_images"] = ",".join(str(i) for i in np.flatnonzero(trust.abstained(abstain_above_risk)))
    return out


# -- models ------------------------------------------------------------------------------------
class OipModels:
    """The deck and its cards as OIP models, over one data plane (:class:`~carddeck.serving.plane.Plane`)."""

    def __init__(
        self,
        dataplane: Plane,
        *,
        deck_name: str,
        max_request_images: int,
        max_card_bytes: int,
        dynamic_batching: Mapping[str, Any] | None = None,
    ):
        self.dp = dataplane
        self.deck_name = deck_name
        self.max_request_images = max_request_images
        self.max_card_bytes = max_card_bytes
        self.dynamic_batching = dynamic_batching  # for the model configuration: micro-batching, when on

    @classmethod
    def from_settings(cls, dataplane: Plane, settings: Any) -> OipModels:
        """From ``carddeck serve``'s settings (:class:`carddeck.serving.settings.Settings`)."""
        batching = None
        if settings.batching and settings.max_batch_size > 1:
            batching = {
                "preferred_batch_size": [settings.max_batch_size],
                "max_queue_delay_microseconds": int(settings.max_wait_ms * 1000),
            }
        return cls(
            dataplane,
            deck_name=settings.deck_model_name,
            max_request_images=settings.max_request_images,
            max_card_bytes=settings.max_card_mb << 20,
            dynamic_batching=batching,
        )

    def resolve(self, name: str, version: str = "") -> Model:
        """The model ``name`` (at ``version``, when given) on the current snapshot."""
        return self.dp.resolve(name, version)

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether the model serves now. An unknown model or version raises CardNotFound: Triton answers
        ModelReady for one with NOT_FOUND over gRPC and 404 over HTTP, not with "not ready"."""
        self.resolve(name, version)
        return self.dp.ready

    def metadata(self, model: Model) -> ModelInfo:
        deck, spec = model.deck, model.deck.input
        outputs = [
            TensorInfo("probabilities", "FP32", (-1, len(deck.class_names))),
            TensorInfo("labels", "INT64", (-1,)),
        ]
        if model.card is None:
            outputs.append(TensorInfo("routing_weights", "FP32", (-1, len(deck.cards))))
            outputs.append(TensorInfo("out_of_scope", "FP32", (-1,)))  # only when requested by name
        return ModelInfo(
            name=model.name,
            version=model.version,
            platform="carddeck_deck" if model.card is None else "onnxruntime_onnx",
            inputs=(TensorInfo("images", "FP32", (-1, spec.channels, spec.height, spec.width)),),
            outputs=tuple(outputs),
        )

    def config(self, model: Model) -> dict[str, Any]:
        """Triton's model configuration (its JSON field names, as the HTTP route returns it)."""
        deck, spec = model.deck, model.deck.input
        outputs = [
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [len(deck.class_names)]},
            {"name": "labels", "data_type": "TYPE_INT64", "dims": [1]},
        ]
        parameters = {"accepts_uint8_nhwc": {"string_value": "true"}}
        if model.card is None:
            outputs.append({"name": "routing_weights", "data_type": "TYPE_FP32", "dims": [len(deck.cards)]})
            outputs.append({"name": "out_of_scope", "data_type": "TYPE_FP32", "dims": [1]})
            parameters["default_policy"] = {"string_value": deck.default_policy}
            parameters["card_names"] = {"string_value": ",".join(deck.card_names)}
        config: dict[str, Any] = {
            "name": model.name,
            "platform": "carddeck_deck" if model.card is None else "onnxruntime_onnx",
            "backend": "carddeck",
            "max_batch_size": self.max_request_images,
            "input": [
                {"name": "images", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                 "dims": [spec.channels, spec.height, spec.width]}
            ],
            "output": outputs,
            "parameters": parameters,
        }  # fmt: skip
        if self.dynamic_batching is not None:  # this model's own batching on its snapshot
            policy = self.dp.batch_policy(model)
            config["dynamic_batching"] = {
                **self.dynamic_batching,
                "preferred_batch_size": list(policy.preferred_batch_sizes or (policy.max_batch_size,)),
                "max_queue_delay_microseconds": round(policy.max_queue_delay_s * 1e6),
            }
        return config

    def statistics(self, name: str = "", version: str = "") -> list[dict[str, Any]]:
        """Triton's per-model statistics (ns) of one model, or of every model when ``name`` is empty."""
        deck = self.dp.deck
        names = [name] if name else model_names(deck, self.deck_name)
        models = [resolve(deck, self.deck_name, n, version) for n in names]
        out = []
        for model in models:
            s = self.dp.stats(model.name)
            out.append(
                {
                    "name": model.name,
                    "version": model.version,
                    "last_inference": s.last_inference_ms,
                    "inference_count": s.inference_count,
                    "execution_count": s.execution_count,
                    "inference_stats": {
                        "success": {"count": s.success_count, "ns": s.success_ns},
                        "fail": {"count": s.fail_count, "ns": s.fail_ns},
                        "queue": {"count": s.success_count, "ns": s.queue_ns},
                        "compute_infer": {"count": s.success_count, "ns": s.compute_ns},
                    },
                    "batch_stats": [
                        {"batch_size": size, "compute_infer": {"count": c, "ns": ns}}
                        for size, (c, ns) in sorted(s.batch_sizes.items())
                    ],
                }
            )
        return out

    def infer(
        self,
        model: Model,
        request: InferRequest,
        *,
        timeout_s: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> InferResult:
        """Run ``request`` on ``model`` (resolved by the caller, on the snapshot it keeps): its images decoded
        and checked against the deck's contract, its parameters read."""
        images = request.images(model.input, self.max_request_images)
        policy, per_sample, bound = self._options(model, request)
        if model.card is None:
            value: Any = self.dp.predict(
                images,
                model=model,
                policy=policy,
                per_sample=per_sample,
                timeout_s=timeout_s,
                is_cancelled=is_cancelled,
            )
        else:
            value = self.dp.run_card(model, images, timeout_s=timeout_s, is_cancelled=is_cancelled)
        return self._result(model, value, bound)

    def submit(
        self,
        model: Model,
        request: InferRequest,
        *,
        is_cancelled: Callable[[], bool] | None = None,
        announced: bool = False,
    ) -> Future[InferResult]:
        """:meth:`infer` without waiting (the streaming RPC): bad input raises here, the rest comes in the future.
        ``announced``: as :meth:`~carddeck.serving.dataplane.Dataplane.submit`'s."""
        try:
            images = request.images(model.input, self.max_request_images)
            policy, per_sample, bound = self._options(model, request)
        except BaseException:
            if announced:
                self.dp.withdraw()
            raise
        started = self.dp.submit(
            model, images, policy=policy, per_sample=per_sample, is_cancelled=is_cancelled, announced=announced
        )
        return then(started, lambda value: self._result(model, value, bound))

    def _options(self, model: Model, request: InferRequest) -> tuple[str | None, bool, float | None]:
        policy, per_sample, bound = request.options()
        if model.card is not None and (policy is not None or per_sample or bound is not None):
            raise InvalidInput(
                f"parameters: 'policy', 'per_sample' and 'abstain_above_risk' apply to the deck model "
                f"{self.deck_name!r}, not a card"
            )
        return policy, per_sample, bound

    @staticmethod
    def _result(model: Model, value: Any, bound: float | None = None) -> InferResult:
        """The answer from the data plane's: (Prediction, Deck) for the gated deck, probabilities for a card."""
        if model.card is None:
            prediction, deck = value
            routing, n = prediction.routing, len(prediction.labels)
            scores = (prediction.verdict or Trust.unknown(n)).out_of_scope
            return InferResult(
                model.name,
                str(deck.version),
                {"probabilities": prediction.probabilities, "labels": prediction.labels,
                 "routing_weights": routing.weights, "out_of_scope": scores},
                {"policy": routing.policy, "card_names": ",".join(routing.card_names),
                 "selected_cards": ",".join(routing.selected), **verdict_parameters(prediction.verdict, n, bound),
                 "adapted": "true" if prediction.adapted else "false"},
            )  # fmt: skip
        outputs = {"probabilities": value, "labels": top_labels(value)}
        return InferResult(model.name, str(model.card.version), outputs, {})

    # -- repository extension ---------------------------------------------------------------------
    def index(self) -> list[tuple[str, str, str]]:
        """(name, version, state) of every model."""
        deck = self.dp.deck
        state = "READY" if self.dp.ready else "UNAVAILABLE"
        return [(self.deck_name, str(deck.version), state), *((m.name, str(m.version), state) for m in deck.cards)]

    def load(self, name: str, files: Mapping[str, bytes]) -> None:
        """Load = add a card, its ONNX bytes in ``files["file:model.onnx"]``; a loaded model is a no-op."""
        if name == self.deck_name and not files:
            return  # the deck is always loaded
        check_card_name(name, "model_name")
        if not files:
            if name in self.dp.deck.card_names:
                return
            raise CardNotFound(
                f"no card {shown(name)} in the deck; to add one send its ONNX file as parameter {CARD_FILE!r}"
            )
        if len(files) != 1 or CARD_FILE not in files:
            raise InvalidInput(f"parameters: send exactly one file, {CARD_FILE!r}; got {shown(sorted(files))}")
        upload = CardUpload(self.max_card_bytes, field=f"parameters[{CARD_FILE!r}]")
        upload.add(files[CARD_FILE])
        data = upload.finish()
        meta = read_card_meta(data)
        if meta.name != name:
            raise InvalidInput(f"model_name: {shown(name)} does not match the card's own name {meta.name!r}")
        self.dp.add_card(data)  # bytes in memory: no temporary path a message could name or a crash leave behind

    def unload(self, name: str) -> None:
        """Unload = remove the card (every stored version) from the deck."""
        if name == self.deck_name:
            raise InvalidInput(f"model_name: the deck model {self.deck_name!r} cannot be unloaded; unload its cards")
        self.dp.remove_card(check_card_name(name, "model_name"))


def server_metadata(extensions: Sequence[str]) -> dict[str, Any]:
    return {"name": "carddeck", "version": carddeck.__version__, "extensions": list(extensions)}


__all__ = ["CARD_FILE", "InferResult", "ModelInfo", "OipModels", "TensorInfo", "server_metadata", "verdict_parameters"]
