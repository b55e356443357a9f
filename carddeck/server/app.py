"""Wiring: one gRPC server with the CardDeck API, the Open Inference Protocol, health and reflection.

Hook for observability: ``build_server(..., interceptors=[...])`` puts extra interceptors
(metrics, request ids, logging) *before* authentication, so refused calls are observed too; the
data plane takes an optional ``metrics`` object (see :class:`~carddeck.serving.dataplane.MetricsHook`).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from carddeck.errors import InvalidInput
from carddeck.server.auth import AuthInterceptor, declared_access, open_access
from carddeck.server.carddeck_servicer import CardDeckServicer
from carddeck.server.handlers import add_servicer
from carddeck.server.health import Health
from carddeck.server.oip_servicer import OipServicer
from carddeck.serving.access import Access, Tokens
from carddeck.serving.plane import Plane
from carddeck.serving.settings import Settings
from carddeck.serving.uploads import MiB
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2
from carddeck.wire.proto_gen.inference import grpc_service_pb2, model_config_pb2

log = logging.getLogger(__name__)

CARDDECK_SERVICE = carddeck_pb2.DESCRIPTOR.services_by_name["CardDeck"]
OIP_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION_SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
SERVICE_NAMES = tuple(s.full_name for s in (CARDDECK_SERVICE, OIP_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE))


def access_table() -> dict[str, Access]:
    """Every served method's access level: ours as each handler declares it, health and reflection open."""
    return {
        **declared_access(CardDeckServicer, CARDDECK_SERVICE),
        **declared_access(OipServicer, OIP_SERVICE),
        **open_access(HEALTH_SERVICE),
        **open_access(REFLECTION_SERVICE),
        # not served, but clients (grpcurl) probe reflection v1 first and fall back to v1alpha on UNIMPLEMENTED
        REFLECTION_V1: Access.OPEN,
    }


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """Every served file in one pool (the OIP messages live outside protobuf's default pool)."""
    pool = descriptor_pool.DescriptorPool()
    seen: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        for dep in file.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        seen.add(file.name)

    for module in (carddeck_pb2, model_config_pb2, grpc_service_pb2, health_pb2, reflection_pb2):
        add(module.DESCRIPTOR)
    return pool


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None

    def read(path: str, name: str) -> bytes:
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise InvalidInput(f"setting {name!r}: cannot read {path}: {exc.strerror}") from None

    pair = (read(settings.tls_key, "tls_key"), read(settings.tls_cert, "tls_cert"))
    ca = read(settings.tls_client_ca, "tls_client_ca") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def build_server(
    settings: Settings,
    dataplane: Plane,
    health: Health,
    *,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, int]:
    """A server bound to ``settings.address`` (not started) and the port it got."""
    auth = AuthInterceptor(Tokens.from_settings(settings), access_table())
    limit = settings.max_message_mb * MiB
    server = grpc.server(
        ThreadPoolExecutor(settings.workers, thread_name_prefix="carddeck-rpc"),
        interceptors=[*interceptors, auth],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ],
        maximum_concurrent_rpcs=None,
    )
    add_servicer(server, CardDeckServicer(dataplane, settings), CARDDECK_SERVICE, dataplane.request)
    add_servicer(server, OipServicer(dataplane, settings), OIP_SERVICE, dataplane.request)
    health.add_to(server)
    add_servicer(server, reflection.ReflectionServicer(SERVICE_NAMES, pool=reflection_pool()), REFLECTION_SERVICE)
    credentials = _credentials(settings)
    if not port_free(settings.host, settings.port):  # say it ourselves: grpc would log an error line of its own
        raise InvalidInput(_port_in_use(settings))
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.address)
        else:
            port = server.add_secure_port(settings.address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:  # grpc says no more than that it failed: the port is taken, or the host is not ours
        raise InvalidInput(_port_in_use(settings))
    return server, port


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (port 0 always can). Binds like grpc does (SO_REUSEADDR)."""
    if port == 0:
        return True
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return True  # not resolvable: let grpc report it
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
    return True


def host_problem(host: str) -> str | None:
    """Why nothing can listen on ``host`` (not resolvable, not an address of this machine), else None:
    said before any port is tried, so that no message blames a port for a wrong host. One address that
    binds is enough (``localhost`` may also name a ::1 that a machine without IPv6 lacks)."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except OSError as exc:
        return exc.strerror or str(exc)
    problem = "no address"
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            try:
                s.bind(address)
                return None
            except OSError as exc:
                problem = exc.strerror or str(exc)
    return problem


def _port_in_use(settings: Settings) -> str:
    return (
        f"cannot listen for gRPC on {settings.address}: port {settings.port} is in use (or {settings.host} is not "
        "an address of this machine); stop the other server or choose another port with --port (0: any free "
        "port) [env CARDDECK_PORT]"
    )


__all__ = ["SERVICE_NAMES", "access_table", "build_server", "reflection_pool"]
