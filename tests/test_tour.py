"""The README's tour, command by command, against the default deck in models/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carddeck.deck import DeckStore
from carddeck.server.settings import default_deck_path
from tests.cards import tiny_card_bytes, tiny_meta
from tests.server.conftest import start_server

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
TOKEN = "tour-secret"


def carddeck(*args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDDECK_")}
    env["PYTHONPATH"] = str(ROOT)
    if token:
        env["CARDDECK_ADMIN_TOKEN"] = token
    cmd = [sys.executable, "-m", "carddeck.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_plain_carddeck_serve_serves_the_default_deck(tmp_path):
    assert default_deck_path().resolve() in (MODELS.resolve(), (ROOT / "carddeck" / "_default_deck").resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDDECK_")}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "carddeck.cli", "serve", "--port", "0", "--metrics-port", "-1"],
            cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline and proc.poll() is None:
            text = log.read_text(errors="replace")
            if re.search(r"serving deck .* on ", text):
                break
            time.sleep(0.1)
        assert re.search(r"serving deck .* on ", text), text[-2000:]
        assert str(MODELS) in text or "_default_deck" in text
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tour")
    deck = tmp / "deck"
    shutil.copytree(MODELS, deck, ignore=shutil.ignore_patterns("samples", "report", "*.py", "*.md"))
    srv = start_server(deck, tmp, env={"CARDDECK_ADMIN_TOKEN": TOKEN})
    yield srv
    srv.terminate()


def predictions(server, *args: str) -> list[tuple[Path, str, list[str], str]]:
    """(file, predicted class, cards run, the whole line) for each sample, from `carddeck predict`."""
    samples = sorted((MODELS / "samples").glob("*.png"))
    assert len(samples) >= 8
    out = carddeck("predict", "--server", server.address, *args, *map(str, samples))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(samples), out.stdout
    rows = []
    for path, line in zip(samples, lines):
        assert line.startswith(str(path)) and "distance to" in line, line
        predicted, cards = re.match(r".*: (\S+) \([\d.]+\) cards=(\S+) \[", line).groups()
        rows.append((path, predicted, cards.split(","), line))
    return rows


def label_of(path: Path) -> str:
    return re.search(r"label(\d+)", path.name).group(1)


def test_predict_the_samples_with_the_decks_gate(server):
    rows = predictions(server)
    policy = dict(DeckStore(server.deck).manifest().gate)["policy"]
    assert policy == "guarded"
    for path, predicted, _, line in rows:
        if path.name.startswith(("clean", "gaussian_noise", "shot_noise", "motion_blur")):
            assert predicted == label_of(path), line
        assert f"[{policy};" in line  # the deck's default policy, set by models/build.py


def test_nearest_domain_sends_noise_to_the_gaussian_cards(server):
    domains = {m.name: m.domain for m in DeckStore(server.deck).list_cards()}
    for path, _, cards, line in predictions(server, "--policy", "nearest-domain"):
        noisy = path.name.startswith(("gaussian_noise", "shot_noise"))
        routed = {domains[c] for c in cards}
        assert routed == {"gaussian"} if noisy else routed and routed <= {"augmix", "lowfreq"}, line


def test_add_a_card_to_the_running_deck_and_list_it(server, tmp_path):
    card = tmp_path / "my-card.onnx"
    card.write_bytes(tiny_card_bytes(tiny_meta("my-card", domain="clean")))
    added = carddeck("deck", "add", "--server", server.address, str(card), token=TOKEN)
    assert added.returncode == 0, added.stderr
    listing = carddeck("deck", "list", "--server", server.address)
    assert listing.returncode == 0 and "my-card/1" in listing.stdout
    for meta in DeckStore(MODELS).list_cards():
        assert f"{meta.name}/{meta.version}" in listing.stdout


def test_the_dashboard_file_is_where_the_tour_says():
    assert (ROOT / "serve" / "grafana" / "dashboards" / "carddeck.json").is_file()
