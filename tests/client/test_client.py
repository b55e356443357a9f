"""The Python client and the client commands (`carddeck predict`, `carddeck deck`) against real servers."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from carddeck.client.api import CardDeckClient, to_json, with_default_port
from carddeck.deck import DeckStore
from carddeck.errors import InvalidInput
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2_grpc
from tests.servers import ADMIN_TOKEN, ROOT, card, make_deck, smooth_images, start_server


def carddeck(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CARDDECK_")}
    full.update({"PYTHONPATH": str(ROOT), **(env or {})})
    cmd = [sys.executable, "-m", "carddeck", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=full)


# -- mutual TLS ----------------------------------------------------------------------------------------
def _pki(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by the CA."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(cn, key, issuer, signer, *, ca=False, san=None, usage=None):
        b = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(signer, hashes.SHA256())

    def write(stem: str, cert, key) -> None:
        (tmp / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pkcs8 = serialization.PrivateFormat.PKCS8
        (tmp / f"{stem}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("carddeck test CA", ca_key, name("carddeck test CA"), ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("ca", ca, ca_key)
    write("server", issue("localhost", server_key, ca.subject, ca_key, san=san, usage=ExtendedKeyUsageOID.SERVER_AUTH),
          server_key)  # fmt: skip
    write("client", issue("a client", client_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
          client_key)  # fmt: skip
    files = {"ca": "ca.pem", "server": "server.pem", "server_key": "server.key", "client": "client.pem"}
    return {k: tmp / v for k, v in {**files, "client_key": "client.key"}.items()}


def test_mutual_tls_end_to_end(tmp_path):
    pki = _pki(tmp_path)
    srv = start_server(
        make_deck(tmp_path / "deck"), tmp_path, "--tls-cert", str(pki["server"]), "--tls-key", str(pki["server_key"]),
        "--tls-client-ca", str(pki["ca"]), env={"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    try:
        # Python: the client certificate opens the door ...
        with CardDeckClient(
            srv.address, tls_ca=pki["ca"], client_cert=pki["client"], client_key=pki["client_key"]
        ) as client:
            assert client.predict(smooth_images(1)).routing["selected"] == ["a1"]
        # ... and without one the TLS handshake fails
        with CardDeckClient(srv.address, tls_ca=pki["ca"], timeout=5) as client, pytest.raises(grpc.RpcError) as info:
            client.list_cards()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # the CLI, by flags ...
        tls = ["--tls-ca", str(pki["ca"]), "--client-cert", str(pki["client"]), "--client-key", str(pki["client_key"])]
        listing = carddeck("deck", "list", "--server", srv.address, *tls)
        assert listing.returncode == 0 and "a1/1" in listing.stdout, listing.stderr
        # ... and by environment variables (an admin call: the bearer token still applies on top of mTLS)
        upload = tmp_path / "new.onnx"
        upload.write_bytes(card("c1", "clean", seed=5))
        env = {
            "CARDDECK_TLS_CA": str(pki["ca"]),
            "CARDDECK_CLIENT_CERT": str(pki["client"]),
            "CARDDECK_CLIENT_KEY": str(pki["client_key"]),
            "CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN,
        }
        added = carddeck("deck", "add", "--server", srv.address, str(upload), env=env)
        assert added.returncode == 0 and "added c1/1" in added.stdout, added.stderr
        refused = carddeck("deck", "list", "--server", srv.address, "--tls-ca", str(pki["ca"]), "--timeout", "5")
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        assert srv.terminate() == 0


def test_client_certificate_needs_its_key(tmp_path):
    with pytest.raises(InvalidInput, match="client_cert and client_key"):
        CardDeckClient("127.0.0.1:1", client_cert=tmp_path / "c.pem")
    with pytest.raises(InvalidInput, match="cannot read"):
        CardDeckClient("127.0.0.1:1", client_cert=tmp_path / "c.pem", client_key=tmp_path / "c.key")


# -- addresses and tokens ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("localhost", "localhost:8001"),
        ("10.0.0.7", "10.0.0.7:8001"),
        ("[::1]", "[::1]:8001"),
        ("[::1]:9000", "[::1]:9000"),
        ("localhost:9000", "localhost:9000"),
        ("dns:///example.org:443", "dns:///example.org:443"),
        ("unix:/run/carddeck.sock", "unix:/run/carddeck.sock"),
    ],
)
def test_a_server_without_a_port_means_port_8001(given, used):
    assert with_default_port(given) == used


def test_no_server_there_is_one_line_with_a_hint(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = carddeck("deck", "list", "--server", f"127.0.0.1:{port}", "--timeout", "5")
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("carddeck: error: UNAVAILABLE") and "`carddeck serve`" in line


def test_a_stream_that_fails_raises_the_typed_error_like_every_call():
    """Mutant: predict_stream letting the raw grpc.RpcError through (callers catching carddeck.errors miss it)."""
    import socket

    from carddeck.errors import NotReady

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with CardDeckClient(f"127.0.0.1:{port}", timeout=5) as client, pytest.raises(NotReady) as info:
        list(client.predict_stream([smooth_images(1)]))
    assert isinstance(info.value, grpc.RpcError) and info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_inference_token_has_one_name_for_client_and_server(tmp_path):
    srv = start_server(make_deck(tmp_path / "deck"), tmp_path, env={"CARDDECK_INFERENCE_TOKEN": "inf"})
    try:
        images = tmp_path / "x.npy"
        np.save(images, smooth_images(1))
        for env in ({"CARDDECK_INFERENCE_TOKEN": "inf"}, {"CARDDECK_TOKEN": "inf"}):  # the new name, the old alias
            out = carddeck("predict", "--server", srv.address, str(images), env=env)
            assert out.returncode == 0, (env, out.stderr)
        out = carddeck("predict", "--server", srv.address, str(images))
        assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr
    finally:
        srv.terminate()


# -- predict: every file is tried, JSON is numbers ---------------------------------------------------------
def test_predict_reports_bad_files_and_still_runs_the_rest(server, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(smooth_images(1)[0]).save(good)
    not_png = tmp_path / "broken.png"
    not_png.write_bytes(b"not a png at all")
    bomb = tmp_path / "bomb.png"
    Image.new("L", (1, 1)).save(bomb)
    # a PNG whose header claims far more pixels than Pillow's decompression-bomb limit (2 x 89.5 Mpx)
    data = bytearray(bomb.read_bytes())
    data[16:24] = (20000).to_bytes(4, "big") + (20000).to_bytes(4, "big")  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # the IHDR chunk's CRC
    bomb.write_bytes(bytes(data))
    folder = tmp_path / "a-folder"
    folder.mkdir()
    also_good = tmp_path / "also.npy"
    np.save(also_good, smooth_images(2))
    files = [good, not_png, bomb, folder, tmp_path / "missing.png", tmp_path / "notes.txt", also_good]
    out = carddeck("predict", "--server", server.address, *map(str, files))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stdout.strip().splitlines() if not line.startswith("  warning: ")]  # verdicts
    assert [line.split(":")[0] for line in lines] == [str(good), f"{also_good}[0]", f"{also_good}[1]"], out.stdout
    errors = out.stderr.strip().splitlines()
    for path, why in [
        (not_png, "not a readable image"),
        (bomb, "too large"),
        (folder, "is a directory"),
        (tmp_path / "missing.png", "not a readable image"),
        (tmp_path / "notes.txt", "unsupported file type"),
    ]:
        assert any(str(path) in e and why in e for e in errors), (path, why, errors)
    assert errors[-1] == f"carddeck: 5 of {len(files)} files failed"


def test_predict_json_has_numbers_not_strings(server, tmp_path):
    images = tmp_path / "x.npy"
    np.save(images, smooth_images(2))
    out = carddeck("predict", "--server", server.address, "--json", str(images))
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 2
    for row in rows:
        assert row["domain_distances"] and all(type(v) is float for v in row["domain_distances"].values()), row
        assert all(type(p) is float for p in row["probabilities"])
        assert type(row["probability"]) is float and type(row["deck_version"]) is int


# -- deck add --version --------------------------------------------------------------------------------
def test_deck_add_with_a_version(server, tmp_path):
    """The module's server is shared: the card this test adds is removed again, whatever the outcome."""
    try:
        path = tmp_path / "v.onnx"
        path.write_bytes(card("vcard", "augmix", seed=7))
        admin = {"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN}
        first = carddeck("deck", "add", "--server", server.address, str(path), env=admin)
        assert first.returncode == 0 and "added vcard/1" in first.stdout, first.stderr
        again = carddeck("deck", "add", "--server", server.address, str(path), env=admin)
        assert again.returncode == 0 and "already present (same bytes) vcard/1" in again.stdout, again.stderr
        other = tmp_path / "other.onnx"
        other.write_bytes(card("vcard", "augmix", seed=8))
        clash = carddeck("deck", "add", "--server", server.address, str(other), env=admin)
        assert clash.returncode == 1 and "FAILED_PRECONDITION" in clash.stderr  # same version, other bytes: refused
        bumped = carddeck("deck", "add", "--server", server.address, "--version", "next", str(other), env=admin)
        assert bumped.returncode == 0 and "added vcard/2" in bumped.stdout, bumped.stderr
        chosen = carddeck("deck", "add", "--server", server.address, "--version", "7", str(path), env=admin)
        assert chosen.returncode == 0 and "added vcard/7" in chosen.stdout, chosen.stderr
        versions = sorted(m.version for m in DeckStore(server.deck).list_cards(all_versions=True) if m.name == "vcard")
        assert versions == [1, 2, 7]
        bad = carddeck("deck", "add", "--server", server.address, "--version", "latest", str(path), env=admin)
        assert bad.returncode == 2 and "expected a card version" in bad.stderr
    finally:
        with CardDeckClient(server.address, token=ADMIN_TOKEN) as client:
            if "vcard" in [c.name for c in client.list_cards().cards]:
                client.remove_card("vcard")  # every version


# -- what a new user met (session 10's audit) --------------------------------------------------------------
def test_predict_reads_16_bit_and_palette_pngs_as_their_8_bit_rgb_twins(server, tmp_path):
    """Mutants: Pillow's plain convert("RGB") on a 16-bit greyscale PNG, which clips every value above 255
    (the image turns white and the deck answers for another image); on a palette PNG with transparency,
    where Pillow prints a UserWarning to the user's terminal."""
    grey = smooth_images(1)[0].mean(axis=2).round().astype(np.uint8)
    eight, sixteen = tmp_path / "grey8.png", tmp_path / "grey16.png"
    Image.fromarray(grey).save(eight)
    Image.fromarray(grey.astype(np.uint16) * 257).save(sixteen)  # 0..255 -> 0..65535
    assert Image.open(sixteen).mode.startswith("I")  # what Pillow makes of it
    palette = Image.fromarray(smooth_images(1, seed=3)[0]).convert("P")
    paletted, rgb = tmp_path / "palette.png", tmp_path / "rgb.png"
    palette.save(paletted, transparency=bytes([0, 64, 128] + [255] * 253))  # alpha per entry: Pillow warns
    palette.convert("RGB").save(rgb)
    out = carddeck("predict", "--server", server.address, "--json", *map(str, (eight, sixteen, paletted, rgb)))
    assert out.returncode == 0 and "Warning" not in out.stderr, out.stderr
    rows = json.loads(out.stdout)
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        assert a["label"] == b["label"]
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-6)


def test_predict_names_the_file_the_server_refused_and_checks_its_own_flags(server, tmp_path):
    """Mutants: the server's INVALID_ARGUMENT printed without the file it was about; an empty .npy passing
    silently (no line, exit 0); --batch-size 0 or a risk bound of 2 sent to the server once per file; a
    --timeout of 0 or inf, which gRPC turns into DEADLINE_EXCEEDED for every call."""
    bright = tmp_path / "bright.npy"
    np.save(bright, np.full((1, 3, 32, 32), 2.0, np.float32))  # float32 outside [0, 1]: the server refuses it
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 32, 32, 3), np.uint8))
    good = tmp_path / "good.npy"
    np.save(good, smooth_images(1))
    out = carddeck("predict", "--server", server.address, str(bright), str(empty), str(good))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    errors = out.stderr.strip().splitlines()
    assert any("INVALID_ARGUMENT" in e and "out of range" in e and str(bright) in e for e in errors), errors
    assert any(str(empty) in e and "no images" in e for e in errors), errors
    assert errors[-1] == "carddeck: 2 of 3 files failed"
    assert out.stdout.startswith(f"{good}: "), out.stdout
    for flag, value in (("--batch-size", "0"), ("--batch-size", "-3"), ("--abstain-above-risk", "2"),
                        ("--abstain-above-risk", "nan"), ("--timeout", "0"), ("--timeout", "inf")):  # fmt: skip
        bad = carddeck("predict", "--server", server.address, flag, value, str(good), str(good))
        assert bad.returncode == 2 and flag in bad.stderr and "files failed" not in bad.stderr, bad.stderr


def test_json_output_is_strict_json():
    """Mutant: NaN (an unknown score) printed as the bare word NaN, which JSON has no place for."""

    def refuse(word: str) -> None:
        raise AssertionError(f"{word} in JSON output")

    text = to_json([{"out_of_scope": float("nan"), "scores": np.array([np.inf, 0.5], np.float32), "n": np.int64(3)}])
    assert json.loads(text, parse_constant=refuse) == [{"out_of_scope": None, "scores": [None, 0.5], "n": 3}]


def test_deck_remove_takes_every_version_unless_told_one(server, tmp_path):
    """Mutants: `deck remove NAME` without --version removing only the served version (what its help
    said); a negative version answered NOT_FOUND rather than refused."""
    admin = {"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN}
    path = tmp_path / "r.onnx"
    path.write_bytes(card("rcard", "augmix", seed=9))
    try:
        for version in ("1", "2", "3"):
            added = carddeck("deck", "add", "--server", server.address, "--version", version, str(path), env=admin)
            assert added.returncode == 0, added.stderr

        def versions() -> list[int]:
            return sorted(m.version for m in DeckStore(server.deck).list_cards(all_versions=True) if m.name == "rcard")

        one = carddeck("deck", "remove", "--server", server.address, "--version", "2", "rcard", env=admin)
        assert one.returncode == 0 and "removed rcard/2;" in one.stdout, one.stderr
        assert versions() == [1, 3]
        negative = carddeck("deck", "remove", "--server", server.address, "--version", "-1", "rcard", env=admin)
        assert negative.returncode == 2 and "--version" in negative.stderr, negative.stderr
        every = carddeck("deck", "remove", "--server", server.address, "rcard", env=admin)
        assert every.returncode == 0 and "removed rcard (every version);" in every.stdout, every.stderr
        assert versions() == []
        assert "every version" in carddeck("deck", "remove", "--help").stdout
        with grpc.insecure_channel(server.address) as channel:
            stub = carddeck_pb2_grpc.CardDeckStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                admin_md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
                stub.RemoveCard(pb.RemoveCardRequest(name="a1", version=-1), metadata=admin_md, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "version" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                stub.GetCard(pb.GetCardRequest(name="a1", version=-1), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "version" in info.value.details()
    finally:
        with CardDeckClient(server.address, token=ADMIN_TOKEN) as client:
            if "rcard" in [c.name for c in client.list_cards().cards]:
                client.remove_card("rcard")


def test_the_http_port_or_an_http_url_as_server_says_which_address_to_give(server, tmp_path):
    """Mutants: an HTTP URL handed to gRPC ("Misformatted domain name"); the HTTP port answered with the
    generic "is `carddeck serve` running there?" although it is, on another port."""
    http_port = re.search(r"HTTP \(Open Inference Protocol, /v2\) on \S+:(\d+)", server.log()).group(1)
    images = tmp_path / "a.npy"
    np.save(images, smooth_images(1))
    out = carddeck("predict", "--server", f"127.0.0.1:{http_port}", "--timeout", "20", str(images))
    assert out.returncode == 1 and "--server takes the gRPC port, 8001 by default" in out.stderr, out.stderr
    url = carddeck("deck", "list", "--server", f"http://127.0.0.1:{http_port}/v2")
    assert url.returncode == 2 and "is an HTTP URL" in url.stderr and "e.g. 127.0.0.1:8001" in url.stderr, url.stderr
    with pytest.raises(InvalidInput, match="HTTP URL"):
        CardDeckClient("https://example.org")


def test_deck_add_names_a_refused_card_and_still_adds_the_others(server, tmp_path):
    """Mutant: the first refused card ending the command, its error naming no file (with several cards,
    which one?), so that the good cards after it were never sent."""
    admin = {"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN}
    broken, good = tmp_path / "broken.onnx", tmp_path / "good.onnx"
    broken.write_bytes(b"not an onnx model")
    good.write_bytes(card("gcard", "augmix", seed=11))
    try:
        out = carddeck("deck", "add", "--server", server.address, str(broken), str(good), env=admin)
        assert out.returncode == 1, out.stderr
        assert "added gcard/1" in out.stdout, out.stdout
        first, last = out.stderr.strip().splitlines()
        assert "INVALID_ARGUMENT" in first and str(broken) in first, first
        assert last == "carddeck: 1 of 2 cards failed"
    finally:
        with CardDeckClient(server.address, token=ADMIN_TOKEN) as client:
            if "gcard" in [c.name for c in client.list_cards().cards]:
                client.remove_card("gcard")


def test_deck_add_of_a_training_checkpoint_or_a_missing_file_names_it_and_adds_the_rest(server, tmp_path):
    """A new user's card.pt (or its directory) is told to go through `carddeck export`; a missing file is named;
    the good card after them is still added. Mutants: a card.pt sent to the server (answered "not an ONNX
    model"), and a local error ending the command before the other cards (as before)."""
    admin = {"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN}
    run = tmp_path / "run"
    run.mkdir()
    (run / "card.pt").write_bytes(b"PK torch checkpoint")
    good = tmp_path / "good.onnx"
    good.write_bytes(card("pcard", "augmix", seed=12))
    files = [run / "card.pt", run, tmp_path / "missing.onnx", good]
    try:
        out = carddeck("deck", "add", "--server", server.address, *map(str, files), env=admin)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "added pcard/1" in out.stdout, out.stdout
        errors = out.stderr.strip().splitlines()
        for path in files[:2]:
            assert any(f"{path}: a training checkpoint" in e and "carddeck export" in e for e in errors), errors
        assert any(f"{files[2]}: cannot read the card file" in e for e in errors), errors
        assert errors[-1] == "carddeck: 3 of 4 cards failed"
    finally:
        with CardDeckClient(server.address, token=ADMIN_TOKEN) as client:
            if "pcard" in [c.name for c in client.list_cards().cards]:
                client.remove_card("pcard")


def test_a_tls_mismatch_is_one_line_with_its_hint_and_json_logs_stay_json(server, tmp_path):
    """Mutants: gRPC's C core left at its own verbosity (a failed TLS handshake writes an INFO line of its own
    to stderr: a second line under the client's error, a line that is not JSON in the server's
    `--log-format json`); the TLS client to a plain server told only "is `carddeck serve` running there?"."""
    images = tmp_path / "a.npy"
    np.save(images, smooth_images(1))
    out = carddeck("predict", "--server", server.address, "--tls", "--timeout", "20", str(images))
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()  # no "I1207 ... Handshake failed" from gRPC's core
    assert "UNAVAILABLE" in line and "TLS failed" in line and "drop --tls" in line, line
    pki = _pki(tmp_path)
    srv = start_server(make_deck(tmp_path / "deck"), tmp_path, "--tls-cert", str(pki["server"]), "--tls-key",
                       str(pki["server_key"]), "--log-format", "json")  # fmt: skip
    try:
        plain = carddeck("deck", "list", "--server", srv.address, "--timeout", "10")  # a plain client: refused
        assert plain.returncode == 1 and "--tls-ca or --tls" in plain.stderr, plain.stderr
        with CardDeckClient(srv.address, tls_ca=pki["ca"]) as client:  # and the server still serves
            assert client.list_cards().cards
    finally:
        assert srv.terminate() == 0
    for entry in srv.log().splitlines():
        json.loads(entry)  # one JSON object per line, as --log-format json promises
