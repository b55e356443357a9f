"""The serving core, free of any transport: what the gRPC and HTTP bindings both call.

For now it holds the Open Inference Protocol's view of a deck (:mod:`carddeck.serving.oip`); the
data plane, batching and statistics move here from ``carddeck.server`` with the serving-runtime
redesign.
"""
