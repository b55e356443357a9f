"""Hardening figures of a live ``carddeck serve`` (issue 11), measured on any checkout of the code.

    python benchmarks/bench_hardening.py fuzz     [--root DIR] [--bodies 10000]
    python benchmarks/bench_hardening.py corrupt  [--root DIR] [--count 300]
    python benchmarks/bench_hardening.py shutdown [--root DIR] [--drain 0.5]
    python benchmarks/bench_hardening.py debris   [--root DIR] [--runs 20]
    python benchmarks/bench_hardening.py slow     [--root DIR] [--hold 60]
    python benchmarks/bench_hardening.py flood    [--root DIR]
    python benchmarks/bench_hardening.py json     [--root DIR] [--json-mb 50]
    python benchmarks/bench_hardening.py memory   [--root DIR]

``--root`` is the source tree the server runs from (default: this one), so the same script measures
the code before a fix (an unmodified copy, e.g. ``git archive HEAD | tar -x -C /tmp/before``) and
after it. Every figure is printed for that tree:

* fuzz: server RSS growth per 10,000 undecodable bodies spread over every unary RPC of
  carddeck.v1.CardDeck and the Open Inference Protocol, and the status codes they got;
* corrupt: status codes of AddCard and RepositoryModelLoad for seeded 8-byte corruptions of a real card;
* shutdown: seconds from SIGTERM to exit with a 4096-image request on the default deck in flight;
* debris: leftover files after ``--runs`` kill -9 crashes during card adds/removes, and after one
  clean restart;
* slow: of 600 HTTP connections (silent, slow headers, slow body) held ``--hold`` s, how many the server closed;
* flood: 1,100 idle HTTP connections against a server whose file limit is 1,024: whether gRPC ServerLive on
  a new channel, HTTP ready and /metrics answer, and how much the log grew in 15 s;
* json: the worst stall of gRPC ServerLive and HTTP live while four 50 MB JSON bodies arrive at once;
* memory: server RSS after two 4,096-image Predict requests on the default deck and 10 s idle.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2  # noqa: E402
from carddeck.wire.proto_gen.inference import grpc_service_pb2  # noqa: E402

ADMIN = "bench-admin-token"


def unary_methods() -> list[str]:
    out = []
    for module, service in ((carddeck_pb2, "CardDeck"), (grpc_service_pb2, "GRPCInferenceService")):
        desc = module.DESCRIPTOR.services_by_name[service]
        out += [f"/{desc.full_name}/{m.name}" for m in desc.methods if not (m.client_streaming or m.server_streaming)]
    return out


def undecodable(rng: random.Random) -> bytes:
    """Random bytes that no protobuf message accepts: the first tag names field 0, which is invalid."""
    body = bytearray(rng.randbytes(rng.randint(1, 256)))
    body[0] = rng.randint(0, 7)  # field number 0, any wire type
    return bytes(body)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cli_module(root: Path) -> str:
    """The ``python -m`` name of the ``carddeck`` command in the tree ``root`` (older trees: carddeck.cli)."""
    return "carddeck" if (root / "carddeck" / "__main__.py").exists() else "carddeck.cli"


class Server:
    def __init__(
        self, root: Path, deck: Path, *args: str, tmpdir: Path | None = None, nofile: int | None = None
    ) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="bench-hardening-", suffix=".log")[1])
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARDDECK_")}
        env.update({"PYTHONPATH": str(root), "CARDDECK_ADMIN_TOKEN": ADMIN})
        if tmpdir is not None:
            env["TMPDIR"] = str(tmpdir)
        cmd = [sys.executable, "-m", cli_module(root), "serve", "--deck", str(deck), "--port", "0", *args]
        with open(self.log_path, "wb") as log:
            limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
            self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            match = re.search(r"serving deck .* on (\S+):(\d+)", self.log())
            if match:
                self.address = f"127.0.0.1:{match.group(2)}"
                metrics = re.search(r"metrics on http://\S+:(\d+)/metrics", self.log())
                self.metrics_port = int(metrics.group(1)) if metrics else None
                http = re.search(r"HTTP \(Open Inference Protocol, /v2\) on \S+:(\d+)", self.log())
                self.http_port = int(http.group(1)) if http else None
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def tiny_deck(path: Path) -> Path:
    from tests.servers import make_deck

    return make_deck(path)


def call_raw(channel: grpc.Channel, method: str, body: bytes) -> str:
    fn = channel.unary_unary(method)  # no serializers: bytes go out as they are
    try:
        fn(body, timeout=30, metadata=(("authorization", f"Bearer {ADMIN}"),))
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def fuzz(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(args.root, tiny_deck(Path(tmp) / "deck"), "--metrics-port", "-1")
        try:
            methods = unary_methods()
            rng = random.Random(0)
            codes: collections.Counter[str] = collections.Counter()
            with grpc.insecure_channel(server.address) as channel:
                for i in range(2000):  # warm-up: pools, caches, allocator arenas
                    call_raw(channel, methods[i % len(methods)], undecodable(rng))
                before = rss_mb(server.proc.pid)
                t0 = time.monotonic()
                for i in range(args.bodies):
                    codes[call_raw(channel, methods[i % len(methods)], undecodable(rng))] += 1
                elapsed = time.monotonic() - t0
                after = rss_mb(server.proc.pid)
            errors = server.log().count("Traceback")
        finally:
            server.stop()
    print(f"fuzz ({args.root}): {args.bodies} undecodable bodies over {len(methods)} unary RPCs in {elapsed:.1f} s")
    print(f"  RSS {before:.1f} -> {after:.1f} MB: {(after - before) * 10000 / args.bodies:+.1f} MB per 10,000 bodies")
    print(f"  status codes: {dict(codes)}; tracebacks in the server log: {errors}")


def corrupt(args: argparse.Namespace) -> None:
    from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2_grpc
    from carddeck.wire.proto_gen.inference import grpc_service_pb2_grpc

    card_path = HERE / "models" / "cards" / "resnet20-augmix-lrr" / "1" / "model.onnx"
    data = card_path.read_bytes()
    rng = np.random.default_rng(0)
    codes: dict[str, collections.Counter[str]] = {"AddCard": collections.Counter(), "Load": collections.Counter()}
    leaked = 0
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(args.root, tiny_deck(Path(tmp) / "deck"), "--metrics-port", "-1")
        auth = (("authorization", f"Bearer {ADMIN}"),)
        try:
            with grpc.insecure_channel(server.address) as channel:
                cd = carddeck_pb2_grpc.CardDeckStub(channel)
                oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(args.count):
                    bad = bytearray(data)
                    at = int(rng.integers(0, len(bad) - 8))
                    bad[at : at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
                    for rpc in codes:
                        try:
                            if rpc == "AddCard":
                                chunks = iter([carddeck_pb2.AddCardChunk(data=bytes(bad))])
                                cd.AddCard(chunks, timeout=60, metadata=auth)
                            else:
                                req = grpc_service_pb2.RepositoryModelLoadRequest(model_name=card_path.parts[-3])
                                req.parameters["file:model.onnx"].bytes_param = bytes(bad)
                                oip.RepositoryModelLoad(req, timeout=60, metadata=auth)
                            codes[rpc]["OK"] += 1
                        except grpc.RpcError as exc:
                            codes[rpc][exc.code().name] += 1
                            leaked += tempfile.gettempdir() in (exc.details() or "") or "carddeck-upload" in (
                                exc.details() or ""
                            )
        finally:
            server.stop()
    print(f"corrupt ({args.root}): {args.count} seeded 8-byte corruptions of {card_path.relative_to(HERE)}")
    for rpc, c in codes.items():
        print(f"  {rpc}: {dict(c)}")
    print(f"  messages naming the server's temporary path: {leaked}")


def shutdown(args: argparse.Namespace) -> None:
    from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2_grpc

    deck = args.root / "models"
    server = Server(args.root, deck, "--metrics-port", "-1", "--drain-timeout-s", str(args.drain))
    images = np.random.default_rng(0).integers(0, 256, (4096, 32, 32, 3), dtype=np.uint8)
    request = carddeck_pb2.PredictRequest(
        images=carddeck_pb2.Tensor(shape=list(images.shape), dtype=carddeck_pb2.DTYPE_UINT8, data=images.tobytes())
    )
    outcome: list[str] = []

    def send() -> None:
        with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            try:
                carddeck_pb2_grpc.CardDeckStub(ch).Predict(request, timeout=300)
                outcome.append("OK")
            except grpc.RpcError as exc:
                outcome.append(exc.code().name)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    time.sleep(args.wait)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(300)
    exited = time.monotonic() - t0
    thread.join(60)
    print(f"shutdown ({args.root}): SIGTERM {args.wait:.1f} s into a 4096-image Predict on the default deck,")
    print(f"  --drain-timeout-s {args.drain}: exited {exited:.1f} s after SIGTERM (code {server.proc.returncode});")
    print(f"  client got {outcome}")


def debris_of(deck: Path, tmpdir: Path) -> dict[str, int]:
    import json

    manifest = json.loads((deck / "manifest.json").read_text())
    referenced = {c["path"] for c in manifest["cards"]}
    router = (manifest.get("gate") or {}).get("router")
    cards = [p for p in (deck / "cards").glob("*/*") if p.is_dir()]
    orphans = [p for p in cards if str(p.relative_to(deck)) not in referenced]
    return {
        "tmp files": sum(1 for _ in deck.rglob("*.tmp")),
        "orphan card dirs": sum(1 for p in orphans if not (p / ".removed").exists()),
        "removed cards within the grace period": sum(1 for p in orphans if (p / ".removed").exists()),
        "upload dirs": sum(1 for p in tmpdir.iterdir() if p.name.startswith("carddeck-upload")),
        "superseded routers": sum(1 for p in (deck / "gate").glob("router-*.npz") if f"gate/{p.name}" != router)
        if (deck / "gate").is_dir()
        else 0,
    }


def debris(args: argparse.Namespace) -> None:
    from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2_grpc
    from tests.servers import card

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        deck = tiny_deck(Path(tmp) / "deck")
        tmpdir = Path(tmp) / "tmpdir"
        tmpdir.mkdir()
        blobs = [card(f"x{i}", "augmix", version=v, seed=i) for i in range(3) for v in range(1, 40)]
        extra = ("--metrics-port", "-1", *args.server_args)
        for _ in range(args.runs):
            server = Server(args.root, deck, *extra, tmpdir=tmpdir)
            stop = threading.Event()

            def churn(address: str = server.address, stop: threading.Event = stop) -> None:
                auth = (("authorization", f"Bearer {ADMIN}"),)
                with grpc.insecure_channel(address) as ch:
                    stub = carddeck_pb2_grpc.CardDeckStub(ch)
                    while not stop.is_set():
                        blob = rng.choice(blobs)
                        try:
                            if rng.random() < 0.7:
                                chunks = [blob[i : i + 4096] for i in range(0, len(blob), 4096)]
                                stub.AddCard(iter(carddeck_pb2.AddCardChunk(data=c) for c in chunks), timeout=10,
                                             metadata=auth)  # fmt: skip
                            else:
                                stub.RemoveCard(carddeck_pb2.RemoveCardRequest(name=f"x{rng.randrange(3)}"),
                                                timeout=10, metadata=auth)  # fmt: skip
                        except grpc.RpcError:
                            pass

            workers = [threading.Thread(target=churn, daemon=True) for _ in range(3)]
            for w in workers:
                w.start()
            time.sleep(rng.uniform(0.2, 1.5))
            server.proc.kill()
            server.proc.wait()
            stop.set()
            for w in workers:
                w.join(15)
        crashed = debris_of(deck, tmpdir)
        server = Server(args.root, deck, *extra, tmpdir=tmpdir)
        time.sleep(1.0)
        restarted = debris_of(deck, tmpdir)
        server.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)
    print(f"debris ({args.root}): after {args.runs} kill -9 crashes during adds/removes: {crashed}")
    print(f"  after one restart ({' '.join(args.server_args) or 'default settings'}): {restarted}")


# -- issue 22: what no client may do to a live server ------------------------------------------------
def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (EOF or reset, after any answer it wrote)."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def _answers(what: str, call) -> str:
    t0 = time.monotonic()
    try:
        call()
        return f"{what} OK in {time.monotonic() - t0:.2f} s"
    except Exception as exc:  # what failed and how is the figure
        return f"{what} FAILED after {time.monotonic() - t0:.1f} s ({type(exc).__name__}: {str(exc)[:80]})"


def _live_grpc(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=5)


def _http_get(port: int, path: str, timeout: float = 5) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def slow(args: argparse.Namespace) -> None:
    """600 connections (silent, slow headers, slow body) held for --hold seconds: how many the server closed."""
    server = Server(args.root, tiny_deck(Path(tempfile.mkdtemp()) / "deck"), "--http-port", "0", "--metrics-port",
                    "-1")  # fmt: skip
    raise_own_limit(4096)
    kinds: dict[str, list[socket.socket]] = {"silent": [], "slow headers": [], "slow body": []}
    try:
        for _ in range(200):
            kinds["silent"].append(_connect(server.http_port))
            s = _connect(server.http_port)
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-A: ")
            kinds["slow headers"].append(s)
            s = _connect(server.http_port)
            s.sendall(b"POST /v2/models/carddeck/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
            kinds["slow body"].append(s)
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.hold:  # a byte now and then, as a Slowloris client sends
            for s in kinds["slow headers"] + kinds["slow body"]:
                with contextlib.suppress(OSError):
                    s.send(b"a")
            time.sleep(5)
        closed = {kind: sum(_closed(s) for s in socks) for kind, socks in kinds.items()}
        print(f"slow ({args.root}): 600 HTTP connections held {args.hold:.0f} s; closed by the server: {closed}")
        print(f"  then: {_answers('HTTP live', lambda: _http_get(server.http_port, '/v2/health/live'))}")
    finally:
        for socks in kinds.values():
            for s in socks:
                s.close()
        server.stop()


def raise_own_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(n, hard)), hard))


def flood(args: argparse.Namespace) -> None:
    """1,100 idle HTTP connections at a 1,024 file limit: what still answers, and how much the log grows."""
    server = Server(args.root, tiny_deck(Path(tempfile.mkdtemp()) / "deck"), "--http-port", "0", "--metrics-port",
                    "0", nofile=1024)  # fmt: skip
    raise_own_limit(4096)
    socks = []
    try:
        log0 = len(server.log().encode())
        for _ in range(1100):
            try:
                socks.append(_connect(server.http_port))
            except OSError:
                break
        t0 = time.monotonic()
        results = [
            _answers("gRPC ServerLive (new channel)", lambda: _live_grpc(server.address)),
            _answers("HTTP ready (new connection)", lambda: _http_get(server.http_port, "/v2/health/ready")),
            _answers("/metrics", lambda: _http_get(server.metrics_port, "/metrics")),
        ]
        time.sleep(max(0.0, 15 - (time.monotonic() - t0)))
        text = server.log()
        grown = text.encode()[log0:]
        fds = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
        print(f"flood ({args.root}): {len(socks)} idle HTTP connections, server file limit 1024; server fds {fds}")
        for r in results:
            print(f"  {r}")
        newline = b"\n"
        print(f"  log in 15 s: {grown.count(newline)} lines, {len(grown) / 1e6:.2f} MB, "
              f"{grown.count(b'Too many open files')} 'Too many open files'")  # fmt: skip
    finally:
        for s in socks:
            s.close()
        server.stop()


def big_json(args: argparse.Namespace) -> None:
    """Four concurrent JSON infer bodies (--json-mb each): the worst stall of gRPC ServerLive and HTTP live."""
    server = Server(args.root, tiny_deck(Path(tempfile.mkdtemp()) / "deck"), "--http-port", "0", "--metrics-port",
                    "-1")  # fmt: skip
    numbers = json.dumps(np.random.default_rng(0).integers(0, 256, int(args.json_mb * 1e6 / 4.55)).tolist())
    body = ('{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1], "data": ' + numbers + "}]}").encode()
    stop = threading.Event()
    worst = {"gRPC ServerLive": 0.0, "HTTP live": 0.0}
    statuses: list[str] = []

    def probe(name: str, call) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            with contextlib.suppress(Exception):
                call()
            worst[name] = max(worst[name], time.monotonic() - t0)
            time.sleep(0.01)

    def send() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=300)
        try:
            conn.request("POST", "/v2/models/carddeck/infer", body=body)
            response = conn.getresponse()
            response.read()
            statuses.append(str(response.status))
        except OSError as exc:
            statuses.append(type(exc).__name__)
        finally:
            conn.close()

    try:
        with grpc.insecure_channel(server.address) as channel:
            live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
            live(b"", timeout=10)
            probes = [
                threading.Thread(target=probe, args=("gRPC ServerLive", lambda: live(b"", timeout=60))),
                threading.Thread(target=probe, args=("HTTP live", lambda: _http_get(server.http_port,
                                                                                   "/v2/health/live", 60))),
            ]  # fmt: skip
            for t in probes:
                t.start()
            time.sleep(1.0)
            senders = [threading.Thread(target=send) for _ in range(4)]
            t0 = time.monotonic()
            for t in senders:
                t.start()
            for t in senders:
                t.join()
            elapsed = time.monotonic() - t0
            time.sleep(1.0)
            stop.set()
            for t in probes:
                t.join()
        print(f"json ({args.root}): four concurrent {len(body) / 1e6:.0f} MB JSON bodies, answered {statuses} "
              f"in {elapsed:.1f} s; worst stall: " + ", ".join(f"{k} {v:.2f} s" for k, v in worst.items()))  # fmt: skip
        print(f"  server RSS afterwards {rss_mb(server.proc.pid):.0f} MB")
    finally:
        stop.set()
        server.stop()


def memory(args: argparse.Namespace) -> None:
    """RSS of a server on the default deck after two 4,096-image Predict requests and 10 s idle."""
    from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2_grpc

    server = Server(args.root, args.root / "models", "--http-port", "-1", "--metrics-port", "-1")
    images = np.random.default_rng(0).integers(0, 256, (4096, 32, 32, 3), dtype=np.uint8)
    request = carddeck_pb2.PredictRequest(
        images=carddeck_pb2.Tensor(shape=list(images.shape), dtype=carddeck_pb2.DTYPE_UINT8, data=images.tobytes())
    )
    try:
        rows = [("started", rss_mb(server.proc.pid), 0.0)]
        with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = carddeck_pb2_grpc.CardDeckStub(ch)
            for i in (1, 2):
                t0 = time.monotonic()
                stub.Predict(request, timeout=600)
                rows.append((f"after 4096-image request {i}", rss_mb(server.proc.pid), time.monotonic() - t0))
        time.sleep(10)
        rows.append(("after 10 s idle", rss_mb(server.proc.pid), 0.0))
        print(f"memory ({args.root}): default deck, gRPC Predict of 4,096 uint8 32x32 images")
        for what, mb, seconds in rows:
            print(f"  {what}: RSS {mb:.0f} MB" + (f" (request took {seconds:.1f} s)" if seconds else ""))
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("fuzz", "corrupt", "shutdown", "debris", "slow", "flood", "json", "memory"))
    parser.add_argument("--json-mb", type=float, default=50.0, help="size of each JSON body in MB (json)")
    parser.add_argument("--hold", type=float, default=60.0, help="seconds the slow connections are held (slow)")
    parser.add_argument("--root", type=Path, default=HERE, help="source tree the server runs from")
    parser.add_argument("--bodies", type=int, default=10000)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--drain", type=float, default=0.5)
    parser.add_argument("--wait", type=float, default=3.0, help="seconds between the request and SIGTERM")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--server-args", nargs="*", default=[], help="extra flags for the restarted server (debris)")
    args = parser.parse_args()
    args.root = args.root.resolve()
    commands = {"fuzz": fuzz, "corrupt": corrupt, "shutdown": shutdown, "debris": debris, "slow": slow,
                "flood": flood, "json": big_json, "memory": memory}  # fmt: skip
    commands[args.what](args)


if __name__ == "__main__":
    main()
