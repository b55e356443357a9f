"""The KServe V2 / Triton REST routes: each converts JSON to :mod:`carddeck.serving.oip` calls and back.

Each route names the Open Inference Protocol RPC it mirrors and declares its access level (open,
inference token, or admin token), the same as that gRPC method's. Handlers are synchronous and run
in a worker thread, like the gRPC servicer's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from carddeck.errors import InvalidInput, NotReady, shown
from carddeck.http import tensors
from carddeck.serving.access import Access
from carddeck.serving.oip import OipModels, TensorInfo, server_metadata
from carddeck.serving.plane import Plane
from carddeck.serving.snapshot import STORE_KEY

EXTENSIONS = ("model_repository", "model_configuration", "statistics", "binary_tensor_data", "parameters")
ADMIN, INFERENCE, OPEN = Access.ADMIN, Access.INFERENCE, Access.OPEN
H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True)
class Call:
    params: Mapping[str, str]  # path parameters: model, version
    body: bytes | bytearray
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Reply:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str | None = None


def work(handler: H) -> H:
    """Declare a route one that does work (inference, card changes), like its gRPC RPC's ``@rpc(..., work=True)``:
    the endpoint wrapper (:mod:`carddeck.http.server`) counts it in flight and refuses it once the server drains."""
    handler.work = True  # type: ignore[attr-defined]
    return handler


def json_reply(value: Any) -> Reply:
    return Reply(json.dumps(value, separators=(",", ":")).encode(), media_type="application/json")


def not_ready(exc: NotReady) -> Reply:
    """The health routes' "false": 400 with the reason, not the 503 of refused work. The Open Inference
    Protocol answers ServerReady and ModelReady with 200 for true and a 4xx for false; Triton answers 400 for
    both (HandleServerHealth, HandleModelReady), except ModelReady while the server itself is not ready (503,
    from its core's UNAVAILABLE), the only way a model of ours is not ready: we follow the protocol there.
    KServe's Python server answers 503. Load balancers and Kubernetes probes fail on any of them."""
    return Reply(json.dumps({"error": str(exc)}).encode(), status=400, media_type="application/json")


def _tensor(t: TensorInfo) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


class Routes:
    def __init__(self, dataplane: Plane, models: OipModels) -> None:
        self.dp = dataplane
        self.models = models

    def table(self) -> list[tuple[str, str, str, Access, Callable[[Call], Reply]]]:
        """(HTTP method, path, mirrored OIP RPC, access, handler) of every route.

        Each route declares its access here, beside its handler; it is the mirrored gRPC RPC's
        (tests/http/test_routes.py holds the two transports to the same levels)."""
        model, version = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
        return [
            ("GET", "/v2/health/live", "ServerLive", OPEN, self.live),
            ("GET", "/v2/health/ready", "ServerReady", OPEN, self.ready),
            ("GET", "/v2", "ServerMetadata", INFERENCE, self.server_metadata),
            ("GET", "/v2/models/stats", "ModelStatistics", INFERENCE, self.statistics),  # before /v2/models/{model}
            *(("GET", path, "ModelMetadata", INFERENCE, self.model_metadata) for path in (model, version)),
            *(("GET", path + "/ready", "ModelReady", INFERENCE, self.model_ready) for path in (model, version)),
            *(("GET", path + "/config", "ModelConfig", INFERENCE, self.model_config) for path in (model, version)),
            *(("GET", path + "/stats", "ModelStatistics", INFERENCE, self.statistics) for path in (model, version)),
            *(("POST", path + "/infer", "ModelInfer", INFERENCE, self.infer) for path in (model, version)),
            ("POST", "/v2/repository/index", "RepositoryIndex", INFERENCE, self.repository_index),
            ("POST", "/v2/repository/models/{model}/load", "RepositoryModelLoad", ADMIN, self.load),
            ("POST", "/v2/repository/models/{model}/unload", "RepositoryModelUnload", ADMIN, self.unload),
        ]

    # -- health and metadata ------------------------------------------------------------------
    def live(self, call: Call) -> Reply:
        return Reply()

    def ready(self, call: Call) -> Reply:
        try:
            self._check_ready()
        except NotReady as exc:
            return not_ready(exc)
        return Reply(headers={STORE_KEY: self.dp.store_state.describe()})

    def _check_ready(self) -> None:
        if not self.dp.ready:
            deck = self.dp.deck  # NotReady while no deck is loaded
            if not deck.cards:
                raise NotReady(f"not ready: deck version {deck.version} has no cards; add one")
            raise NotReady("not ready: the server is shutting down")

    def server_metadata(self, call: Call) -> Reply:
        return json_reply(server_metadata(EXTENSIONS))

    def model_metadata(self, call: Call) -> Reply:
        info = self.models.metadata(self._model(call))
        return json_reply(
            {
                "name": info.name,
                "versions": [info.version],
                "platform": info.platform,
                "inputs": [_tensor(t) for t in info.inputs],
                "outputs": [_tensor(t) for t in info.outputs],
            }
        )

    def model_ready(self, call: Call) -> Reply:
        try:
            self._model(call)  # an unknown model is 404 (CardNotFound), not merely "not ready"
        except NotReady as exc:  # no deck loaded yet: nothing is ready
            return not_ready(exc)
        return self.ready(call)

    def model_config(self, call: Call) -> Reply:
        return json_reply(self.models.config(self._model(call)))

    def statistics(self, call: Call) -> Reply:
        stats = self.models.statistics(call.params.get("model", ""), call.params.get("version", ""))
        return json_reply({"model_stats": stats})

    def _model(self, call: Call) -> Any:
        return self.models.resolve(call.params["model"], call.params.get("version", ""))

    # -- inference ----------------------------------------------------------------------------
    @work
    def infer(self, call: Call) -> Reply:
        model = self._model(call)
        body = tensors.parse_infer_body(call.body, call.headers.get(tensors.HEADER_LENGTH))
        request, wanted, binary_default = tensors.infer_request(model.name, model.version, body)
        result = self.models.infer(model, request)
        data, header_length = tensors.encode_result(result, wanted, binary_default, request.id)
        if header_length is None:
            return Reply(data, media_type="application/json")
        return Reply(data, headers={"Inference-Header-Content-Length": str(header_length)},
                     media_type="application/octet-stream")  # fmt: skip

    # -- repository extension -----------------------------------------------------------------
    def repository_index(self, call: Call) -> Reply:
        ready_only = tensors.json_object(call.body, "request body").get("ready", False)
        if not isinstance(ready_only, bool):
            raise InvalidInput(f"ready: must be a bool, got {shown(ready_only)}")
        return json_reply(
            [
                {"name": name, "version": version, "state": state}
                for name, version, state in self.models.index()
                if state == "READY" or not ready_only
            ]
        )

    @work
    def load(self, call: Call) -> Reply:
        files = tensors.load_files(tensors.json_object(call.body, "request body"))
        self.models.load(call.params["model"], files)
        return Reply()

    @work
    def unload(self, call: Call) -> Reply:
        tensors.json_object(call.body, "request body")  # parameters (unload_dependents) do not apply
        self.models.unload(call.params["model"])
        return Reply()


__all__ = ["EXTENSIONS", "Call", "Reply", "Routes", "not_ready", "work"]
