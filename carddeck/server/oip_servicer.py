"""inference.GRPCInferenceService (Open Inference Protocol): the deck is one model, each card another.

The models, their inputs, outputs and parameters are :mod:`carddeck.serving.oip`'s (shared with the
HTTP binding); this servicer converts protobuf to and from it. Outputs are always in
raw_output_contents.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future

import grpc
from google.protobuf import json_format

import carddeck
from carddeck.server import convert
from carddeck.server.auth import ADMIN, INFERENCE, OPEN, rpc
from carddeck.server.streams import answer_in_order, error_of
from carddeck.serving.codec import InferResult
from carddeck.serving.oip import OipModels
from carddeck.serving.plane import Plane
from carddeck.serving.settings import Settings
from carddeck.serving.snapshot import STORE_KEY
from carddeck.wire.proto_gen.inference import grpc_service_pb2 as oip
from carddeck.wire.proto_gen.inference import grpc_service_pb2_grpc
from carddeck.wire.proto_gen.inference import model_config_pb2 as mc

EXTENSIONS = ("model_repository", "model_configuration", "statistics", "parameters")
StreamAnswer = oip.ModelStreamInferResponse
FINAL_ASKED, FINAL, FALSE = "triton_enable_empty_final_response", "triton_final_response", oip.InferParameter()
Tensor = oip.ModelMetadataResponse.TensorMetadata


class OipServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: Plane, settings: Settings) -> None:
        self.dp = dataplane
        self.settings = settings
        self.models = OipModels.from_settings(dataplane, settings)

    # -- health and metadata ------------------------------------------------------------------
    @rpc(OPEN)
    def ServerLive(self, request: oip.ServerLiveRequest, context: grpc.ServicerContext) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    @rpc(OPEN)
    def ServerReady(self, request: oip.ServerReadyRequest, context: grpc.ServicerContext) -> oip.ServerReadyResponse:
        # ready while it serves, even from a stale snapshot; the store's state rides along, as over HTTP
        context.set_trailing_metadata(((STORE_KEY, self.dp.store_state.describe()),))
        return oip.ServerReadyResponse(ready=self.dp.ready)

    @rpc(INFERENCE)
    def ModelReady(self, request: oip.ModelReadyRequest, context: grpc.ServicerContext) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=self.models.is_ready(request.name, request.version))

    @rpc(INFERENCE)
    def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="carddeck", version=carddeck.__version__, extensions=EXTENSIONS)

    @rpc(INFERENCE)
    def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ModelMetadataResponse:
        info = self.models.metadata(self.models.resolve(request.name, request.version))
        return oip.ModelMetadataResponse(
            name=info.name,
            versions=[info.version],
            platform=info.platform,
            inputs=[Tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in info.inputs],
            outputs=[Tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in info.outputs],
        )

    @rpc(INFERENCE)
    def ModelConfig(self, request: oip.ModelConfigRequest, context: grpc.ServicerContext) -> oip.ModelConfigResponse:
        config = self.models.config(self.models.resolve(request.name, request.version))
        return oip.ModelConfigResponse(config=json_format.ParseDict(config, mc.ModelConfig()))

    # -- inference ----------------------------------------------------------------------------
    @rpc(INFERENCE, work=True)
    def ModelInfer(self, request: oip.ModelInferRequest, context: grpc.ServicerContext) -> oip.ModelInferResponse:
        model = self.models.resolve(request.model_name, request.model_version)
        result = self.models.infer(
            model,
            convert.infer_request(request),
            timeout_s=context.time_remaining(),
            is_cancelled=lambda: not context.is_active(),
        )
        return convert.oip_infer_response(request, result)

    @rpc(INFERENCE, work=True)
    def ModelStreamInfer(
        self, request_iterator: Iterator[oip.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[oip.ModelStreamInferResponse]:
        """Triton's stream: one answer per request, in request order, with its id; a failed request is
        answered with its ``error_message`` and the stream goes on (:mod:`carddeck.server.streams`)."""

        def start(request: oip.ModelInferRequest) -> Future[InferResult]:
            try:
                model = self.models.resolve(request.model_name, request.model_version)
                infer = convert.infer_request(request)
            except BaseException:
                self.dp.withdraw()  # announced by the stream's reader, and it will not come
                raise
            cancelled = lambda: not context.is_active()  # noqa: E731
            return self.models.submit(model, infer, is_cancelled=cancelled, announced=True)

        def respond(request: oip.ModelInferRequest, future: Future[InferResult]) -> StreamAnswer:
            error = error_of(future)
            if error is not None:  # Triton's stream carries the message only
                answer = StreamAnswer(error_message=error[1], infer_response=oip.ModelInferResponse(id=request.id))
            else:
                answer = StreamAnswer(infer_response=convert.oip_infer_response(request, future.result()))
            if request.parameters.get(FINAL_ASKED, FALSE).bool_param:
                # Triton's flag for clients that wait for each request's last response (tritonclient's
                # enable_empty_final_response): one answer per request here, so each is the last
                answer.infer_response.parameters[FINAL].bool_param = True
            return answer

        coming = (self.dp.announce, self.dp.withdraw)
        yield from answer_in_order(request_iterator, context, start, respond, coming=coming, name="stream-infer")

    # -- statistics ---------------------------------------------------------------------------
    @rpc(INFERENCE)
    def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: grpc.ServicerContext
    ) -> oip.ModelStatisticsResponse:
        stats = self.models.statistics(request.name, request.version)
        return json_format.ParseDict({"model_stats": stats}, oip.ModelStatisticsResponse())

    # -- repository ---------------------------------------------------------------------------
    @rpc(INFERENCE)
    def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> oip.RepositoryIndexResponse:
        index = oip.RepositoryIndexResponse.ModelIndex
        return oip.RepositoryIndexResponse(
            models=[index(name=name, version=version, state=state) for name, version, state in self.models.index()]
        )

    @rpc(ADMIN, work=True)
    def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> oip.RepositoryModelLoadResponse:
        """Load = add a card: its ONNX bytes in ``parameters["file:model.onnx"]`` (bytes_param)."""
        files = {k: v.bytes_param for k, v in request.parameters.items() if k.startswith("file:")}
        self.models.load(request.model_name, files)
        return oip.RepositoryModelLoadResponse()

    @rpc(ADMIN, work=True)
    def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> oip.RepositoryModelUnloadResponse:
        """Unload = remove the card (every stored version) from the deck."""
        self.models.unload(request.model_name)
        return oip.RepositoryModelUnloadResponse()
