"""The README's tour, command by command, against the default deck in models/.

CI also runs the tour from a fresh virtualenv with the plain install (tests/tour/run_tour.py); these
tests run the same commands, parsed from the README, with this checkout's code on free ports.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from carddeck.client.api import CardDeckClient
from carddeck.deck import DeckStore, default_deck_path
from carddeck.wire.proto_gen.inference import grpc_service_pb2 as oip
from carddeck.wire.proto_gen.inference import grpc_service_pb2_grpc as oip_grpc
from tests.servers import ServerProcess, start_server
from tests.tour.run_tour import (
    BLOCKS,
    NOT_RUN,
    PRELUDE,
    README,
    code_blocks,
    first_line,
    make_placeholder_files,
    misplaced_warnings,
    printed_mismatch,
    prose_after,
    prose_mismatch,
    readme_block,
    serving_python_blocks,
    setup_command,
    tour_commands,
)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
TOKEN = "secret"  # the tour's token
EXTRA_CARD = MODELS / "extra" / "resnet20-clean-lrr.onnx"


def carddeck(*args: str, token: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDDECK_")}
    env["PYTHONPATH"] = str(ROOT)
    if token:
        env["CARDDECK_ADMIN_TOKEN"] = token
    cmd = [sys.executable, "-m", "carddeck", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def tour_args(prefix: str, address: str) -> list[list[str]]:
    """The arguments of each tour command that starts with ``prefix``, aimed at ``address``."""
    out = []
    for command in tour_commands(README.read_text()):
        words = command.replace("127.0.0.1:8001", address).split()
        words = [w for w in words if not w.startswith("CARDDECK_")]
        if " ".join(words).startswith(prefix):
            out.append(words[1:])
    assert out, f"the tour has no `{prefix}` command"
    return out


def test_the_tour_is_what_these_tests_run():
    install, serve = setup_command(README.read_text())
    assert (install, serve) == ("pip install -c constraints.txt .", "carddeck serve")
    commands = tour_commands(README.read_text())
    servers = [c.split()[0:3] for c in commands if " serve " in c]
    assert servers == [["CARDDECK_ADMIN_TOKEN=secret", "carddeck", "serve"]]
    assert any("deck init" in c for c in commands)
    added = [c for c in commands if " deck add " in c]
    assert added and all(str(EXTRA_CARD.relative_to(ROOT)) in c for c in added)


@pytest.fixture(scope="module")
def default_server(tmp_path_factory) -> ServerProcess:
    """The first set-up command's plain `carddeck serve` (no --deck), here with an admin token."""
    tmp = tmp_path_factory.mktemp("tour")
    srv = start_server(None, tmp, env={"CARDDECK_ADMIN_TOKEN": TOKEN})
    yield srv
    srv.terminate()


def predictions(server, *args: str) -> list[tuple[Path, str, list[str], str]]:
    """(file, predicted class, cards run, the whole line) for each sample, from `carddeck predict`."""
    samples = sorted((MODELS / "samples").glob("*.png"))
    assert len(samples) >= 8
    out = carddeck("predict", "--server", server.address, *args, *map(str, samples))
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.strip().splitlines() if not line.startswith("  warning: ")]
    assert len(lines) == len(samples), out.stdout  # one line per image, verdict warnings indented under it
    assert not misplaced_warnings(out.stdout), out.stdout
    rows = []
    for path, line in zip(samples, lines):
        assert line.startswith(str(path)) and "distance to" in line, line
        predicted, cards = re.match(r".*: (\S+) \([\d.]+\) cards=(\S+) \[", line).groups()
        rows.append((path, predicted, cards.split(","), line))
    return rows


def label_of(path: Path) -> str:
    return re.search(r"label(\d+)", path.name).group(1)


def test_the_default_deck_is_served_read_only(default_server):
    assert default_deck_path().resolve() in (MODELS.resolve(), (ROOT / "carddeck" / "_default_deck").resolve())
    line = re.search(r"serving deck .* on \S+", default_server.log()).group(0)
    assert str(default_deck_path()) in line and "read-only" in line and "carddeck deck init" in line
    manifest = (default_deck_path() / "manifest.json").read_bytes()
    with CardDeckClient(default_server.address, token=TOKEN) as client:
        for call in (lambda: client.add_card(EXTRA_CARD), lambda: client.remove_card("resnet20-augmix-lrr")):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "read-only" in info.value.details() and "carddeck deck init DIR" in info.value.details()
    with grpc.insecure_channel(default_server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        load = oip.RepositoryModelLoadRequest(model_name="resnet20-clean-lrr")
        load.parameters["file:model.onnx"].bytes_param = EXTRA_CARD.read_bytes()
        unload = oip.RepositoryModelUnloadRequest(model_name="resnet20-augmix-lrr")
        for call, request in ((stub.RepositoryModelLoad, load), (stub.RepositoryModelUnload, unload)):
            with pytest.raises(grpc.RpcError) as info:
                call(request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=30)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert (default_deck_path() / "manifest.json").read_bytes() == manifest
    assert not (default_deck_path() / ".lock").exists()


def readme_predict(server, policy: bool) -> tuple[list, str]:
    """The tour's predict command (with or without --policy), its rows, and the README's text after it."""
    commands = [c for c in tour_commands(README.read_text()) if c.startswith("carddeck predict")]
    (command,) = [c for c in commands if ("--policy" in c) == policy]
    args = command.replace("127.0.0.1:8001", server.address).split()[1:]
    assert args[-1] == "models/samples/*.png"
    rows = predictions(server, *args[3:-1])
    stdout = "\n".join(line for *_, line in rows)
    mismatch = prose_mismatch(prose_after(README.read_text(), command), stdout, [row[0] for row in rows])
    assert not mismatch, mismatch  # the samples the README says it gets wrong are those it got wrong
    return rows, prose_after(README.read_text(), command)


def test_predict_the_samples_with_the_decks_gate(default_server):
    rows, _ = readme_predict(default_server, policy=False)
    policy = dict(DeckStore(default_deck_path()).manifest().gate)["policy"]
    for *_, line in rows:
        assert f"[{policy};" in line  # the deck's default policy, set by models/build.py


def test_nearest_domain_routes_as_the_readme_says(default_server):
    rows, prose = readme_predict(default_server, policy=True)
    assert "noisy samples to the CARDs\ntrained under Gaussian noise" in prose and "fog samples to the AugMix" in prose
    assert "the clean samples to the photometric CARD" in prose
    domains = {m.name: m.domain for m in DeckStore(default_server.deck).list_cards()}
    for path, _, cards, line in rows:
        routed = {domains[c] for c in cards}
        if path.name.startswith(("gaussian_noise", "shot_noise")):
            assert routed == {"gaussian"}, line
        elif path.name.startswith("fog"):
            assert routed == {"augmix"}, line
        elif path.name.startswith("clean"):
            assert routed == {"photometric"}, line
        else:  # blurred and contrast
            assert routed == {"lowfreq"}, line


@pytest.mark.parametrize("index", range(len(serving_python_blocks(README.read_text()))))
def test_the_readmes_client_blocks_run_against_a_live_server(default_server, index):
    """Every Python block of the Serving section (our client, tritonclient over gRPC and HTTP) runs as written
    against the default deck, and prints what its comments say."""
    code = serving_python_blocks(README.read_text())[index]
    http_port = re.search(r"HTTP \(Open Inference Protocol, /v2\) on \S+:(\d+)", default_server.log()).group(1)
    local = code.replace("127.0.0.1:8001", default_server.address).replace("127.0.0.1:8000", f"127.0.0.1:{http_port}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", local], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    mismatch = printed_mismatch(code, out.stdout)
    assert not mismatch, mismatch


def test_init_a_deck_add_the_extra_card_and_list_it(tmp_path):
    (init,) = tour_args("carddeck deck init", "")
    made = carddeck(*init, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    mydeck = tmp_path / init[-1]
    assert not DeckStore(mydeck).read_only
    srv = start_server(mydeck, tmp_path, env={"CARDDECK_ADMIN_TOKEN": TOKEN})
    try:
        assert "writable" in re.search(r"serving deck .* on \S+", srv.log()).group(0)
        (add,) = tour_args("carddeck deck add", srv.address)
        added = carddeck(*add, token=TOKEN)
        assert added.returncode == 0, added.stderr
        assert re.search(r"^added resnet20-clean-lrr/1 \(domain clean\)", added.stdout, flags=re.M), added.stdout
        (listing,) = tour_args("carddeck deck list", srv.address)
        listed = carddeck(*listing)
        assert listed.returncode == 0 and "resnet20-clean-lrr/1  domain=clean" in listed.stdout
        for meta in DeckStore(default_deck_path()).list_cards():
            assert f"{meta.name}/{meta.version}" in listed.stdout
        again = carddeck(*add[:-1], "--version", "next", add[-1], token=TOKEN)  # re-adding needs a new version
        assert again.returncode == 0 and "added resnet20-clean-lrr/2" in again.stdout, again.stderr
        rows = predictions(srv)  # the deck still serves every sample with the extra card in it
        assert all(p == label_of(path) for path, p, _, _ in rows if path.name.startswith("clean"))
    finally:
        assert srv.terminate() == 0


def test_the_extra_card_is_not_in_the_default_deck():
    from carddeck.deck import read_card_meta

    meta = read_card_meta(EXTRA_CARD)
    assert meta.domain == "clean" and meta.name not in {m.name for m in DeckStore(default_deck_path()).list_cards()}
    assert meta.compression.method == "lrr" and meta.accuracy.clean >= 0.95
    assert EXTRA_CARD.stat().st_size < 400_000  # small: a sparse LRR card


def test_the_dashboard_file_is_where_the_tour_says():
    assert (ROOT / "serve" / "grafana" / "dashboards" / "carddeck.json").is_file()


def test_the_readme_names_the_default_decks_real_default_policy():
    policy = DeckStore(default_deck_path()).manifest().gate["policy"]
    text = " ".join(README.read_text().split())
    assert f"The default deck's default is `{policy}`" in text  # the gate-policy table's preamble
    assert f"(default: the deck's, `{policy}` for the default deck)" in text  # the serving section


def test_the_readmes_config_file_block_is_valid_settings(tmp_path):
    """The README's ```toml block is a config file `carddeck serve --config` accepts, as written."""
    from carddeck.serving.settings import load_settings

    (block,) = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    path = tmp_path / "carddeck.toml"
    path.write_text(block)
    settings = load_settings({"config": str(path)}, env={})
    assert settings.max_batch_size == 128 and settings.host == "0.0.0.0" and settings.deck == "/srv/decks/cifar10"


def test_every_readme_block_is_run_or_listed_with_why_not():
    """A new README block fails here until BLOCKS says what runs it (or why nothing does)."""
    firsts = [first_line(code) for _, code in code_blocks(README.read_text())]
    assert len(firsts) == len(set(firsts)), "two README blocks start alike: BLOCKS could not tell them apart"
    assert set(firsts) - set(BLOCKS) == set(), "README blocks BLOCKS does not list"
    assert set(BLOCKS) - set(firsts) == set(), "BLOCKS lists blocks the README no longer has"
    assert all(why.startswith(("runs: ", NOT_RUN)) and len(why) > 20 for why in BLOCKS.values())


# The README's Python blocks outside the Serving section (those run against a live server, above).
LIBRARY_BLOCKS = sorted(
    {first_line(code) for lang, code in code_blocks(README.read_text()) if lang == "python"}
    - {first_line(code) for code in serving_python_blocks(README.read_text())}
)


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory) -> Path:
    """The placeholder files, and the digits32-C suite from the first line of the README's `carddeck corrupt` block."""
    where = tmp_path_factory.mktemp("library")
    make_placeholder_files(where)
    command = readme_block(README.read_text(), "carddeck corrupt --data digits32 --split test --out digits32-c")
    words = command.splitlines()[0].split()
    made = carddeck(*words[1:], cwd=where)
    assert made.returncode == 0 and "19 corruptions x 5 severities x 360 images" in made.stdout, made.stderr
    return where


@pytest.mark.parametrize("first", LIBRARY_BLOCKS)
def test_the_readmes_library_blocks_run_and_print_what_they_say(library_dir, first):
    """The Python blocks of the library sections (corruptions, -C suites, decks), with the README's `images`
    defined as PRELUDE says, print what their comments say."""
    code = readme_block(README.read_text(), first)
    prelude = "".join(p for name, p in PRELUDE.items() if re.search(rf"\b{name}\b", code))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", prelude + code]
    out = subprocess.run(cmd, cwd=library_dir, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^\s*print\(.*\)\s+#", code, flags=re.M), "the block prints nothing to check"
    mismatch = printed_mismatch(code, out.stdout)
    assert not mismatch, mismatch


def test_blocks_says_the_library_blocks_run_here():
    assert len(LIBRARY_BLOCKS) == 3 and all(BLOCKS[first] == "runs: tests/test_tour.py" for first in LIBRARY_BLOCKS)
