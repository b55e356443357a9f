"""Observability, free of any transport: Prometheus metrics in an injected registry
(:mod:`~carddeck.observability.metrics`), structured logs with request ids
(:mod:`~carddeck.observability.logs`) and the distribution-shift signal
(:mod:`~carddeck.observability.shift`). The gRPC interceptor that feeds the metrics lives in
:mod:`carddeck.server.interceptors`: it wraps gRPC handlers and reads gRPC status codes.
"""
