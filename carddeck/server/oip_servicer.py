"""inference.GRPCInferenceService (Open Inference Protocol): the deck is one model, each card another.

The gated deck answers as ``settings.deck_model_name`` (default ``carddeck``; version = deck
version) with outputs ``probabilities`` FP32 [N, C], ``labels`` INT64 [N] and ``routing_weights``
FP32 [N, K] (columns in card order, listed in the response parameter ``card_names``). Each card
answers under its own name (version = card version) with ``probabilities`` and ``labels``.
Input: ``images``, FP32 [N, 3, H, W] in [0, 1] or UINT8 [N, H, W, 3]. Request parameters:
``policy`` (string) and ``per_sample`` (bool). Outputs are always in raw_output_contents.
"""

from __future__ import annotations

import grpc
import numpy as np

import carddeck
from carddeck.card import CardMeta
from carddeck.deck import Deck, read_card_meta
from carddeck.errors import CardNotFound, InvalidInput, TooLarge, shown
from carddeck.server import convert
from carddeck.server.carddeck_servicer import MiB, check_card_name
from carddeck.server.dataplane import Dataplane
from carddeck.server.proto_gen.inference import grpc_service_pb2 as oip
from carddeck.server.proto_gen.inference import grpc_service_pb2_grpc
from carddeck.server.proto_gen.inference import model_config_pb2 as mc
from carddeck.server.settings import Settings
from carddeck.server.status_codes import rpc_errors

EXTENSIONS = ("model_repository", "model_configuration", "statistics", "parameters")
Tensor = oip.ModelMetadataResponse.TensorMetadata


class OipServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: Dataplane, settings: Settings) -> None:
        self.dp = dataplane
        self.settings = settings
        self.deck_name = settings.deck_model_name

    # -- model lookup -------------------------------------------------------------------------
    def _model(self, name: str, version: str, deck: Deck) -> CardMeta | None:
        """None for the deck model, the CardMeta for a card; NOT_FOUND for anything else."""
        if not name:
            raise InvalidInput(f"name: empty; models: {', '.join(self._names(deck))}")
        if name == self.deck_name:
            if version and version != str(deck.version):
                raise CardNotFound(f"model {shown(name)} has version {deck.version}, not {shown(version)}")
            return None
        for meta in deck.cards:
            if meta.name == name:
                if version and version != str(meta.version):
                    raise CardNotFound(f"model {shown(name)} is served at version {meta.version}, not {shown(version)}")
                return meta
        raise CardNotFound(f"no model {shown(name)}; models: {', '.join(self._names(deck))}")

    def _names(self, deck: Deck) -> list[str]:
        return [self.deck_name, *deck.card_names]

    # -- health and metadata ------------------------------------------------------------------
    @rpc_errors
    def ServerLive(self, request: oip.ServerLiveRequest, context: grpc.ServicerContext) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    @rpc_errors
    def ServerReady(self, request: oip.ServerReadyRequest, context: grpc.ServicerContext) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.dp.ready)

    @rpc_errors
    def ModelReady(self, request: oip.ModelReadyRequest, context: grpc.ServicerContext) -> oip.ModelReadyResponse:
        deck = self.dp.deck
        try:
            self._model(request.name, request.version, deck)
        except CardNotFound:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=self.dp.ready)

    @rpc_errors
    def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="carddeck", version=carddeck.__version__, extensions=EXTENSIONS)

    @rpc_errors
    def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ModelMetadataResponse:
        deck = self.dp.deck
        meta = self._model(request.name, request.version, deck)
        spec = deck.input
        outputs = [
            Tensor(name="probabilities", datatype="FP32", shape=[-1, len(deck.class_names)]),
            Tensor(name="labels", datatype="INT64", shape=[-1]),
        ]
        if meta is None:
            outputs.append(Tensor(name="routing_weights", datatype="FP32", shape=[-1, len(deck.cards)]))
        return oip.ModelMetadataResponse(
            name=request.name,
            versions=[str(deck.version if meta is None else meta.version)],
            platform="carddeck_deck" if meta is None else "onnxruntime_onnx",
            inputs=[Tensor(name="images", datatype="FP32", shape=[-1, spec.channels, spec.height, spec.width])],
            outputs=outputs,
        )

    @rpc_errors
    def ModelConfig(self, request: oip.ModelConfigRequest, context: grpc.ServicerContext) -> oip.ModelConfigResponse:
        deck = self.dp.deck
        meta = self._model(request.name, request.version, deck)
        spec = deck.input
        s = self.settings
        config = mc.ModelConfig(
            name=request.name,
            platform="carddeck_deck" if meta is None else "onnxruntime_onnx",
            backend="carddeck",
            max_batch_size=s.max_request_images,
            input=[
                mc.ModelInput(
                    name="images",
                    data_type=mc.TYPE_FP32,
                    format=mc.ModelInput.FORMAT_NCHW,
                    dims=[spec.channels, spec.height, spec.width],
                )
            ],
            output=[
                mc.ModelOutput(name="probabilities", data_type=mc.TYPE_FP32, dims=[len(deck.class_names)]),
                mc.ModelOutput(name="labels", data_type=mc.TYPE_INT64, dims=[1]),
            ]
            + (
                [mc.ModelOutput(name="routing_weights", data_type=mc.TYPE_FP32, dims=[len(deck.cards)])]
                if meta is None
                else []
            ),
        )
        config.parameters["accepts_uint8_nhwc"].string_value = "true"
        if meta is None:
            config.parameters["default_policy"].string_value = deck.default_policy
            config.parameters["card_names"].string_value = ",".join(deck.card_names)
        if s.batching and s.max_batch_size > 1:
            config.dynamic_batching.preferred_batch_size.append(s.max_batch_size)
            config.dynamic_batching.max_queue_delay_microseconds = int(s.max_wait_ms * 1000)
        return oip.ModelConfigResponse(config=config)

    # -- inference ----------------------------------------------------------------------------
    @rpc_errors
    def ModelInfer(self, request: oip.ModelInferRequest, context: grpc.ServicerContext) -> oip.ModelInferResponse:
        with self.dp.request():
            deck = self.dp.deck
            meta = self._model(request.model_name, request.model_version, deck)
            policy, per_sample = convert.oip_options(request.parameters)
            spec = deck.input
            images = convert.oip_images(
                request, max_images=self.settings.max_request_images, height=spec.height, width=spec.width
            )
            timeout, cancelled = context.time_remaining(), (lambda: not context.is_active())
            response = oip.ModelInferResponse(model_name=request.model_name, id=request.id)
            if meta is None:
                prediction, deck = self.dp.predict(
                    images,
                    policy=policy,
                    per_sample=per_sample,
                    timeout_s=timeout,
                    is_cancelled=cancelled,
                    model=self.deck_name,
                )
                probs, labels = prediction.probabilities, prediction.labels
                available = {"probabilities": probs, "labels": labels, "routing_weights": prediction.routing.weights}
                response.model_version = str(deck.version)
                response.parameters["policy"].string_param = prediction.routing.policy
                response.parameters["card_names"].string_param = ",".join(prediction.routing.card_names)
                response.parameters["selected_cards"].string_param = ",".join(prediction.routing.selected)
            else:
                if policy is not None or per_sample:
                    raise InvalidInput(
                        f"parameters: 'policy' and 'per_sample' apply to the deck model {self.deck_name!r}, not a card"
                    )
                probs, deck = self.dp.run_card(meta.name, images, timeout_s=timeout, is_cancelled=cancelled)
                available = {"probabilities": probs, "labels": probs.argmax(axis=1).astype(np.int64)}
                response.model_version = str(meta.version)
            tensors, raw = convert.oip_outputs(request, available)
            response.outputs.extend(tensors)
            response.raw_output_contents.extend(raw)
            return response

    # -- statistics ---------------------------------------------------------------------------
    @rpc_errors
    def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: grpc.ServicerContext
    ) -> oip.ModelStatisticsResponse:
        deck = self.dp.deck
        if request.name:
            self._model(request.name, request.version, deck)
            names = [request.name]
        else:
            names = self._names(deck)
        out = []
        for name in names:
            s = self.dp.stats(name)
            version = (
                str(deck.version)
                if name == self.deck_name
                else next((str(m.version) for m in deck.cards if m.name == name), "")
            )
            d = oip.StatisticDuration
            out.append(
                oip.ModelStatistics(
                    name=name,
                    version=version,
                    last_inference=s.last_inference_ms,
                    inference_count=s.inference_count,
                    execution_count=s.execution_count,
                    inference_stats=oip.InferStatistics(
                        success=d(count=s.success_count, ns=s.success_ns),
                        fail=d(count=s.fail_count, ns=s.fail_ns),
                        queue=d(count=s.success_count, ns=s.queue_ns),
                        compute_infer=d(count=s.success_count, ns=s.compute_ns),
                    ),
                    batch_stats=[
                        oip.InferBatchStatistics(batch_size=size, compute_infer=d(count=c, ns=ns))
                        for size, (c, ns) in sorted(s.batch_sizes.items())
                    ],
                )
            )
        return oip.ModelStatisticsResponse(model_stats=out)

    # -- repository ---------------------------------------------------------------------------
    @rpc_errors
    def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> oip.RepositoryIndexResponse:
        deck = self.dp.deck
        state = "READY" if self.dp.ready else "UNAVAILABLE"
        index = oip.RepositoryIndexResponse.ModelIndex
        models = [index(name=self.deck_name, version=str(deck.version), state=state)]
        models += [index(name=m.name, version=str(m.version), state=state) for m in deck.cards]
        return oip.RepositoryIndexResponse(models=models)

    @rpc_errors
    def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> oip.RepositoryModelLoadResponse:
        """Load = add a card: its ONNX bytes in ``parameters["file:model.onnx"]`` (bytes_param)."""
        with self.dp.request():
            name = request.model_name
            files = {k: v for k, v in request.parameters.items() if k.startswith("file:")}
            if name == self.deck_name and not files:
                return oip.RepositoryModelLoadResponse()  # the deck is always loaded
            check_card_name(name, "model_name")
            if not files:
                if name in self.dp.deck.card_names:
                    return oip.RepositoryModelLoadResponse()
                raise CardNotFound(
                    f"no card {shown(name)} in the deck; to add one send its ONNX file as "
                    "parameters['file:model.onnx'] (bytes_param)"
                )
            if len(files) != 1 or files.get("file:model.onnx") is None:
                raise InvalidInput(f"parameters: send exactly one file, 'file:model.onnx'; got {shown(sorted(files))}")
            data = files["file:model.onnx"].bytes_param
            if len(data) > self.settings.max_card_mb * MiB:
                raise TooLarge(f"card exceeds the server's limit of {self.settings.max_card_mb} MiB (max_card_mb)")
            meta = read_card_meta(data)
            if meta.name != name:
                raise InvalidInput(f"model_name: {shown(name)} does not match the card's own name {meta.name!r}")
            self.dp.add_card(data)
            return oip.RepositoryModelLoadResponse()

    @rpc_errors
    def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> oip.RepositoryModelUnloadResponse:
        """Unload = remove the card (every stored version) from the deck."""
        with self.dp.request():
            if request.model_name == self.deck_name:
                raise InvalidInput(
                    f"model_name: the deck model {self.deck_name!r} cannot be unloaded; unload its cards"
                )
            name = check_card_name(request.model_name, "model_name")
            self.dp.remove_card(name)
            return oip.RepositoryModelUnloadResponse()
