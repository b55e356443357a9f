"""What Ray Serve's gRPC proxy imports (``grpc_servicer_functions``): the carddeck.v1 service.

The generated messages call their module ``carddeck.v1.carddeck_pb2`` (the proto's path), which is not an
importable name here. Ray pickles requests and responses by reference between the proxy and the ingress
replica, so that name is registered for the generated module in both processes (this module is imported
by each).
"""

import sys

from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2
from carddeck.wire.proto_gen.carddeck.v1.carddeck_pb2_grpc import add_CardDeckServicer_to_server

sys.modules.setdefault(carddeck_pb2.PredictRequest.__module__, carddeck_pb2)

__all__ = ["add_CardDeckServicer_to_server"]
