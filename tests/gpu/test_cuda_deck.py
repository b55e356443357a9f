"""The default deck on ONNX Runtime's CUDA execution provider, in process and served.

Needs onnxruntime-gpu (``pip install carddeck[gpu]``) and a CUDA device; the default run deselects
these tests, run them with ``python -m pytest -m gpu``. Asked for explicitly on a machine without a
usable GPU they fail (saying why) rather than skip: a GPU check that silently ran on CPU proves nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

from carddeck.client.api import CardDeckClient
from carddeck.data import load_dataset
from carddeck.data.corruptions import corrupt
from carddeck.deck import Deck, default_deck_path
from carddeck.deck.runtime import CPU, CUDA
from tests.servers import start_server

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    clean = load_dataset("digits32", "test").images[:32]
    return np.concatenate([clean, corrupt(clean, "gaussian_noise", 5, seed=0), corrupt(clean, "fog", 5, seed=0)])


@pytest.fixture(scope="module")
def cpu_deck() -> Deck:
    return Deck.open(default_deck_path(), providers=[CPU])


def require_cuda() -> None:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA not in available:
        pytest.fail(f"-m gpu needs onnxruntime-gpu and a CUDA device; this onnxruntime offers {available}")


def test_every_card_session_runs_on_cuda_and_agrees_with_cpu(images, cpu_deck):
    require_cuda()
    deck = Deck.open(default_deck_path(), providers=[CUDA, CPU])
    assert {name: p[0] for name, p in deck.providers().items()} == dict.fromkeys(deck.card_names, CUDA)
    on_gpu, on_cpu = deck.predict(images), cpu_deck.predict(images)
    assert on_gpu.routing.card_names == on_cpu.routing.card_names
    np.testing.assert_array_equal(on_gpu.routing.weights, on_cpu.routing.weights)  # the gate runs on the CPU
    # cuDNN convolutions use TF32 on this class of GPU: probabilities agree to about 3e-3
    np.testing.assert_allclose(on_gpu.probabilities, on_cpu.probabilities, atol=1e-2)
    assert (on_gpu.labels == on_cpu.labels).mean() >= 0.99


def test_server_on_cuda_answers_like_the_cpu_deck(tmp_path, images, cpu_deck):
    require_cuda()
    server = start_server(default_deck_path(), tmp_path, "--providers", f"{CUDA},{CPU}")
    try:
        with CardDeckClient(server.address) as client:
            result = client.predict(images)
        log = server.log()
        assert f"providers ['{CUDA}', '{CPU}']" in log, log[-2000:]
        assert f"providers ['{CPU}']" not in log, log[-2000:]  # no card fell back to the CPU alone
        np.testing.assert_allclose(result.probabilities, cpu_deck.predict(images).probabilities, atol=1e-2)
    finally:
        server.terminate()
