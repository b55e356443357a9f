"""The Open Inference Protocol (KServe V2 / Triton) over HTTP/REST, on the serving core.

Routes (:mod:`carddeck.http.routes`) convert JSON and the binary tensor data extension
(:mod:`carddeck.http.tensors`) to the calls of :mod:`carddeck.serving.oip`, the same calls the
gRPC servicer makes; :mod:`carddeck.http.server` runs them on Starlette + uvicorn beside the gRPC
server, with the same bearer tokens, limits and metrics.
"""

from carddeck.http.server import HttpServer, start_http_server

__all__ = ["HttpServer", "start_http_server"]
