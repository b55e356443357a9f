"""The serving core, free of any transport: what the gRPC (:mod:`carddeck.server`) and HTTP
(:mod:`carddeck.http`) bindings both call.

- :mod:`~carddeck.serving.snapshot`: the live deck snapshot (one store object, polled, swapped);
- :mod:`~carddeck.serving.dataplane`: requests on that snapshot, micro-batching
  (:mod:`~carddeck.serving.batching`), drain;
- :mod:`~carddeck.serving.stats`: per-model statistics;
- :mod:`~carddeck.serving.oip`: the Open Inference Protocol's view of a deck;
- :mod:`~carddeck.serving.settings`: ``carddeck serve``'s settings (both transports read them).
"""
