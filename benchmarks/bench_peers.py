"""CARD-Deck against NVIDIA Triton and MLServer on the same ONNX card, same load, one run.

    python benchmarks/bench_peers.py [--card resnet20-augmix-lrr] [--seconds 3] [--rounds 2]
                                     [--loads 64x1,1x1,1x8,1x32] [--peers-python /work/wt/venvs/peers/bin/python]
                                     [--peers triton,mlserver] [--before-tree DIR]

Servers, each its own process tree, started one after another and kept up through the run:
  * ``carddeck serve`` on a one-card deck holding the card (the card is an OIP model of its own; the
    server's default flags: dynamic batching, max batch 64, 2 ms queue delay, one batch in flight);
  * NVIDIA Triton 2.x through ``nvidia-pytriton`` (which ships the tritonserver binary): its Python
    backend calls a Python function that runs the card with ONNX Runtime (intra-op threads = cores, no
    spinning: how one ORT session fills the cores; CARD-Deck runs one thread per session and cuts large
    runs into chunks run side by side, carddeck.deck.runtime); dynamic batcher, max batch 64, max queue delay
    2 ms, one model instance. Native Triton's ONNX Runtime backend is not installable here;
  * MLServer with a custom runtime calling ONNX Runtime the same way; adaptive batching, max batch 64,
    max batch time 2 ms.
Load: closed-loop ``tritonclient.grpc`` clients (uint8 images [N, H, W, 3], the deck's input contract) from
separate client processes (threads inside each), configurations alternated round by round; the
median round is reported, and each ratio is taken within each round (its two sides measured seconds
apart), then its median and range over the rounds (a shared machine's load drifts). Baseline: the
same card in this process (``Deck.run_card``: the same decode, ONNX Runtime and softmax), measured in
the same run. Each server's CPU seconds per 1,000 images counts its whole process tree (Triton's
server, its backend stub and pytriton's proxy). Mean executed batch: inferences / executions from the
OIP's ModelStatistics (Triton and CARD-Deck; MLServer has none). The client processes' own CPU seconds per
1,000 images are printed too: on 2 cores the load's encoding and gRPC compete with the server.
``--before-tree DIR`` (e.g. ``git archive`` of an older commit) adds a row for ``carddeck serve`` from that
tree, same card, same loads, alternated with the others: before/after ratios from one run.
``gRPC floor`` (peer ``floor``): grpcio's threaded server answering ModelInfer with zeros of the right
shape, no model: what any Python gRPC server pays per call (transport, grpcio, parsing) and what the
client pays, measured under the same load. At concurrency 1 it caps a server at in-process / (in-process
+ floor) of in-process throughput (p50s); the ratios say how much of that cap CARD-Deck reaches.
Streaming rows: batch 1 over one ``ModelStreamInfer`` stream from one client (``--stream-window``
requests in flight), against batch 1 / concurrency 1 unary.

The peers live in a virtualenv of their own, so the project's environment stays as it is:

    python -m venv /work/wt/venvs/peers
    /work/wt/venvs/peers/bin/pip install nvidia-pytriton==0.7.0 mlserver==1.7.1 "uvloop<0.22" onnxruntime numpy \
        "tritonclient[grpc]"

(MLServer 1.7.1's inference-pool worker calls ``asyncio.get_event_loop()`` outside a running loop, which
uvloop 0.22+ refuses: the worker dies and the model never loads; uvloop 0.21 keeps MLServer's default
architecture, one inference worker process.) pytriton's default security config restricts the statistics
protocol to a generated token; the Triton server here opens it (``restricted_endpoints=[]``) so the run
can read its executed batch sizes.

The Triton Python backend stub links against libpython: the run puts the peers Python's LIBDIR
first on LD_LIBRARY_PATH. A peer that cannot start is reported with its log's tail; the others run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = "/work/wt/venvs/peers/bin/python"
MAX_BATCH, DELAY_US = 64, 2000


# -- peer servers (run inside the peers virtualenv: no carddeck import here) --------------------------------
def _session(model_path: str):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = len(os.sched_getaffinity(0))
    opts.inter_op_num_threads = 1
    for pool in ("intra_op", "inter_op"):  # no spinning, as CARD-Deck (carddeck.deck.runtime.CardSession)
        opts.add_session_config_entry(f"session.{pool}.allow_spinning", "0")
    return ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])


def _probabilities(session, images: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """uint8 NHWC -> float NCHW in [0, 1] -> logits -> softmax, as CARD-Deck prepares and answers."""
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)
    (logits,) = session.run(["logits"], {"images": x})
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def serve_triton(model_path: str, name: str, port: int, hwc: tuple[int, int, int], classes: int) -> None:
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    session = _session(model_path)

    @batch
    def infer(images: np.ndarray) -> dict[str, np.ndarray]:
        probs = _probabilities(session, images)
        return {"probabilities": probs, "labels": probs.argmax(axis=1).astype(np.int64)[:, None]}

    config = TritonConfig(grpc_port=port, http_port=port + 1, metrics_port=port + 2, log_verbose=0)
    with Triton(
        config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])
    ) as triton:  # statistics open
        triton.bind(
            model_name=name,
            infer_func=infer,
            inputs=[Tensor(name="images", dtype=np.uint8, shape=hwc)],
            outputs=[
                Tensor(name="probabilities", dtype=np.float32, shape=(classes,)),
                Tensor(name="labels", dtype=np.int64, shape=(1,)),
            ],
            config=ModelConfig(max_batch_size=MAX_BATCH, batcher=DynamicBatcher(max_queue_delay_microseconds=DELAY_US)),
        )
        print("PEER READY", flush=True)
        triton.serve()


MLSERVER_RUNTIME = """
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

import bench_peers


class CardRuntime(MLModel):
    async def load(self) -> bool:
        self.session = bench_peers._session(self.settings.parameters.uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = NumpyCodec.decode_input(payload.inputs[0])
        probs = bench_peers._probabilities(self.session, images)
        return InferenceResponse(model_name=self.name, outputs=[
            NumpyCodec.encode_output("probabilities", probs),
            NumpyCodec.encode_output("labels", probs.argmax(axis=1).astype(np.int64)),
        ])
"""


def serve_mlserver(model_path: str, name: str, port: int, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runtime.py").write_text(MLSERVER_RUNTIME)
    (folder / "settings.json").write_text(
        json.dumps({"grpc_port": port, "http_port": port + 1, "metrics_port": port + 2, "debug": False})
    )
    model = folder / name
    model.mkdir(exist_ok=True)
    (model / "model-settings.json").write_text(
        json.dumps(
            {
                "name": name,
                "implementation": "runtime.CardRuntime",
                "parameters": {"uri": model_path},
                "max_batch_size": MAX_BATCH,
                "max_batch_time": DELAY_US / 1e6,
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": f"{folder}:{Path(__file__).parent}"}
    mlserver = Path(sys.executable).with_name("mlserver")
    os.execve(str(mlserver), [str(mlserver), "start", str(folder)], env)


def serve_floor(port: int, classes: int) -> None:
    """What any Python gRPC server answering ModelInfer pays before its model: grpcio's threaded server (32
    workers, as ``carddeck serve``), the request parsed, an answer of the right shape (zeros, built once per
    batch size). Runs in the project's environment (tritonclient's OIP messages)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from tritonclient.grpc import service_pb2 as oip

    answers: dict[int, bytes] = {}

    def infer(raw: bytes, context: object) -> bytes:
        request = oip.ModelInferRequest.FromString(raw)
        n = request.inputs[0].shape[0]
        if n not in answers:
            tensor = oip.ModelInferResponse.InferOutputTensor
            answers[n] = oip.ModelInferResponse(
                model_name=request.model_name,
                outputs=[tensor(name="probabilities", datatype="FP32", shape=[n, classes]),
                         tensor(name="labels", datatype="INT64", shape=[n])],
                raw_output_contents=[bytes(4 * n * classes), bytes(8 * n)],
            ).SerializeToString()  # fmt: skip
        return answers[n]

    def ready(raw: bytes, context: object) -> bytes:
        return oip.ModelReadyResponse(ready=True).SerializeToString()

    handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
    handlers["ModelReady"] = grpc.unary_unary_rpc_method_handler(ready)
    limit = 1 << 30
    server = grpc.server(
        ThreadPoolExecutor(32),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("PEER READY", flush=True)
    server.wait_for_termination()


# -- the harness (project environment) ------------------------------------------------------------------------
def free_port(span: int = 3) -> int:
    """A port p with p .. p + span - 1 free now (Triton and MLServer take three consecutive ones)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span < 65535 and all(_free(p) for p in range(port + 1, port + span)):
            return port
    raise RuntimeError("no free port range")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every descendant alive now (Linux /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        p = int(stat.parent.name)
        parents[p] = int(fields[1])
        times[p] = (int(fields[11]) + int(fields[12])) / tick
    total, frontier = 0.0, [pid]
    while frontier:
        p = frontier.pop()
        total += times.get(p, 0.0)
        frontier.extend(c for c, parent in parents.items() if parent == p)
    return total


class Peer:
    def __init__(
        self,
        label: str,
        cmd: list[str],
        port: int,
        model: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.label, self.model, self.address = label, model, f"127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False)  # noqa: SIM115 - lives with the peer
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        self.error = ""

    def wait_ready(self, timeout_s: float = 180) -> bool:
        import tritonclient.grpc as tc

        deadline = time.monotonic() + timeout_s
        client = tc.InferenceServerClient(self.address)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if client.is_model_ready(self.model):
                    return True
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        self.error = f"did not become ready; log tail:\n{self.tail()}"
        return False

    def tail(self, n: int = 1500) -> str:
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def counts(self) -> tuple[int, int] | None:
        """(inferences, executions) from ModelStatistics, or None where the server has no statistics."""
        import tritonclient.grpc as tc

        try:
            stats = tc.InferenceServerClient(self.address).get_inference_statistics(self.model).model_stats
        except Exception:
            return None
        return sum(s.inference_count for s in stats), sum(s.execution_count for s in stats)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the whole tree: tritonserver and its stubs too
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        Path(self.log.name).unlink(missing_ok=True)


def unary_load(
    address: str, model: str, shape: tuple[int, ...], threads: int, start_at: float, stop_at: float
) -> tuple[list[float], float]:
    """In a client process: ``threads`` closed-loop tritonclient.grpc clients; their latencies (s) and this
    process's CPU seconds over the window (the clients share the cores with the server)."""
    import tritonclient.grpc as tc

    images = (np.random.default_rng(0).random(shape) * 255).astype(np.uint8)
    latencies: list[float] = []

    errors: list[str] = []

    def worker() -> None:
        try:
            run_client()
        except Exception as exc:  # tritonclient's exceptions do not pickle back to the parent
            errors.append(f"{type(exc).__name__}: {exc}")

    def run_client() -> None:
        client = tc.InferenceServerClient(address)
        inp = tc.InferInput("images", list(images.shape), "UINT8")
        inp.set_data_from_numpy(images)
        client.infer(model, [inp])  # connect and warm up before the window opens
        time.sleep(max(0.0, start_at - time.time()))
        local = []
        while time.time() < stop_at:
            t0 = time.perf_counter()
            client.infer(model, [inp])
            local.append(time.perf_counter() - t0)
        latencies.extend(local)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    time.sleep(max(0.0, start_at - time.time()))
    cpu = time.process_time()
    for t in pool:
        t.join()
    cpu = time.process_time() - cpu
    if errors:
        raise RuntimeError(f"{len(errors)} of {threads} clients failed, first: {errors[0]}")
    return latencies, cpu


def stream_load(
    address: str, model: str, shape: tuple[int, ...], window: int, start_at: float, stop_at: float
) -> list[float]:
    """In a client process: one ModelStreamInfer stream, ``window`` requests in flight; latencies (s)."""
    import tritonclient.grpc as tc

    images = (np.random.default_rng(0).random(shape) * 255).astype(np.uint8)
    client = tc.InferenceServerClient(address)
    inp = tc.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    slots = threading.Semaphore(window)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    errors: list[str] = []
    counting = [False]

    def callback(result, error) -> None:  # type: ignore[no-untyped-def]
        if error is not None:
            errors.append(str(error))
        else:
            t0 = sent.pop(result.get_response().id, None)
            if t0 is not None and counting[0]:
                latencies.append(time.perf_counter() - t0)
        slots.release()

    try:
        _stream(client, model, inp, slots, sent, counting, window, start_at, stop_at, callback)
    except Exception as exc:  # tritonclient's exceptions do not pickle back to the parent
        detail = f"; the callback got: {errors[0]}" if errors else ""  # a broken stream reports its cause there
        raise RuntimeError(f"{type(exc).__name__}: {exc}{detail}") from None
    if errors:
        raise RuntimeError(f"{len(errors)} streamed requests failed, first: {errors[0]}")
    return latencies


def _stream(client, model, inp, slots, sent, counting, window, start_at, stop_at, callback) -> None:  # type: ignore[no-untyped-def]
    client.start_stream(callback=callback)
    i = 0
    while time.time() < stop_at:
        counting[0] = time.time() >= start_at
        slots.acquire()
        rid = str(i)
        sent[rid] = time.perf_counter()
        client.async_stream_infer(model, [inp], request_id=rid)
        i += 1
    for _ in range(window):  # every answer back before the stream closes
        slots.acquire()
    client.stop_stream()


def measure_peer(
    pool: ProcessPoolExecutor,
    procs: int,
    peer: Peer,
    shape: tuple[int, ...],
    conc: int,
    seconds: float,
    stream_window: int = 0,
) -> dict:
    start_at = time.time() + 2.0
    stop_at = start_at + seconds
    futures: list[Future[Any]]
    if stream_window:
        futures = [pool.submit(stream_load, peer.address, peer.model, shape, stream_window, start_at, stop_at)]
    else:
        n = min(conc, procs)
        futures = [
            pool.submit(unary_load, peer.address, peer.model, shape, conc // n + (i < conc % n), start_at, stop_at)
            for i in range(n)
        ]
    time.sleep(max(0.0, start_at - time.time()))
    cpu0, counts0 = tree_cpu_seconds(peer.proc.pid), peer.counts()
    done = [f.result() for f in futures]  # unary loads: (latencies, client CPU s); a stream: latencies
    lat = np.concatenate([np.asarray(d[0] if isinstance(d, tuple) else d) for d in done]) * 1000
    client_cpu = sum(d[1] for d in done if isinstance(d, tuple)) if isinstance(done[0], tuple) else float("nan")
    cpu, counts = tree_cpu_seconds(peer.proc.pid) - cpu0, peer.counts()
    images = len(lat) * shape[0]
    mean = None
    if counts and counts0 and counts[1] > counts0[1]:
        mean = (counts[0] - counts0[0]) / (counts[1] - counts0[1])
    return {
        "images_per_s": images / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "cpu_s_per_1k": 1000 * cpu / images,
        "mean_batch": mean,
        "client_cpu_s_per_1k": 1000 * client_cpu / images,
    }


NAN = float("nan")
FAILED = {"images_per_s": NAN, "p50_ms": NAN, "cpu_s_per_1k": NAN, "mean_batch": None, "client_cpu_s_per_1k": NAN}


def attempt(label: str, peer: Peer, *args, **kwargs) -> dict | None:  # type: ignore[no-untyped-def]
    """:func:`measure_peer`, or None when it failed: reported with the peer's log tail, the run goes on."""
    try:
        return measure_peer(*args, **kwargs)
    except Exception as exc:  # one failed row must not lose the others
        alive = "running" if peer.proc.poll() is None else f"exited {peer.proc.returncode}"
        print(f"{label}: a measurement failed ({exc}); server {alive}, log tail:\n{peer.tail(600)}", flush=True)
        return None


def measure_local(call: Callable[[np.ndarray], object], images: np.ndarray, conc: int, seconds: float) -> dict:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    def worker() -> None:
        local = []
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            call(images)
            local.append(time.perf_counter() - t0)
        latencies.extend(local)

    call(images)
    threads = [threading.Thread(target=worker) for _ in range(conc)]
    t0, c0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(latencies) * len(images)
    return {
        "images_per_s": n / elapsed,
        "p50_ms": 1000 * float(np.median(latencies)),
        "cpu_s_per_1k": 1000 * cpu / n,
        "mean_batch": float(len(images)),
        "client_cpu_s_per_1k": 0.0,  # no client: the caller is the load
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card", default="resnet20-augmix-lrr", help="a card of --deck")
    parser.add_argument("--deck", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loads", default="64x1,1x1,1x8,1x32", help="BATCHxCONCURRENCY, comma-separated")
    parser.add_argument(
        "--peers", default="triton,mlserver,floor", help="peers to run (triton, mlserver, floor; empty: none)"
    )
    parser.add_argument("--peers-python", default=PEERS_PYTHON, help="Python of the peers' virtualenv")
    parser.add_argument("--stream-window", type=int, default=64, help="requests in flight on the stream rows")
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument(
        "--before-tree", type=Path, help="also serve from this source tree (e.g. `git archive` of an older commit)"
    )
    parser.add_argument("--as", dest="role", choices=("triton", "mlserver", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hwc", help=argparse.SUPPRESS)
    parser.add_argument("--classes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "triton":  # inside the peers virtualenv
        serve_triton(args.model_path, args.card, args.port, tuple(int(v) for v in args.hwc.split(",")), args.classes)
        return 0
    if args.role == "mlserver":
        serve_mlserver(args.model_path, args.card, args.port, args.folder)
        return 0
    if args.role == "floor":
        serve_floor(args.port, args.classes)
        return 0
    return run(args)


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from carddeck.deck import Deck, DeckStore

    source = DeckStore(args.deck)
    entry = source.manifest().find(args.card)
    tmp = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    model_path = tmp / "model.onnx"
    model_path.write_bytes(source.read_model(entry))
    DeckStore.create(tmp / "deck").add_card(model_path.read_bytes())
    deck = Deck.open(tmp / "deck")
    spec, classes = deck.input, len(deck.class_names)
    cores = len(os.sched_getaffinity(0))
    print(
        f"card {args.card} ({deck.cards[0].compression.method}), cores {cores}, client processes {args.client_procs}, "
        f"load average {os.getloadavg()[0]:.1f} at the start",
        flush=True,
    )

    peers: dict[str, Peer] = {}
    trees = {"CARD-Deck": ROOT, **({"CARD-Deck before": args.before_tree.resolve()} if args.before_tree else {})}
    for key, tree in trees.items():  # the older code on the same card, measured in the same run
        port = free_port(1)
        serve = ["serve", "--deck", str(tmp / "deck"), "--port", str(port), "--http-port", "-1"]
        cmd = [sys.executable, "-m", "carddeck", *serve, "--metrics-port", "-1", "--poll-interval-s", "0"]
        peers[key] = Peer(key, cmd, port, args.card, env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)
    libdir = (
        subprocess.run(
            [args.peers_python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if Path(args.peers_python).exists()
        else ""
    )
    wanted = [p for p in args.peers.split(",") if p]
    skipped: dict[str, str] = {}
    for name in wanted:
        if name == "floor":  # the project's own Python: no peers virtualenv needed
            port = free_port(1)
            cmd = [sys.executable, __file__, "--as", "floor", "--port", str(port), "--classes", str(classes)]
            peers["gRPC floor"] = Peer("gRPC floor", cmd, port, args.card)
            continue
        if not Path(args.peers_python).exists():
            skipped[name] = f"no peers virtualenv at {args.peers_python} (see this script's docstring)"
            continue
        port = free_port(3)
        common = [
            args.peers_python,
            __file__,
            "--as",
            name,
            "--model-path",
            str(model_path),
            "--card",
            args.card,
            "--port",
            str(port),
        ]
        env = {**os.environ, "LD_LIBRARY_PATH": f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        env.pop("PYTHONPATH", None)
        if name == "triton":
            cmd = [*common, "--hwc", f"{spec.height},{spec.width},{spec.channels}", "--classes", str(classes)]
            peers["Triton"] = Peer("Triton (pytriton)", cmd, port, args.card, env=env)
        elif name == "mlserver":
            peers["MLServer"] = Peer("MLServer", [*common, "--folder", str(tmp / "mlserver")], port, args.card, env=env)
    try:
        for key, peer in list(peers.items()):
            if not peer.wait_ready():
                skipped[key] = peer.error
                peer.stop()
                del peers[key]
        for key, why in skipped.items():
            print(f"{key}: not measured: {why}", flush=True)
        if "CARD-Deck" not in peers:
            return 1
        return _measure(args, deck, peers, spec)
    finally:
        for peer in peers.values():
            peer.stop()


def _measure(args: argparse.Namespace, deck, peers: dict[str, Peer], spec) -> int:  # type: ignore[no-untyped-def]
    name = args.card
    rng = np.random.default_rng(0)
    loads = [tuple(int(v) for v in load.split("x")) for load in args.loads.split(",")]
    pool = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
    list(pool.map(time.sleep, [0.1] * args.client_procs))
    rows: dict[tuple[str, int, int], list[dict | None]] = {}
    streams = [key for key in ("CARD-Deck", "CARD-Deck before", "Triton") if key in peers]
    try:
        for r in range(args.rounds):
            for batch, conc in loads:
                shape = (batch, spec.height, spec.width, spec.channels)
                images = (rng.random(shape) * 255).astype(np.uint8)
                rows.setdefault(("in-process ORT", batch, conc), []).append(
                    measure_local(lambda x: deck.run_card(name, x), images, conc, args.seconds)
                )
                for key, peer in peers.items():
                    rows.setdefault((key, batch, conc), []).append(
                        attempt(key, peer, pool, args.client_procs, peer, shape, conc, args.seconds)
                    )
            for key in streams:
                shape = (1, spec.height, spec.width, spec.channels)
                rows.setdefault((f"{key} stream", 1, 1), []).append(
                    attempt(
                        f"{key} stream",
                        peers[key],
                        pool,
                        args.client_procs,
                        peers[key],
                        shape,
                        1,
                        args.seconds,
                        stream_window=args.stream_window,
                    )
                )
            print(f"round {r + 1} of {args.rounds} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        pool.shutdown()

    def median(key: tuple[str, int, int]) -> dict:
        runs = sorted((r for r in rows[key] if r is not None), key=lambda x: x["images_per_s"])
        return runs[len(runs) // 2] if runs else FAILED

    print(f"\nimages/s (p50 ms, server CPU s per 1k images, mean executed batch); median of {args.rounds} rounds")
    labels = ["in-process ORT", *peers]
    print(f"{'load':<14}" + "".join(f"{label:>34}" for label in labels))
    for batch, conc in loads:
        cells = []
        for label in labels:
            m = median((label, batch, conc))
            mean = f"{m['mean_batch']:4.1f}" if m["mean_batch"] else "  - "
            cells.append(f"{m['images_per_s']:8.0f} ({m['p50_ms']:6.1f}, {m['cpu_s_per_1k']:5.2f}, {mean})")
        print(f"b{batch:<3} c{conc:<8}" + "".join(f"{c:>34}" for c in cells))
    print("client CPU s per 1k images (the load processes: tritonclient and grpc, on the server's cores)")
    print(f"{'load':<14}" + "".join(f"{label:>20}" for label in peers))
    for batch, conc in loads:
        cells = [f"{median((label, batch, conc)).get('client_cpu_s_per_1k', NAN):20.2f}" for label in peers]
        print(f"b{batch:<3} c{conc:<8}" + "".join(cells))
    for key in streams:
        m = median((f"{key} stream", 1, 1))
        print(
            f"{key} stream, b1, window {args.stream_window}: {m['images_per_s']:8.0f} img/s (p50 {m['p50_ms']:.1f} ms, "
            f"{m['cpu_s_per_1k']:.2f} CPU s / 1k, mean batch {m['mean_batch'] or 0:.1f})"
        )

    def ratio(a: tuple[str, int, int], b: tuple[str, int, int], of: str = "images_per_s") -> str:
        """Each round's a / b (measured minutes apart at most), median and range over the rounds."""
        each = sorted(x[of] / y[of] for x, y in zip(rows[a], rows[b]) if x and y)
        if not each:
            return "failed"
        return f"{statistics.median(each):.2f}" + (f" ({each[0]:.2f}-{each[-1]:.2f})" if len(each) > 1 else "")

    print("\nratios (same run; each round's ratio, median and range over the rounds):")
    for batch, conc in loads:
        ours = ("CARD-Deck", batch, conc)
        parts = [f"{key} {ratio(ours, (key, batch, conc))}x" for key in peers if key not in ("CARD-Deck", "gRPC floor")]
        parts.append(f"of in-process ORT {ratio(ours, ('in-process ORT', batch, conc))}")
        if (64, 1) in loads and batch == 1:
            parts.append(f"of in-process b64 {ratio(ours, ('in-process ORT', 64, 1))}")
        print(f"  CARD-Deck b{batch} c{conc}: vs " + ", ".join(parts))
    if "gRPC floor" in peers:  # closed loop, one client: a server's round trip adds the floor's to in-process
        for batch, conc in loads:
            inproc, floor = rows[("in-process ORT", batch, conc)], rows[("gRPC floor", batch, conc)]
            caps = sorted(x["p50_ms"] / (x["p50_ms"] + f["p50_ms"]) for x, f in zip(inproc, floor) if x and f)
            if conc != 1 or not caps:
                continue
            reach = sorted(
                (c["images_per_s"] / x["images_per_s"]) / (x["p50_ms"] / (x["p50_ms"] + f["p50_ms"]))
                for c, x, f in zip(rows[("CARD-Deck", batch, conc)], inproc, floor)
                if c and x and f
            )
            cap, reached = statistics.median(caps), statistics.median(reach)
            print(f"  b{batch} c1: the gRPC floor caps a Python gRPC server at {cap:.3f} of in-process ORT "
                  f"(p50 in-process / (in-process + floor)); CARD-Deck reaches {reached:.3f} of that cap")  # fmt: skip
    if "CARD-Deck before" in peers:
        for batch, conc in loads:
            now, before = ("CARD-Deck", batch, conc), ("CARD-Deck before", batch, conc)
            print(f"  CARD-Deck / CARD-Deck before, b{batch} c{conc}: {ratio(now, before)}x images/s, "
                  f"{ratio(now, before, 'cpu_s_per_1k')}x server CPU per image")  # fmt: skip
    if (1, 1) in loads:
        for key in streams:
            print(f"  {key} stream b1 / {key} unary b1 c1: {ratio((f'{key} stream', 1, 1), (key, 1, 1))}x")
    print("  targets: CARD-Deck / Triton b1 c32 >= 1.3x, mean batch >= 12; CARD-Deck stream / unary b1 c1 >= 2x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
