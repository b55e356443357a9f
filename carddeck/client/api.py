"""A small Python client for carddeck.v1.CardDeck (used by ``carddeck predict`` and ``carddeck deck``)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from carddeck.card import CardMeta
from carddeck.client.results import Added, Card, CardListing, Removed, error_from_rpc, listing
from carddeck.errors import InvalidInput, shown
from carddeck.wire import arrays
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2_grpc

CHUNK = 1 << 20  # AddCard chunk size: far below any message limit
DEFAULT_PORT = 8001  # the server's default gRPC port (Triton's convention)
DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORT}"
# One variable per secret for client and server; CARDDECK_TOKEN is the client's old name, still read.
INFERENCE_TOKEN_ENV = "CARDDECK_INFERENCE_TOKEN"
ADMIN_TOKEN_ENV = "CARDDECK_ADMIN_TOKEN"
TOKEN_ENV_ALIASES = {INFERENCE_TOKEN_ENV: ("CARDDECK_TOKEN",)}


def with_default_port(address: str) -> str:
    """``host`` or ``[v6]`` -> ``host:8001``: gRPC itself would pick 443 for a bare host name. An HTTP URL
    (what tritonclient.http takes) is refused here: gRPC would answer "Misformatted domain name"."""
    if address.lower().startswith(("http://", "https://")):
        host = address.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0] or "127.0.0.1"
        raise InvalidInput(
            f"server address {shown(address)} is an HTTP URL; this client speaks gRPC: give HOST[:PORT] "
            f"(port {DEFAULT_PORT} when omitted), e.g. {shown(f'{host}:{DEFAULT_PORT}')[1:-1]}"
        )
    if "://" in address or address.startswith("unix:"):
        return address  # a gRPC target URI says what it means
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{DEFAULT_PORT}"
    return address if ":" in address else f"{address}:{DEFAULT_PORT}"


@dataclass(frozen=True)
class Result:
    probabilities: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    routing: dict[str, Any]
    deck_version: int
    verdict: Verdict | None = None
    adapted: bool = False  # the deck's adaptive cards answered (the request was shifted)


@dataclass(frozen=True)
class Verdict:
    """Whether the deck can be believed on an answer (see the Verdict message in carddeck.proto)."""

    shift_state: str  # in_distribution | covered | uncovered | unknown
    scope: str  # batch | window | none
    expected_accuracy: float | None  # None: unknown
    expected_accuracy_kind: str  # estimate | upper_bound | unknown
    out_of_scope: np.ndarray  # [N] float32, > 1: out of scope (NaN: unknown)
    in_scope: np.ndarray  # [N] bool
    risk: np.ndarray  # [N] float32 estimated error probability
    abstained: np.ndarray  # [N] bool
    covered_by: str = ""  # why covered: known | in_scope | confidence | agreement ("" when not covered)

    @classmethod
    def from_proto(cls, v: pb.Verdict) -> Verdict:
        acc = v.expected_accuracy
        return cls(v.shift_state or "unknown", v.scope, None if np.isnan(acc) or v.expected_accuracy_kind == "unknown"
                   else acc, v.expected_accuracy_kind, np.asarray(v.out_of_scope, np.float32),
                   np.asarray(v.in_scope, bool), np.asarray(v.risk, np.float32),
                   np.asarray(v.abstained, bool), v.covered_by)  # fmt: skip


@dataclass(frozen=True)
class StreamAnswer:
    """One answer of :meth:`CardDeckClient.predict_stream`: the request's ``id`` and its ``result``, or
    the ``error`` a unary Predict would have raised (``code``: the gRPC status name, e.g. INVALID_ARGUMENT)."""

    id: str
    result: Result | None = None
    code: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.result is not None


def _result(r: pb.PredictResponse) -> Result:
    return Result(
        arrays.from_matrix(r.probabilities),
        np.asarray(r.labels, np.int64),
        list(r.label_names),
        routing_dict(r.routing),
        r.deck_version,
        Verdict.from_proto(r.verdict) if r.HasField("verdict") else None,
        r.adapted,
    )


def routing_dict(r: pb.Routing) -> dict[str, Any]:
    return {
        "policy": r.policy,
        "per_sample": r.per_sample,
        "card_names": list(r.card_names),
        "selected": list(r.selected),
        "cards_per_image": r.cards_per_image,
        "weights": arrays.from_matrix(r.weights),
        "domains": list(r.domains),
        "distances": arrays.from_matrix(r.distances),
    }


class CardDeckClient:
    def __init__(
        self,
        address: str = DEFAULT_SERVER,
        *,
        token: str = "",
        tls_ca: str | Path | None = None,
        tls: bool = False,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        timeout: float | None = 60.0,
    ) -> None:
        """``client_cert``/``client_key`` (PEM) are presented to a server that requires mutual TLS
        (``--tls-client-ca``); either one implies TLS, like ``tls_ca``."""
        if bool(client_cert) != bool(client_key):
            raise InvalidInput("a client certificate needs both client_cert and client_key (PEM files)")
        address = with_default_port(address)
        options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
        if tls or tls_ca or client_cert:
            credentials = grpc.ssl_channel_credentials(
                _read_pem(tls_ca, "tls_ca"), _read_pem(client_key, "client_key"), _read_pem(client_cert, "client_cert")
            )
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = carddeck_pb2_grpc.CardDeckStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CardDeckClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def predict(
        self,
        images: np.ndarray,
        *,
        policy: str = "",
        per_sample: bool = False,
        abstain_above_risk: float | None = None,
    ) -> Result:
        """``abstain_above_risk``: images whose estimated error probability exceeds it come back marked
        abstained in ``Result.verdict`` (labels still given)."""
        request = pb.PredictRequest(
            images=arrays.tensor_from_images(images),
            policy=policy,
            per_sample=per_sample,
            abstain_above_risk=abstain_above_risk,
        )
        return _result(self._call(self.stub.Predict, request))

    def predict_stream(
        self,
        requests: Iterable[np.ndarray | tuple[str, np.ndarray]],
        *,
        policy: str = "",
        per_sample: bool = False,
    ) -> Iterator[StreamAnswer]:
        """Predict for each batch of images over one streaming call (one call's overhead for all of them):
        answers in request order, each with its request's id (given as ``(id, images)``, else its index).
        A failed request is answered with its error and the stream goes on; only the stream itself
        failing raises (its :mod:`carddeck.errors` class, a ``grpc.RpcError`` too). Requests are sent as
        the server takes them, while answers arrive."""

        # Every request in order, with the error of one that could not be sent (images no tensor can carry):
        # answered here, in its place among the server's answers, and the stream goes on.
        order: deque[tuple[str, InvalidInput | None]] = deque()

        def messages() -> Iterator[pb.PredictStreamRequest]:
            for i, item in enumerate(requests):
                rid, images = item if isinstance(item, tuple) else (str(i), item)
                try:
                    tensor = arrays.tensor_from_images(images)
                except InvalidInput as exc:
                    order.append((rid, exc))
                    continue
                order.append((rid, None))
                yield pb.PredictStreamRequest(
                    id=rid, request=pb.PredictRequest(images=tensor, policy=policy, per_sample=per_sample)
                )

        def unsent(upto_sent: bool) -> Iterator[StreamAnswer]:
            while order:
                rid, exc = order.popleft()
                if exc is None:
                    if upto_sent:
                        return
                    continue
                yield StreamAnswer(rid, code=grpc.StatusCode.INVALID_ARGUMENT.name, error=str(exc))

        try:
            for answer in self.stub.PredictStream(messages(), metadata=self.metadata):  # no deadline: streams last
                yield from unsent(upto_sent=True)
                if answer.HasField("error"):
                    yield StreamAnswer(answer.id, code=answer.error.code, error=answer.error.message)
                else:
                    yield StreamAnswer(answer.id, _result(answer.response))
        except grpc.RpcError as exc:  # the stream itself failed: its typed error, as every other call raises
            raise error_from_rpc(exc) from None
        yield from unsent(upto_sent=False)

    def route(self, images: np.ndarray, *, policy: str = "", per_sample: bool = False) -> dict[str, Any]:
        request = pb.RouteRequest(images=arrays.tensor_from_images(images), policy=policy, per_sample=per_sample)
        return routing_dict(self._call(self.stub.Route, request).routing)

    def list_cards(self) -> CardListing:
        return listing(self._call(self.stub.ListCards, pb.ListCardsRequest()))

    def get_card(self, name: str, version: int = 0) -> CardMeta:
        card = self._call(self.stub.GetCard, pb.GetCardRequest(name=name, version=version))
        return CardMeta.from_json(card.meta_json)

    def add_card(self, model: bytes | str | Path) -> Added:
        data = model if isinstance(model, bytes) else Path(model).read_bytes()
        digest = hashlib.sha256(data).hexdigest()

        def chunks() -> Iterator[pb.AddCardChunk]:
            for i in range(0, len(data), CHUNK):
                yield pb.AddCardChunk(data=data[i : i + CHUNK], sha256=digest if i == 0 else "")

        r = self._call(self.stub.AddCard, chunks())
        return Added(Card.from_pb(r.card), r.deck_version, r.already_present)

    def remove_card(self, name: str, version: int = 0) -> Removed:
        r = self._call(self.stub.RemoveCard, pb.RemoveCardRequest(name=name, version=version))
        return Removed(r.deck_version, r.default_policy, r.default_policy_note)


def _read_pem(path: str | Path | None, name: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{name}: cannot read {path}: {exc.strerror}") from None


# -- shared CLI plumbing -----------------------------------------------------------------------
def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:  # 0 or less (or inf, to gRPC): DEADLINE_EXCEEDED before the call is sent
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text!r}")
    return value


def add_client_arguments(parser: argparse.ArgumentParser, *, token_env: str = INFERENCE_TOKEN_ENV) -> None:
    env = os.environ.get
    parser.add_argument(
        "--server",
        default=env("CARDDECK_SERVER", DEFAULT_SERVER),
        help=f"HOST[:PORT], port {DEFAULT_PORT} when omitted [env CARDDECK_SERVER]",
    )
    parser.add_argument("--token-file", help=f"file holding the bearer token [else env {token_env}]")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    parser.add_argument(
        "--tls-ca", default=env("CARDDECK_TLS_CA"), help="PEM CA bundle that signed the server's certificate "
        "(implies --tls) [env CARDDECK_TLS_CA]"
    )  # fmt: skip
    parser.add_argument(
        "--client-cert", default=env("CARDDECK_CLIENT_CERT"),
        help="PEM client certificate, for a server that requires mutual TLS (implies --tls) [env CARDDECK_CLIENT_CERT]",
    )  # fmt: skip
    parser.add_argument(
        "--client-key", default=env("CARDDECK_CLIENT_KEY"),
        help="PEM private key of --client-cert [env CARDDECK_CLIENT_KEY]",
    )  # fmt: skip
    parser.add_argument("--timeout", type=_seconds, default=60.0, help="seconds per call")
    parser.set_defaults(token_env=token_env)


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        return (_read_pem(args.token_file, "--token-file") or b"").decode().strip()
    for name in (args.token_env, *TOKEN_ENV_ALIASES.get(args.token_env, ())):
        if os.environ.get(name):
            return os.environ[name]
    return ""


def client_from_args(args: argparse.Namespace) -> CardDeckClient:
    return CardDeckClient(
        args.server,
        token=_token(args),
        tls_ca=args.tls_ca,
        tls=args.tls,
        client_cert=args.client_cert,
        client_key=args.client_key,
        timeout=args.timeout,
    )


def rpc_error_message(exc: grpc.RpcError) -> str:
    """A failed call (a client error, :class:`~carddeck.client.results.RemoteError`) as one line for the CLI."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    hint = ""
    unavailable = code == grpc.StatusCode.UNAVAILABLE
    if unavailable and "http1.x server" in (details or ""):
        hint = f" (that port answers HTTP/1.1: --server takes the gRPC port, {DEFAULT_PORT} by default, not HTTP's)"
    elif unavailable and "handshake failed" in (details or "").lower():
        hint = (
            " (TLS failed: a server started without --tls-cert speaks plain gRPC, so drop --tls/--tls-ca; "
            "else --tls-ca must name the CA that signed its certificate)"
        )
    elif unavailable and "connect" in (details or ""):
        hint = (
            " (is `carddeck serve` running there? --server HOST[:PORT] names another server; "
            "a server with --tls-cert needs --tls-ca or --tls)"
        )
    return f"carddeck: error: {code.name if code else 'RPC failed'}: {details}{hint}"


def _plain(o: Any) -> Any:
    """numpy arrays and scalars as JSON numbers and lists (a float32 distance must not become a string);
    NaN and infinities as null (JSON has no such numbers: strict parsers refuse ``NaN``)."""
    if isinstance(o, np.ndarray | np.generic):
        o = o.tolist()
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_plain(v) for v in o]
    return o


def to_json(obj: Any) -> str:
    return json.dumps(_plain(obj), indent=2, allow_nan=False)


__all__ = [
    "CardDeckClient",
    "Result",
    "add_client_arguments",
    "client_from_args",
    "rpc_error_message",
    "with_default_port",
]
