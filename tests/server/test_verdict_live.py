"""Every answer carries its verdict, on live servers: `carddeck predict`, OIP over gRPC and HTTP
(tritonclient, unchanged), a card added on a live server (refit without the train extra), an S3 deck."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from carddeck.client.api import CardDeckClient
from carddeck.data.datasets import load_dataset
from carddeck.deck import Deck, DeckStore
from carddeck.gating.shift_fit import refit_from_deck
from tests.deck.test_s3 import bucket, s3_endpoint, s3_env  # noqa: F401 - fixtures
from tests.http.conftest import http_server
from tests.servers import ADMIN_TOKEN, ROOT, card, start_server

pytestmark = pytest.mark.integration


def foreign_photo() -> np.ndarray:
    """A photograph bundled with scikit-learn (a Chinese temple), box-averaged down to 32 x 32: uint8 [1, 32, 32, 3]."""
    from sklearn.datasets import load_sample_image

    img = load_sample_image("china.jpg")[:416, :608]  # 427 x 640 -> multiples of 13 and 19
    small = img.reshape(32, 13, 32, 19, 3).mean(axis=(1, 3))
    return small.round().astype(np.uint8)[None]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """The packaged default deck (its shipped shift detector), gRPC and HTTP."""
    srv = http_server(None, tmp_path_factory.mktemp("default"))
    yield srv
    srv.process.terminate()


def test_a_foreign_photo_through_carddeck_predict_prints_the_warning(default_server, tmp_path):
    from PIL import Image

    path = tmp_path / "temple.png"
    Image.fromarray(foreign_photo()[0]).save(path)
    digit = tmp_path / "digit.npy"
    np.save(digit, load_dataset("digits32", "test").images[:1])
    out = subprocess.run(
        [sys.executable, "-m", "carddeck", "predict", "--server", default_server.process.address, str(path),
         str(digit)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith(f"  warning: {path}: out of scope") for line in lines), out.stdout
    assert not any("warning" in line and "digit.npy" in line for line in lines), out.stdout  # a digit is in scope


def test_carddeck_predict_says_when_a_cover_rests_on_the_cards_word(default_server, tmp_path):
    """Plain lines name the path of a batch covered on the cards' own outputs (spatter/3: their confidence;
    saturate/5: in scope), as --json does, and say nothing for one near a known condition (gaussian noise/3)
    or a clean one. Kills a plain output without covered_by, and one that flags the "known" path too."""
    from carddeck.data.corruptions import corrupt

    digits = _digits(16)
    files = {}
    for name, images in (("clean", digits), ("noise3", corrupt(digits, "gaussian_noise", 3, seed=0)),
                         ("spatter3", corrupt(digits, "spatter", 3, seed=0)),
                         ("saturate5", corrupt(digits, "saturate", 5, seed=0))):  # fmt: skip
        files[name] = tmp_path / f"{name}.npy"
        np.save(files[name], images)

    def predict(*flags: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "carddeck", "predict", "--server", default_server.process.address, *flags,
             *map(str, files.values())],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        return out.stdout

    import json

    paths = {Path(r["image"].split("[")[0]).stem: r["shift_covered_by"] for r in json.loads(predict("--json"))}
    assert paths["clean"] == "" and paths["noise3"] == "known", paths
    assert {paths["spatter3"], paths["saturate5"]} <= {"in_scope", "confidence", "agreement"}, paths
    lines = predict().splitlines()
    for name, path in files.items():
        said = [line for line in lines if line.startswith(f"  warning: {path}[0]: ") and "cards' own word" in line]
        if name in ("spatter3", "saturate5"):
            assert len(said) == 1 and f"({paths[name]})" in said[0] and "expected accuracy" in said[0], lines
        else:
            assert not said, lines


def test_oip_grpc_and_http_return_the_verdict_and_the_scores_tensor(default_server):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    x = foreign_photo()
    answers = []
    for mod, url in ((tg, default_server.process.address), (th, f"127.0.0.1:{default_server.port}")):
        client = mod.InferenceServerClient(url)
        tensor = mod.InferInput("images", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        outputs = [mod.InferRequestedOutput("labels"), mod.InferRequestedOutput("out_of_scope")]
        result = client.infer("carddeck", [tensor], outputs=outputs, parameters={"abstain_above_risk": 0.5})
        if mod is tg:
            params = {k: v.string_param for k, v in result.get_response().parameters.items()}
        else:
            params = result.get_response()["parameters"]
        scores = result.as_numpy("out_of_scope")
        assert scores.shape == (1,) and scores[0] > 1.0
        assert params["out_of_scope_images"] == "0" and params["abstained_images"] == "0"
        assert params["shift_state"] in ("uncovered", "unknown") and params["shift_scope"] in ("window", "none")
        answers.append((params["out_of_scope_images"], float(scores[0])))
        plain = client.infer("carddeck", [tensor])  # not asked for: the default answer is unchanged
        assert plain.as_numpy("out_of_scope") is None and plain.as_numpy("probabilities") is not None
    assert answers[0] == pytest.approx(answers[1])


def test_every_transport_says_why_a_batch_is_covered(default_server):
    """Our API, OIP gRPC and OIP HTTP carry the same ``covered_by``: a covered 16-image batch (noisy digits,
    near a condition the deck was calibrated on) says which path covered it, as the detector itself does on
    those images; an uncovered one (black images) says nothing. Kills the field dropped by a transport, or a
    path other than the detector's."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    from carddeck.data.corruptions import corrupt
    from carddeck.gating.shift import COVERED_BY
    from carddeck.observability.shift import ShiftLoader, ShiftMonitor
    from carddeck.serving.verdicts import RoutedRequest

    deck = Deck.open(ROOT / "models")
    monitor = ShiftMonitor()
    ShiftLoader(monitor, refit=False)(deck)
    for images, covered in ((corrupt(_digits(16), "gaussian_noise", 3, seed=0), True),
                            (np.zeros((16, 32, 32, 3), np.uint8), False)):  # fmt: skip
        p = deck.predict(images)
        (want,) = monitor.judge([RoutedRequest("carddeck", deck.prepare(images), p.routing, p.probabilities,
                                               p.agreement)])  # fmt: skip
        assert (want.state == "covered") is covered and (want.covered_by in COVERED_BY) is covered
        with CardDeckClient(default_server.process.address) as client:
            got = [client.predict(images).verdict.covered_by]
        for mod, url in ((tg, default_server.process.address), (th, f"127.0.0.1:{default_server.port}")):
            tensor = mod.InferInput("images", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images)
            response = mod.InferenceServerClient(url).infer("carddeck", [tensor]).get_response()
            params = response.parameters if mod is tg else response["parameters"]
            got.append(params["shift_covered_by"].string_param if mod is tg else params["shift_covered_by"])
        assert got == [want.covered_by] * 3, (got, want)


def _blocked_torch(tmp: Path) -> dict[str, str]:
    """PYTHONPATH with a `torch` that cannot be imported: the server runs as without the train extra."""
    blocker = tmp / "no-torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed here (test)')\n")
    return {"PYTHONPATH": f"{blocker.parent}{os.pathsep}{ROOT}"}


def _digits(n: int) -> np.ndarray:
    return load_dataset("digits32", "test").images[:n]


def _state_after(client: CardDeckClient, deadline_s: float) -> list[str]:
    states = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        states.append(client.predict(_digits(16)).verdict.shift_state)
        if states[-1] != "unknown":
            break
        time.sleep(0.5)
    return states


def test_add_card_on_a_live_server_refits_the_detector_without_the_train_extra(tmp_path):
    """...and stores the refit in the deck: a second server started on it (a replica sharing the deck, or this
    one restarted) serves a fitted detector at once, with no refit of its own."""
    root = tmp_path / "deck"
    store = DeckStore.create(root)
    store.add_card(card("g1", "gaussian", seed=1))
    store.set_calibration(load_dataset("digits32", "val").images[:64])
    store.set_gate(shift=refit_from_deck(Deck.open(root)))
    env = {**_blocked_torch(tmp_path), "CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN}
    srv = start_server(root, tmp_path, "--poll-interval-s", "0.2", env=env)
    try:
        with CardDeckClient(srv.address, token=ADMIN_TOKEN) as client:
            assert client.predict(_digits(16)).verdict.shift_state != "unknown"  # the stored detector
            added = client.add_card(card("a1", "augmix", seed=2)).deck_version
            states = _state_after(client, 180)
        log = srv.log()
        assert states[-1] in ("in_distribution", "covered", "uncovered"), log[-3000:]
        assert "state unknown until it is refitted" in log and "shift detector refitted" in log, log[-3000:]
        assert "ImportError" not in log
        deadline = time.monotonic() + 60
        while "refitted shift detector stored" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        manifest = DeckStore(root).manifest()
        assert manifest.version == added + 1, srv.log()[-3000:]  # the refit, stored as the next version
        second = start_server(root, tmp_path, env=env)
        try:
            with CardDeckClient(second.address) as client:
                verdict = client.predict(_digits(16)).verdict
            assert verdict.shift_state != "unknown" and verdict.scope == "batch", second.log()[-3000:]
            assert "refitting" not in second.log() and "state unknown" not in second.log(), second.log()[-3000:]
        finally:
            second.terminate()
    finally:
        srv.terminate()


def test_an_s3_deck_serves_the_shift_signal_read_through_the_store(bucket, s3_env, tmp_path):  # noqa: F811
    location = f"s3://{bucket}/decks/trust"
    store = DeckStore.create(location)
    store.add_card(card("g1", "gaussian", seed=1))
    store.add_card(card("a1", "augmix", seed=2))
    store.set_calibration(load_dataset("digits32", "val").images[:64])
    store.set_gate(shift=refit_from_deck(Deck.open(location)))
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "CARDDECK_CACHE_DIR"))}
    srv = start_server(location, tmp_path, env=env)  # type: ignore[arg-type]
    try:
        with CardDeckClient(srv.address) as client:
            verdict = client.predict(_digits(16)).verdict
        log = srv.log()
        assert verdict.shift_state != "unknown" and verdict.scope == "batch", log[-3000:]
        assert len(verdict.out_of_scope) == 16 and np.isfinite(verdict.out_of_scope).all()
        assert "refitting" not in log and "unusable" not in log, log[-3000:]  # loaded, not rebuilt
    finally:
        srv.terminate()
