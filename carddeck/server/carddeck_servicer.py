"""carddeck.v1.CardDeck: convert protobuf, call the data plane, convert back."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import grpc
import numpy as np

from carddeck.deck import DeckStore
from carddeck.errors import CardNotFound, InvalidInput, TooLarge
from carddeck.server import convert
from carddeck.server.proto_gen.carddeck.v1 import carddeck_pb2 as pb
from carddeck.server.proto_gen.carddeck.v1 import carddeck_pb2_grpc
from carddeck.server.status_codes import rpc_errors
from carddeck.serving.dataplane import Dataplane
from carddeck.serving.oip import check_card_name
from carddeck.serving.settings import Settings

MiB = 1 << 20


def receive_card(chunks: Iterator[bytes], *, limit_bytes: int) -> tuple[bytes, str]:
    """Streamed card bytes, joined in memory (no temporary file a crash could leave behind); TooLarge past
    the limit. Returns the bytes and their sha256 hex digest."""
    buf = bytearray()
    for data in chunks:
        if len(buf) + len(data) > limit_bytes:
            raise TooLarge(f"card upload exceeds the server's limit of {limit_bytes // MiB} MiB (max_card_mb)")
        buf += data
    if not buf:
        raise InvalidInput("data: empty upload; stream the ONNX file's bytes in AddCardChunk.data")
    data = bytes(buf)
    del buf  # one copy of the card at a time
    return data, hashlib.sha256(data).hexdigest()


class CardDeckServicer(carddeck_pb2_grpc.CardDeckServicer):
    def __init__(self, dataplane: Dataplane, settings: Settings) -> None:
        self.dp = dataplane
        self.settings = settings

    def _images(self, tensor: pb.Tensor) -> np.ndarray:
        return convert.images_from_tensor(tensor, max_images=self.settings.max_request_images)

    @rpc_errors
    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        with self.dp.request():
            images = self._images(request.images)
            prediction, deck = self.dp.predict(
                images,
                policy=request.policy or None,
                per_sample=request.per_sample,
                timeout_s=context.time_remaining(),
                is_cancelled=lambda: not context.is_active(),
                model=self.settings.deck_model_name,
            )
            names = deck.class_names
            return pb.PredictResponse(
                probabilities=convert.matrix(prediction.probabilities),
                labels=prediction.labels.tolist(),
                label_names=[names[i] for i in prediction.labels],
                routing=convert.routing_to_proto(prediction.routing),
                deck_version=deck.version,
                class_names=names,
            )

    @rpc_errors
    def Route(self, request: pb.RouteRequest, context: grpc.ServicerContext) -> pb.RouteResponse:
        with self.dp.request():
            images = self._images(request.images)
            routing, deck = self.dp.route(images, policy=request.policy or None, per_sample=request.per_sample)
            return pb.RouteResponse(routing=convert.routing_to_proto(routing), deck_version=deck.version)

    @rpc_errors
    def ListCards(self, request: pb.ListCardsRequest, context: grpc.ServicerContext) -> pb.ListCardsResponse:
        deck = self.dp.deck
        return pb.ListCardsResponse(
            cards=[convert.card_to_proto(m) for m in deck.cards],
            deck_version=deck.version,
            default_policy=deck.default_policy,
            class_names=deck.class_names,
            default_policy_note=deck.policy_note,
        )

    @rpc_errors
    def GetCard(self, request: pb.GetCardRequest, context: grpc.ServicerContext) -> pb.Card:
        name = check_card_name(request.name)
        deck = self.dp.deck
        if request.version == 0:
            for meta in deck.cards:
                if meta.name == name:
                    return convert.card_to_proto(meta)
        else:  # any stored version, served or not
            for meta in DeckStore(deck.root).list_cards(all_versions=True):
                if meta.name == name and meta.version == request.version:
                    return convert.card_to_proto(meta)
        what = f"{name!r}" + (f" version {request.version}" if request.version else "")
        raise CardNotFound(f"no card {what} in the deck (cards: {', '.join(deck.card_names) or 'none'})")

    @rpc_errors
    def AddCard(self, request_iterator: Iterator[pb.AddCardChunk], context: grpc.ServicerContext) -> pb.AddCardResponse:
        with self.dp.request():
            expected = [""]

            def chunks() -> Iterator[bytes]:
                for chunk in request_iterator:
                    if chunk.sha256:
                        expected[0] = chunk.sha256
                    yield chunk.data

            data, digest = receive_card(chunks(), limit_bytes=self.settings.max_card_mb * MiB)
            if expected[0] and digest != expected[0].lower():
                raise InvalidInput(f"sha256: the upload's digest {digest} does not match {expected[0]}")
            meta, new = self.dp.add_card(data)
            return pb.AddCardResponse(
                card=convert.card_to_proto(meta), deck_version=self.dp.deck.version, already_present=not new
            )

    @rpc_errors
    def RemoveCard(self, request: pb.RemoveCardRequest, context: grpc.ServicerContext) -> pb.RemoveCardResponse:
        with self.dp.request():
            name = check_card_name(request.name)
            _, note = self.dp.remove_card(name, request.version or None)
            deck = self.dp.deck
            return pb.RemoveCardResponse(
                deck_version=deck.version, default_policy=deck.default_policy, default_policy_note=note
            )
