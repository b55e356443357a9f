"""carddeck.v1.CardDeck: convert protobuf, call the data plane, convert back."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import grpc
import numpy as np

from carddeck.errors import InvalidInput
from carddeck.server import convert
from carddeck.server.auth import ADMIN, INFERENCE, rpc
from carddeck.server.streams import answer_in_order, error_of
from carddeck.serving.codec import risk_bound
from carddeck.serving.models import Model, check_card_name
from carddeck.serving.plane import Plane
from carddeck.serving.settings import Settings
from carddeck.serving.uploads import CardUpload, MiB
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2_grpc


class CardDeckServicer(carddeck_pb2_grpc.CardDeckServicer):
    def __init__(self, dataplane: Plane, settings: Settings) -> None:
        self.dp = dataplane
        self.settings = settings

    def _images(self, tensor: pb.Tensor, model: Model) -> np.ndarray:
        return convert.tensor(tensor).images(model.input, self.settings.max_request_images)

    @rpc(INFERENCE, work=True)
    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        bound = risk_bound(_bound_of(request), "abstain_above_risk")
        model = self.dp.resolve()  # the gated deck on the snapshot this request keeps
        prediction, deck = self.dp.predict(
            self._images(request.images, model),
            model=model,
            policy=request.policy or None,
            per_sample=request.per_sample,
            timeout_s=context.time_remaining(),
            is_cancelled=lambda: not context.is_active(),
        )
        return convert.predict_response(prediction, deck, bound)

    @rpc(INFERENCE, work=True)
    def PredictStream(
        self, request_iterator: Iterator[pb.PredictStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.PredictStreamResponse]:
        """Predict for each request of the stream, answered in request order with its id; a failed
        request gets its error (the status a unary Predict would end with) and the stream goes on."""

        def start(item: pb.PredictStreamRequest) -> Future[Any]:
            request = item.request
            try:
                model = self.dp.resolve()
                images = self._images(request.images, model)
                risk_bound(_bound_of(request), "abstain_above_risk")
            except BaseException:
                self.dp.withdraw()  # announced by the stream's reader, and it will not come
                raise
            return self.dp.submit(
                model,
                images,
                policy=request.policy or None,
                per_sample=request.per_sample,
                is_cancelled=lambda: not context.is_active(),
                announced=True,
            )

        def respond(item: pb.PredictStreamRequest, future: Future[Any]) -> pb.PredictStreamResponse:
            error = error_of(future)
            if error is not None:
                return pb.PredictStreamResponse(id=item.id, error=pb.StreamError(code=error[0], message=error[1]))
            prediction, deck = future.result()
            response = convert.predict_response(prediction, deck, _bound_of(item.request))
            return pb.PredictStreamResponse(id=item.id, response=response)

        coming = (self.dp.announce, self.dp.withdraw)
        yield from answer_in_order(request_iterator, context, start, respond, coming=coming, name="predict-stream")

    @rpc(INFERENCE, work=True)
    def Route(self, request: pb.RouteRequest, context: grpc.ServicerContext) -> pb.RouteResponse:
        model = self.dp.resolve()
        images = self._images(request.images, model)
        routing = model.deck.route(images, policy=request.policy or None, per_sample=request.per_sample)
        return pb.RouteResponse(routing=convert.routing_to_proto(routing), deck_version=model.deck.version)

    @rpc(INFERENCE)
    def ListCards(self, request: pb.ListCardsRequest, context: grpc.ServicerContext) -> pb.ListCardsResponse:
        deck = self.dp.deck
        return pb.ListCardsResponse(
            cards=[convert.card_to_proto(m) for m in deck.cards],
            deck_version=deck.version,
            default_policy=deck.default_policy,
            class_names=deck.class_names,
            default_policy_note=deck.policy_note,
        )

    @rpc(INFERENCE)
    def GetCard(self, request: pb.GetCardRequest, context: grpc.ServicerContext) -> pb.Card:
        """The served card, or any stored version of it (``version``)."""
        name = check_card_name(request.name)
        return convert.card_to_proto(self.dp.deck.card(name, card_version(request.version) or None))

    @rpc(ADMIN, work=True)
    def AddCard(self, request_iterator: Iterator[pb.AddCardChunk], context: grpc.ServicerContext) -> pb.AddCardResponse:
        upload = CardUpload(self.settings.max_card_mb * MiB, field="AddCardChunk.data")
        for chunk in request_iterator:
            upload.add(chunk.data, chunk.sha256)
        meta, new = self.dp.add_card(upload.finish())
        return pb.AddCardResponse(
            card=convert.card_to_proto(meta), deck_version=self.dp.deck.version, already_present=not new
        )

    @rpc(ADMIN, work=True)
    def RemoveCard(self, request: pb.RemoveCardRequest, context: grpc.ServicerContext) -> pb.RemoveCardResponse:
        name = check_card_name(request.name)
        _, note = self.dp.remove_card(name, card_version(request.version, "every version") or None)
        deck = self.dp.deck
        return pb.RemoveCardResponse(
            deck_version=deck.version, default_policy=deck.default_policy, default_policy_note=note
        )


def card_version(version: int, zero: str = "the served one") -> int:
    if version < 0:
        raise InvalidInput(f"version: expected a card version (>= 1; 0: {zero}), got {version}")
    return version


def _bound_of(request: pb.PredictRequest) -> float | None:
    return request.abstain_above_risk if request.HasField("abstain_above_risk") else None
