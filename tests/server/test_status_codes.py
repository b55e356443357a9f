"""The one table per transport: a lost race is retryable (ABORTED / 409), other conflicts are not."""

import grpc
import pytest

from carddeck import errors
from carddeck.http.errors import status_for as http_status
from carddeck.server.status_codes import status_for as grpc_status


@pytest.mark.parametrize(
    ("exc", "code", "http"),
    [
        (errors.ConcurrentChange("another writer committed first"), grpc.StatusCode.ABORTED, 409),
        (
            errors.DeckConflict("card g1/1 is already in the deck with other bytes"),
            grpc.StatusCode.FAILED_PRECONDITION,
            409,
        ),
        (errors.ReadOnlyDeck("the deck is read-only"), grpc.StatusCode.FAILED_PRECONDITION, 409),
        (RuntimeError("a bug"), grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_each_error_class_has_its_status(exc, code, http):
    assert grpc_status(exc) == code
    assert http_status(exc) == http


def test_a_cancelled_request_past_its_deadline_is_deadline_exceeded():
    """``abort_with`` on a real gRPC server: Cancelled with the caller's deadline gone is DEADLINE_EXCEEDED
    (the README: "a deadline that passes while queued"); without a deadline it stays CANCELLED."""
    from concurrent.futures import ThreadPoolExecutor

    from carddeck.server.status_codes import abort_with
    from tests.servers import wait_for

    seen: list[grpc.StatusCode] = []

    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"wait":  # for the deadline to pass, as a request queued too long does
            wait_for(lambda: context.time_remaining() <= 0, "the deadline to pass", timeout=30, every=0.01)
        try:
            abort_with(context, errors.Cancelled("deadline passed in the queue"))
        finally:
            seen.append(context.code())

    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.T", {"Call": grpc.unary_unary_rpc_method_handler(handler)}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.T/Call")
            for done, (payload, timeout) in enumerate(((b"wait", 0.2), (b"", None)), start=1):
                with pytest.raises(grpc.RpcError):
                    call(payload, timeout=timeout)
                wait_for(lambda done=done: len(seen) >= done, "the handler to finish", timeout=30)
    finally:
        server.stop(None)
    assert seen == [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED]
