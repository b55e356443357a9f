"""Real decks (tiny ONNX cards in a DeckStore) and real server processes on free loopback ports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from carddeck.deck import DeckStore, default_deck_path
from carddeck.gating import SIGNATURE_DIM
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2_grpc
from tests.cards import tiny_card_bytes, tiny_meta

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token"
# Synthetic domain references: noisy images lift the high-frequency rings, smooth ones do not.
NOISE_SIG = tuple(float(v) for v in np.r_[0.3, np.linspace(-2.0, -2.5, SIGNATURE_DIM - 1)])
SMOOTH_SIG = tuple(float(v) for v in np.r_[0.3, np.linspace(-1.5, -7.0, SIGNATURE_DIM - 1)])


def card(name: str, domain: str, *, version: int = 1, seed: int = 0, **kw) -> bytes:
    sig = kw.pop("signature", NOISE_SIG if domain == "gaussian" else SMOOTH_SIG)
    return tiny_card_bytes(tiny_meta(name, version=version, domain=domain, signature=sig, **kw), seed=seed)


def make_deck(root: Path) -> Path:
    store = DeckStore.create(root)
    store.add_card(card("g1", "gaussian", seed=1))
    store.add_card(card("a1", "augmix", seed=2))
    store.set_calibration(smooth_images(8, seed=99))  # signs cards uploaded without a signature
    return root


def smooth_images(n: int = 6, seed: int = 0) -> np.ndarray:
    """Smooth blobs (uint8 NHWC): the gate sends them to the augmix card."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(8, 24, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)
        out.append(np.repeat((blob * 255).astype(np.uint8)[..., None], 3, axis=-1))
    return np.stack(out)


def noisy_images(n: int = 6, seed: int = 0) -> np.ndarray:
    """Pixel noise (uint8 NHWC): the gate sends them to the gaussian card."""
    return (np.random.default_rng(seed).random((n, 32, 32, 3)) * 255).astype(np.uint8)


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    log_path: Path
    address: str = ""
    deck: Path = field(default_factory=Path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"server did not exit {timeout} s after SIGTERM:\n{self.log()[-3000:]}") from None
        return self.proc.returncode


def start_server(
    deck: Path | None, tmp: Path, *args: str, env: dict[str, str] | None = None, preexec_fn: Any = None
) -> ServerProcess:
    """``python -m carddeck.commands.cli serve`` on a free port (port 0: the server picks and logs it).

    ``deck=None``: no ``--deck``, the server serves the packaged default deck. ``preexec_fn``: run in the
    child before it starts (e.g. a lower file limit)."""
    log_path = tmp / f"server-{time.monotonic_ns()}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CARDDECK_")}
    full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    cmd = [sys.executable, "-m", "carddeck", "serve", "--port", "0", "--metrics-port", "-1",
           "--http-port", "0"]  # fmt: skip
    cmd += ["--deck", str(deck)] if deck is not None else []
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [*cmd, *args], cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=preexec_fn
        )
    server = ServerProcess(proc, log_path, deck=deck if deck is not None else default_deck_path())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = re.search(r"serving deck .* on (\S+):(\d+)", server.log())
        if match:
            server.address = f"127.0.0.1:{match.group(2)}"
            return server
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.log()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server did not start in 60 s:\n{server.log()[-3000:]}")


def settled(server: Any, timeout_s: float = 120.0) -> int:
    """The deck version a live server serves once nothing it does in the background still changes its deck:
    after a start or a card change on a deck with calibration images, `carddeck serve` refits the shift
    detector and stores it (a deck version of its own). Settled: the store names a detector for its cards (or
    cannot have one) and the server serves that version. ``server``: a ServerProcess or anything with one as
    ``.process``."""
    import io

    from carddeck.client.api import CardDeckClient
    from carddeck.gating.shift import ShiftDetector

    process = getattr(server, "process", server)
    store = DeckStore(process.deck)
    deadline = time.monotonic() + timeout_s
    while True:
        manifest = store.manifest()
        cards = sorted(e.key for e in manifest.active())
        rel = dict(manifest.gate).get("shift")
        fitted = not cards or not manifest.calibration or store.read_only
        if not fitted and rel:
            detector = ShiftDetector.load(io.BytesIO(store.read_file(rel)), name=rel)
            fitted = sorted(detector.notes.get("cards", ())) == cards
        if fitted:
            with CardDeckClient(process.address) as client:
                if client.list_cards().deck_version == manifest.version:
                    return manifest.version
        if time.monotonic() > deadline:
            raise AssertionError(f"deck {process.deck} not settled in {timeout_s:g} s:\n{process.log()[-3000:]}")
        time.sleep(0.1)


@pytest.fixture
def deck_path(tmp_path: Path) -> Path:
    return make_deck(tmp_path / "deck")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module: admin token set, batching on, poll fast."""
    tmp = tmp_path_factory.mktemp("server")
    srv = start_server(
        make_deck(tmp / "deck"), tmp, "--poll-interval-s", "0.2", "--max-request-images", "256",
        "--max-card-mb", "1", env={"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    yield srv
    srv.terminate()


class HeldUpload:
    """An AddCard stream that the server counts in flight until :meth:`release` (its last chunk is held back).

    A request that cannot finish before the test says so: drain tests need one in flight at a known
    moment, whatever the machine's speed. ``outcome`` is "OK" or the gRPC status name once it ended."""

    def __init__(self, address: str, data: bytes, token: str = ADMIN_TOKEN) -> None:
        self.outcome: str | None = None
        self._release = threading.Event()
        self._done = threading.Event()
        half = len(data) // 2

        def chunks() -> Iterator[pb.AddCardChunk]:
            yield pb.AddCardChunk(data=data[:half])
            self._release.wait(120)
            yield pb.AddCardChunk(data=data[half:])

        def call() -> None:
            with grpc.insecure_channel(address) as channel:
                try:
                    stub = carddeck_pb2_grpc.CardDeckStub(channel)
                    stub.AddCard(chunks(), timeout=180, metadata=(("authorization", f"Bearer {token}"),))
                    self.outcome = "OK"
                except grpc.RpcError as exc:
                    self.outcome = exc.code().name
                finally:
                    self._done.set()

        self._thread = threading.Thread(target=call, daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._release.set()

    def wait(self, timeout: float = 60.0) -> str | None:
        self._done.wait(timeout)
        return self.outcome


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0, every: float = 0.05) -> object:
    """Poll ``condition()`` until it returns something truthy (returned); AssertionError naming ``what`` after
    ``timeout`` seconds. Tests wait for events, never for a guessed duration."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
