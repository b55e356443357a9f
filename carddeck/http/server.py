"""The HTTP server: Starlette routes on uvicorn, in a thread of the ``carddeck serve`` process.

Starlette + uvicorn (h11, asyncio): both are small, widely used and maintained ASGI pieces with no
compiled dependencies; the asyncio loop only reads bodies and writes replies, while the handlers
(numpy, ONNX Runtime, which release the GIL) run in a thread pool sized like the gRPC server's.

Every route goes through :func:`_endpoint`: bearer-token auth (the same rule as the gRPC method it mirrors),
the request-size limit (413 before reading more than the limit), drain accounting for the routes that do work
(:func:`carddeck.http.routes.work`), the request id, the metrics (``service="http"``, the route template in
``rpc``, the HTTP status in ``code``) and the one error table of :mod:`carddeck.http.errors`, answered as
``{"error": ...}``. An all-JSON body has a tighter limit of its own (``--max-json-mb``): parsing JSON holds
the GIL, and costs many times its size. Connections are guarded below the application
(:mod:`carddeck.http.connections`): a deadline for each whole request, a cap on open connections, and an
answer for requests cut short by either or by SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import ssl
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from carddeck.errors import CarddeckError, InvalidInput, TooLarge, Unauthenticated, shown
from carddeck.http.connections import CUT_KEY, Limits, connection_cap, guarded_protocol
from carddeck.http.errors import status_for
from carddeck.http.routes import Call, Reply, Routes
from carddeck.observability.logs import REQUEST_ID_KEY, request_id_from, request_id_var
from carddeck.observability.metrics import Metrics
from carddeck.serving.access import Access, Tokens, bearer_token
from carddeck.serving.oip import OipModels
from carddeck.serving.plane import Plane
from carddeck.serving.settings import Settings
from carddeck.serving.uploads import MiB

log = logging.getLogger(__name__)
access_log = logging.getLogger("carddeck.access")
SERVICE = "http"
# asyncio accepts up to `backlog` connections in one go before any of them is seen (and the cap applied):
# a small burst keeps a flood of connects from taking the descriptors the cap leaves to gRPC and /metrics
ACCEPT_BURST = 128


def _json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _too_large(problem: str, limit: int, json_only: bool, flag: str) -> TooLarge:
    if json_only:  # parsing JSON costs the whole process time and many times its size in memory
        return TooLarge(
            f"JSON request body {problem} the server's limit of {limit} bytes for JSON (--max-json-mb); send "
            "large tensors with the binary tensor data extension (header Inference-Header-Content-Length, "
            "inputs[i].parameters.binary_data_size; tritonclient.http does so by default)"
        )
    return TooLarge(f"request body {problem} the server's limit of {limit} bytes ({flag})")


async def read_body(
    request: Request, limit: int, json_limit: int | None = None, flag: str = "--max-message-mb"
) -> bytes | bytearray:
    """The body, refused (413) as soon as it passes ``limit`` bytes, inflated when gzip/deflate-encoded.

    ``json_limit``: the tighter limit of a body that is all JSON (no binary tensor part after a JSON header)."""
    if json_limit is not None and request.headers.get("inference-header-content-length") is None:
        limit, json_only = min(limit, json_limit), True
    else:
        json_only = False
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(f"of {int(declared)} bytes exceeds", limit, json_only, flag)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large("exceeds", limit, json_only, flag)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(
            f"header Content-Encoding: {shown(encoding)} is not accepted; send identity, gzip or deflate"
        )
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(bytes(body), limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body: not valid {encoding} data ({exc})") from None
    if len(out) > limit:
        raise _too_large("inflates past", limit, json_only, flag)
    if not inflater.eof:
        raise InvalidInput(f"request body: truncated {encoding} data")
    return out


def _endpoint(
    handler: Callable[[Call], Reply],
    route: str,
    access: Access,
    tokens: Tokens,
    metrics: Metrics | None,
    limit: int,
    json_limit: int | None,
    admit: Callable[[], AbstractContextManager[Any]],
    flag: str,
) -> Callable[[Request], Any]:
    work = getattr(handler, "work", False)  # counted in flight and refused once draining (routes.work)

    async def endpoint(request: Request) -> Response:
        start = time.perf_counter()
        rid = request_id_from([(REQUEST_ID_KEY, request.headers.get(REQUEST_ID_KEY, ""))])
        token = request_id_var.set(rid)  # run_in_threadpool copies the context: the handler logs it too
        if metrics is not None:
            metrics.rpc_started(SERVICE, route)
        response: Response
        try:
            refusal = tokens.refusal(access, bearer_token(request.headers.items()))
            if refusal is not None:
                raise Unauthenticated(refusal)
            body = await read_body(request, limit, json_limit, flag) if request.method == "POST" else b""
            with admit() if work else contextlib.nullcontext():
                reply = await run_in_threadpool(handler, Call(request.path_params, body, request.headers))
            response = Response(reply.body, reply.status, reply.headers, reply.media_type)
        except ClientDisconnect:  # the client went away mid-body: nginx's 499, not a server error
            response = Response(status_code=499)
        except asyncio.CancelledError:
            if CUT_KEY not in request.scope:  # cut short at shutdown, already answered 503: nothing to raise
                raise
            response = Response(status_code=503)
        except CarddeckError as exc:
            response = _json_error(status_for(exc), str(exc))
        except Exception as exc:  # routes raise carddeck errors only, so this is a bug: no traceback to the client
            log.exception("internal error in %s %s", request.method, route)
            response = _json_error(500, f"internal error in {route}: {type(exc).__name__}")
        finally:
            request_id_var.reset(token)
        response.headers[REQUEST_ID_KEY] = rid
        seconds = time.perf_counter() - start
        status = request.scope.get(CUT_KEY, response.status_code)  # what the client actually got
        code = str(status)
        if metrics is not None:
            metrics.rpc_finished(SERVICE, route, code, seconds)
        level = logging.DEBUG if status < 400 else logging.WARNING if status >= 500 else logging.INFO
        access_log.log(
            level, "http %s %s %s in %.1f ms", request.method, route, code, seconds * 1e3,
            extra={"request_id": rid, "rpc": route, "code": code, "duration_ms": seconds * 1e3},
        )  # fmt: skip
        return response

    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and methods: Starlette's 404/405, as JSON like every other error."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return _json_error(status, f"{request.method} {request.url.path}: {detail}")


def build_app(settings: Settings, dataplane: Plane, *, metrics: Metrics | None = None) -> Starlette:
    models = OipModels.from_settings(dataplane, settings)
    tokens = Tokens.from_settings(settings)
    message_limit = settings.max_message_mb * MiB
    json_limit = settings.max_json_mb * MiB
    card_limit = settings.max_card_mb * MiB * 4 // 3 + MiB  # a card travels base64-encoded in JSON: one string
    routes = []
    for method, path, rpc, access, handler in Routes(dataplane, models).table():
        load = rpc == "RepositoryModelLoad"
        limit, json_only = (card_limit, None) if load else (message_limit, json_limit)
        flag = "--max-card-mb" if load else "--max-message-mb"
        endpoint = _endpoint(handler, path, access, tokens, metrics, limit, json_only, dataplane.request, flag)
        routes.append(Route(path, endpoint, methods=[method]))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.workers  # like the gRPC pool
        yield

    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=lifespan)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a taken port fails `carddeck serve` at start with a clear error."""
    # proto must say TCP: asyncio turns Nagle off (TCP_NODELAY) only on sockets that do, and with Nagle on,
    # a reply's headers and body wait out the client's delayed ACK (~40 ms per request).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise InvalidInput(
            f"cannot listen for HTTP on {host}:{port}: {exc.strerror}; stop the other server or choose another port "
            "with --http-port (0: any free port, -1: no HTTP) [env CARDDECK_HTTP_PORT]"
        ) from None
    return sock


@dataclass
class HttpServer:
    """A running HTTP server; ``port`` is the bound one (useful with port 0)."""

    server: uvicorn.Server
    thread: threading.Thread
    port: int

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)


def start_http_server(settings: Settings, dataplane: Plane, *, metrics: Metrics | None = None) -> HttpServer:
    """Serve the Open Inference Protocol over HTTP on ``settings.host:settings.http_port`` from a thread."""
    sock = _listen(settings.host, settings.http_port)
    tls: dict[str, Any] = {}
    if settings.tls_cert:  # the same certificate (and client CA) as the gRPC port
        tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
        if settings.tls_client_ca:
            tls.update(ssl_ca_certs=settings.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    cap = connection_cap(settings.http_max_connections)
    if cap < settings.http_max_connections:
        log.warning("HTTP connections capped at %d (not --http-max-connections %d): the open-file limit is %d",
                    cap, settings.http_max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # fmt: skip
    config = uvicorn.Config(
        build_app(settings, dataplane, metrics=metrics),
        http=guarded_protocol(Limits(settings.http_request_timeout_s, cap)),
        backlog=ACCEPT_BURST,
        log_config=None,
        access_log=False,  # carddeck.access logs every request with its id
        lifespan="on",
        timeout_graceful_shutdown=2,
        **tls,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="carddeck-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise InvalidInput(f"the HTTP server on {settings.host}:{settings.http_port} did not start; see the log")
        time.sleep(0.01)
    return HttpServer(server, thread, sock.getsockname()[1])


__all__ = ["HttpServer", "build_app", "read_body", "start_http_server"]
