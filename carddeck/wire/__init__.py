"""The wire formats both ends share: the generated protobuf stubs (:mod:`carddeck.wire.proto_gen`, from
``proto/`` by ``proto/generate.py``) and the array conversions of :mod:`carddeck.wire.arrays`. Client and
server import this package, never each other."""
