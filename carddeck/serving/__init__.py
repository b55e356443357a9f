"""The serving core, free of any transport: what the gRPC (:mod:`carddeck.server`) and HTTP
(:mod:`carddeck.http`) bindings both call. Nothing here imports grpc or an HTTP stack.

- :mod:`~carddeck.serving.snapshot`: the live deck snapshot (one store object, polled, swapped);
- :mod:`~carddeck.serving.models`: the models a deck serves, resolved by name in one place;
- :mod:`~carddeck.serving.plane`: what the transports call on a data plane (a Protocol: the local one below
  and Ray Serve's ingress both provide it);
- :mod:`~carddeck.serving.dataplane`: requests on a resolved model's snapshot, assembled from admission
  (in-flight accounting, drain), the image budget, dispatch (alone or into the micro-batcher,
  :mod:`~carddeck.serving.batching`), one micro-batch's run (:mod:`~carddeck.serving.microbatch`) and
  what each answer carries beside its probabilities (:mod:`~carddeck.serving.verdicts`);
- :mod:`~carddeck.serving.stats`: per-model statistics;
- :mod:`~carddeck.serving.uploads`: card uploads, however they arrive;
- :mod:`~carddeck.serving.access`: access levels and the bearer-token check;
- :mod:`~carddeck.serving.oip`: the Open Inference Protocol's view of a deck;
- :mod:`~carddeck.serving.settings`: ``carddeck serve``'s settings (both transports read them).
"""
