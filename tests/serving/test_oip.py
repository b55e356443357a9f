"""The Open Inference Protocol's view of a deck (carddeck/serving/oip.py) over a real data plane, no transport.

Each test names the mutant of oip.py it kills.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from carddeck.errors import CardNotFound, InvalidInput
from carddeck.gating.shift import Trust
from carddeck.serving.codec import InferRequest, Tensor
from carddeck.serving.dataplane import Dataplane, DataplaneConfig
from carddeck.serving.oip import OipModels, verdict_parameters
from tests.servers import card, smooth_images


@pytest.fixture
def models(deck_path) -> Iterator[OipModels]:
    dp = Dataplane(DataplaneConfig(deck_path=deck_path, poll_interval_s=0, max_batch_size=8))
    dp.start()
    batching = {"preferred_batch_size": [16], "max_queue_delay_microseconds": 5000}  # what the flags would say
    try:
        yield OipModels(dp, deck_name="carddeck", max_request_images=4, max_card_bytes=1 << 20,
                        dynamic_batching=batching)  # fmt: skip
    finally:
        dp.close()


def request(images: np.ndarray, **parameters) -> InferRequest:
    return InferRequest("carddeck", inputs=(Tensor("images", "UINT8", images.shape, images.tobytes()),),
                        parameters=parameters)  # fmt: skip


def test_the_deck_model_answers_every_output_and_its_routing_and_verdict(models):
    """Mutants: routing_weights columns not in card order; the verdict parameters left out; labels not the
    argmax of the probabilities."""
    images = smooth_images(3)
    model = models.resolve("carddeck")
    result = models.infer(model, request(images, policy="nearest-domain"))
    assert (result.model_name, result.model_version) == ("carddeck", str(model.deck.version))
    assert list(result.outputs) == ["probabilities", "labels", "routing_weights", "out_of_scope"]
    assert [t.name for t in models.metadata(model).outputs] == list(result.outputs)  # metadata order
    probabilities = result.outputs["probabilities"]
    assert np.array_equal(result.outputs["labels"], probabilities.argmax(axis=1))
    want = model.deck.predict(images, policy="nearest-domain")  # all to a1: one column of ones
    np.testing.assert_allclose(probabilities, want.probabilities, atol=1e-6)
    assert result.parameters["card_names"] == ",".join(model.deck.card_names)
    np.testing.assert_allclose(result.outputs["routing_weights"], want.routing.weights)
    assert want.routing.selected == ("a1",)
    assert result.parameters["policy"] == "nearest-domain" and result.parameters["shift_state"] == "unknown"
    assert result.parameters["adapted"] == "false"


def test_a_card_answers_alone_and_refuses_the_decks_parameters(models):
    """Mutant: a card taking 'policy' (or the abstention bound) and ignoring it."""
    images = smooth_images(2)
    a1 = models.resolve("a1", "1")
    result = models.infer(a1, request(images))
    assert list(result.outputs) == ["probabilities", "labels"] and result.model_version == "1"
    np.testing.assert_allclose(result.outputs["probabilities"], a1.deck.run_card("a1", images), atol=1e-6)
    for parameters in ({"policy": "soft"}, {"per_sample": True}, {"abstain_above_risk": 0.1}):
        with pytest.raises(InvalidInput, match="apply to the deck model 'carddeck', not a card"):
            models.infer(a1, request(images, **parameters))


def test_a_bad_streamed_request_fails_at_submit_and_settles_its_announcement(models):
    """Mutant: submit raising without withdrawing the stream's announcement (the batcher would wait for a
    request that never comes, up to its queue delay, on every batch)."""
    model = models.resolve("carddeck")
    batcher = models.dp.dispatch.batcher  # type: ignore[attr-defined]
    for bad in (request(smooth_images(5)), request(smooth_images(1), polcy="soft")):  # 5 > 4 images; a typo
        models.dp.announce()
        with pytest.raises(InvalidInput):
            models.submit(model, bad, announced=True)
        assert batcher._expected == 0
    assert models.submit(model, request(smooth_images(1))).result(timeout=30).outputs["labels"].shape == (1,)


def test_verdict_parameters_say_unknown_and_list_abstentions_only_when_asked():
    """Mutants: an unknown expected accuracy sent as "nan"; abstained_images sent without a bound."""
    probabilities = np.array([[0.9, 0.1], [0.55, 0.45]], np.float32)
    unknown = verdict_parameters(None, 2, None)
    assert unknown["expected_accuracy"] == "unknown" and unknown["shift_state"] == "unknown"
    assert "abstained_images" not in unknown and unknown["out_of_scope_images"] == ""
    bounded = verdict_parameters(Trust.unknown(2, probabilities), 2, 0.3)
    assert bounded["abstained_images"] == "1"  # risk 0.45 > 0.3; 0.1 is not


def test_the_model_configuration_follows_the_models_own_batching(models):
    """Mutants: max_batch_size from the batcher instead of --max-request-images; dynamic_batching from the
    server's flags instead of this model's policy (the deck manifest may override them)."""
    config = models.config(models.resolve("carddeck"))
    assert config["max_batch_size"] == 4
    # the model's policy (the data plane's max_batch_size 8 and 2 ms), not the dict it was given
    assert config["dynamic_batching"] == {"preferred_batch_size": [8], "max_queue_delay_microseconds": 2000}
    assert config["parameters"]["card_names"] == {"string_value": "g1,a1"}
    assert "card_names" not in models.config(models.resolve("g1"))["parameters"]


def test_load_and_unload_check_names_and_files(models):
    """Mutants: a card loaded under a name that is not its own; the deck model unloadable; a load without
    files for a card that is not there taken as a no-op."""
    models.load("carddeck", {})  # the deck is always loaded
    models.load("a1", {})  # a loaded card: no-op
    with pytest.raises(CardNotFound, match="no card 'zz' in the deck; to add one send its ONNX file"):
        models.load("zz", {})
    with pytest.raises(InvalidInput, match=r"send exactly one file, 'file:model.onnx'; got \['file:x'\]"):
        models.load("zz", {"file:x": b"1"})
    onnx = card("b1", "augmix", seed=3)
    with pytest.raises(InvalidInput, match="model_name: 'zz' does not match the card's own name 'b1'"):
        models.load("zz", {"file:model.onnx": onnx})
    models.load("b1", {"file:model.onnx": onnx})
    assert "b1" in models.dp.deck.card_names
    with pytest.raises(InvalidInput, match="the deck model 'carddeck' cannot be unloaded"):
        models.unload("carddeck")
    models.unload("b1")
    assert "b1" not in models.dp.deck.card_names
