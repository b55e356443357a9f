"""Auth: each RPC declares its access level beside its handler; the interceptor enforces the declarations."""

from collections import namedtuple

import grpc
import pytest

from carddeck.http.routes import Routes
from carddeck.server.app import CARDDECK_SERVICE, OIP_SERVICE, access_table
from carddeck.server.auth import ADMIN, INFERENCE, OPEN, AuthInterceptor, declared_access, rpc
from carddeck.server.carddeck_servicer import CardDeckServicer
from carddeck.server.oip_servicer import OipServicer
from carddeck.serving.access import Tokens, bearer_token

ADD = "/carddeck.v1.CardDeck/AddCard"
PREDICT = "/carddeck.v1.CardDeck/Predict"
LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"
HEALTH = "/grpc.health.v1.Health/Check"
Details = namedtuple("Details", "method invocation_metadata")  # what grpc passes an interceptor


def md(token: str | None):
    return () if token is None else (("authorization", f"Bearer {token}"),)


def auth(**tokens) -> AuthInterceptor:
    return AuthInterceptor(Tokens(**tokens), access_table())


@pytest.mark.parametrize(("servicer", "service"), [(CardDeckServicer, CARDDECK_SERVICE), (OipServicer, OIP_SERVICE)])
def test_every_rpc_of_both_services_declares_its_access(servicer, service):
    table = declared_access(servicer, service)  # raises TypeError naming any RPC that declares nothing
    assert sorted(table) == sorted(f"/{service.full_name}/{m.name}" for m in service.methods)


def test_an_rpc_without_a_declaration_is_refused_at_registration():
    class Forgetful(CardDeckServicer):
        def Predict(self, request, context):  # overrides the declared handler, declares nothing
            raise AssertionError("never called")

    with pytest.raises(TypeError, match=r"RPCs Predict declare no access level"):
        declared_access(Forgetful, CARDDECK_SERVICE)

    class Partial(Forgetful):
        Predict = rpc(INFERENCE)(Forgetful.Predict)

    assert declared_access(Partial, CARDDECK_SERVICE)[PREDICT] is INFERENCE


def test_admin_is_declared_exactly_on_the_rpcs_that_change_the_deck():
    admins = {method for method, access in access_table().items() if access is ADMIN}
    assert admins == {
        ADD,
        "/carddeck.v1.CardDeck/RemoveCard",
        LOAD,
        "/inference.GRPCInferenceService/RepositoryModelUnload",
    }


def test_http_routes_declare_the_access_of_the_grpc_rpc_they_mirror():
    grpc_access = declared_access(OipServicer, OIP_SERVICE)
    table = Routes(None, None).table()  # type: ignore[arg-type]  (only the table, no call)
    assert {rpc_name for _, _, rpc_name, _, _ in table} <= {m.name for m in OIP_SERVICE.methods}
    for method, path, rpc_name, access, _ in table:
        assert access is grpc_access[f"/inference.GRPCInferenceService/{rpc_name}"], (method, path)


def test_http_routes_do_work_where_the_grpc_rpc_they_mirror_does():
    """Drain accounting is declared beside each handler (gRPC ``@rpc(..., work=True)``, HTTP ``@work``) and
    applied by each transport's one wrapper: a route that forgot it would be served while the server drains."""
    grpc_servicer = OipServicer.__dict__
    table = Routes(None, None).table()  # type: ignore[arg-type]
    for method, path, rpc_name, _, handler in table:
        assert getattr(handler, "work", False) == getattr(grpc_servicer[rpc_name], "work", False), (method, path)
    assert {rpc_name for _, _, rpc_name, _, h in table if getattr(h, "work", False)} == {
        "ModelInfer", "RepositoryModelLoad", "RepositoryModelUnload"
    }  # fmt: skip


def test_bearer_token_parsing():
    assert bearer_token(md("abc")) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) is None
    assert bearer_token(()) is None


def test_admin_rpcs_need_the_admin_token():
    a = auth(admin_token="adm")
    for method in (ADD, LOAD):
        assert a.check(method, md(None))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert a.check(method, md("nope"))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert a.check(method, md("adm")) is None
    assert a.check(PREDICT, md(None)) is None  # inference open without an inference token


def test_admin_rpcs_are_disabled_without_a_token_unless_opened():
    code, message = auth().check(ADD, md("anything"))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "CARDDECK_ADMIN_TOKEN" in message
    assert auth(allow_unauthenticated_admin=True).check(ADD, md(None)) is None


def test_inference_token_when_configured_and_probes_stay_open():
    a = auth(admin_token="adm", inference_token="inf")
    assert a.check(PREDICT, md(None))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert a.check(PREDICT, md("inf")) is None
    assert a.check(PREDICT, md("adm")) is None
    assert a.check(HEALTH, md(None)) is None
    assert a.check("/inference.GRPCInferenceService/ServerReady", md(None)) is None
    assert access_table()["/inference.GRPCInferenceService/ServerLive"] is OPEN
    assert a.check("/carddeck.v1.CardDeck/NoSuchRpc", md(None))[0] == grpc.StatusCode.UNAUTHENTICATED
    # reflection v1 is not served: the probe must reach grpc's UNIMPLEMENTED so that clients fall back to v1alpha
    assert a.check("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", md(None)) is None


def _call(interceptor, method: str, token: str | None, handler):
    details = Details(method, md(token))
    return interceptor.intercept_service(lambda d: handler, details)


def test_the_interceptor_lets_through_exactly_what_check_allows():
    """Calls that need no token skip reading the metadata; the others are still checked, call by call."""
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"")
    a = auth(admin_token="adm", inference_token="inf")
    assert _call(a, HEALTH, None, handler) is handler
    assert _call(a, PREDICT, None, handler) is not handler  # refused: an abort handler
    assert _call(a, PREDICT, "inf", handler) is handler
    assert _call(a, ADD, "inf", handler) is not handler
    assert _call(a, ADD, "adm", handler) is handler
    open_inference = auth(admin_token="adm")
    assert _call(open_inference, PREDICT, None, handler) is handler
    assert _call(open_inference, ADD, None, handler) is not handler
    assert _call(auth(), ADD, None, handler) is not handler  # admin disabled without a token
