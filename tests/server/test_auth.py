import grpc

from carddeck.server.auth import AuthInterceptor, bearer_token

ADD = "/carddeck.v1.CardDeck/AddCard"
PREDICT = "/carddeck.v1.CardDeck/Predict"
LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"
HEALTH = "/grpc.health.v1.Health/Check"


def md(token: str | None):
    return () if token is None else (("authorization", f"Bearer {token}"),)


def test_bearer_token_parsing():
    assert bearer_token(md("abc")) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) is None
    assert bearer_token(()) is None


def test_admin_rpcs_need_the_admin_token():
    auth = AuthInterceptor(admin_token="adm")
    for method in (ADD, LOAD):
        assert auth.check(method, md(None))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert auth.check(method, md("nope"))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert auth.check(method, md("adm")) is None
    assert auth.check(PREDICT, md(None)) is None  # inference open without an inference token


def test_admin_rpcs_are_disabled_without_a_token_unless_opened():
    closed = AuthInterceptor()
    code, message = closed.check(ADD, md("anything"))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "CARDDECK_ADMIN_TOKEN" in message
    assert AuthInterceptor(allow_unauthenticated_admin=True).check(ADD, md(None)) is None


def test_inference_token_when_configured_and_probes_stay_open():
    auth = AuthInterceptor(admin_token="adm", inference_token="inf")
    assert auth.check(PREDICT, md(None))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert auth.check(PREDICT, md("inf")) is None
    assert auth.check(PREDICT, md("adm")) is None
    assert auth.check(HEALTH, md(None)) is None
    assert auth.check("/inference.GRPCInferenceService/ServerReady", md(None)) is None
