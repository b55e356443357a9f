"""Streaming inference against a live server: Triton's ModelStreamInfer through tritonclient's stream
API, and our PredictStream through CardDeckClient. Answers come in request order with their ids; a bad
request is answered with its error and the stream goes on."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from carddeck.client.api import CardDeckClient
from carddeck.deck import Deck
from tests.servers import noisy_images, smooth_images

pytestmark = pytest.mark.integration


def _infer_input(tc, images: np.ndarray):
    inp = tc.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(np.ascontiguousarray(images))
    return inp


def test_tritonclient_stream_keeps_order_and_ids_and_survives_bad_requests(server):
    import tritonclient.grpc as tc

    deck = Deck.open(server.deck)
    answers: list[tuple[object, object]] = []
    all_in = threading.Event()
    # (request id, model, images, parameters, what a bad one's error names)
    sent = []
    for i in range(24):
        images = smooth_images(1 + i % 3, seed=i) if i % 2 else noisy_images(1 + i % 3, seed=i)
        sent.append((f"req-{i}", "carddeck", images, None, None))
    sent.insert(5, ("bad-shape", "carddeck", smooth_images(2)[:, :, :16], None, "16"))  # 16 columns, not 32
    sent.insert(9, ("bad-model", "no-such-model", smooth_images(1), None, "no-such-model"))
    sent.insert(14, ("bad-policy", "carddeck", smooth_images(1), {"policy": "nope"}, "nope"))
    sent.insert(20, ("card", "a1", noisy_images(2), None, None))

    def callback(result, error) -> None:
        answers.append((result, error))
        if len(answers) == len(sent):
            all_in.set()

    client = tc.InferenceServerClient(server.address)
    client.start_stream(callback=callback)
    try:
        for rid, model, images, parameters, _ in sent:
            client.async_stream_infer(model, [_infer_input(tc, images)], request_id=rid, parameters=parameters)
        assert all_in.wait(120), f"{len(answers)} of {len(sent)} answers"
    finally:
        client.stop_stream()
        client.close()
    for (rid, model, images, _, bad), (result, error) in zip(sent, answers):
        if bad is not None:
            assert result is None and bad in str(error), (rid, error)
            continue
        assert error is None, (rid, error)
        assert result.get_response().id == rid  # in request order, with its id
        if model == "a1":
            want = deck.run_card("a1", images)
        else:
            want = deck.predict(images).probabilities
            assert result.get_response().parameters["selected_cards"].string_param == (
                "a1" if rid in {f"req-{i}" for i in range(1, 24, 2)} else "g1"
            )
        np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-6)


def test_predict_stream_through_the_client(server):
    deck = Deck.open(server.deck)
    requests = [(f"r{i}", smooth_images(2, seed=i) if i % 2 else noisy_images(2, seed=i)) for i in range(40)]
    requests.insert(7, ("bad", smooth_images(2)[..., :2]))  # 2 channels, not 3
    with CardDeckClient(server.address) as client:
        answers = list(client.predict_stream(iter(requests)))
        assert [a.id for a in answers] == [rid for rid, _ in requests]
        for (rid, images), answer in zip(requests, answers):
            if rid == "bad":
                assert not answer.ok and answer.code == "INVALID_ARGUMENT" and "3" in answer.error
                continue
            want = deck.predict(images)
            assert answer.ok and answer.result.routing["selected"] == list(want.routing.selected)
            np.testing.assert_allclose(answer.result.probabilities, want.probabilities, atol=1e-6)
        policy = list(client.predict_stream([smooth_images(1)], policy="nope"))  # ids default to the index
        assert policy[0].id == "0" and policy[0].code == "INVALID_ARGUMENT" and "nope" in policy[0].error
        assert client.predict(smooth_images(1)).labels.shape == (1,)  # the server is fine after both


def test_predict_stream_answers_a_request_it_cannot_send_in_its_place(server):
    """Mutants: images the client cannot encode (int64, a list of ints) raised inside gRPC's request
    iterator (the whole stream failed with "Exception iterating requests!"); or sent as FP32, so that the
    error names a dtype the caller never sent."""
    ints = smooth_images(1).astype(np.int64)
    requests = [("a", smooth_images(1)), ("ints", ints), ("b", noisy_images(1)), ("list", ints.tolist()),
                ("c", smooth_images(1)), ("last", ints)]  # fmt: skip
    with CardDeckClient(server.address) as client:
        answers = list(client.predict_stream(requests))
    assert [a.id for a in answers] == [rid for rid, _ in requests]
    for (rid, _), answer in zip(requests, answers, strict=True):
        if rid in ("ints", "list", "last"):
            assert not answer.ok and answer.code == "INVALID_ARGUMENT" and "dtype int64" in answer.error, answer
        else:
            assert answer.ok, answer


def test_a_stream_request_that_asks_for_the_final_flag_gets_it(server):
    """Mutant: tritonclient's enable_empty_final_response accepted and ignored: a client waiting for each
    request's `triton_final_response` (Triton sets it on the last response of a request) would wait forever."""
    import queue

    import tritonclient.grpc as tc

    answers: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(server.address)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for rid, flag in (("flagged", True), ("plain", False)):
            client.async_stream_infer("carddeck", [_infer_input(tc, smooth_images(1))], request_id=rid,
                                      enable_empty_final_response=flag)  # fmt: skip
        got = {}
        for _ in range(2):
            result, error = answers.get(timeout=60)
            assert error is None, error
            got[result.get_response().id] = result.get_response().parameters
    finally:
        client.stop_stream()
        client.close()
    assert got["flagged"]["triton_final_response"].bool_param is True
    assert "triton_final_response" not in got["plain"]  # only when asked, as Triton does for a plain model
