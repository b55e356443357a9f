"""Replicas converge: three `carddeck serve` processes share one deck store; how fast does a change reach all?

    python benchmarks/bench_replicas.py [--changes 20] [--poll 0.5] [--backend local|s3|both]

For each backend, a writable copy of the default deck (``carddeck deck init``; on S3 the same files
uploaded, manifest last, to a bucket of a moto server this script starts on a loopback port) is served
by three replicas (real subprocesses, loopback ports, ``--poll-interval-s`` = ``--poll``). A load
generator (its own process, one thread per replica) sends Predict (tritonclient.grpc, the gated deck
model, the deck's own calibration images) to all three the whole time. Each change alternates: load
``models/extra/resnet20-clean-lrr.onnx`` through one replica (RepositoryModelLoad), unload it through the
next (RepositoryModelUnload); a random pause of up to one poll interval separates changes, so they fall
at every phase of the replicas' poll timers.

Per change it measures, from the moment the new manifest is in the store (a watcher in this process
reads the store's manifest version every few milliseconds) to the moment every replica answers
ModelMetadata with the new deck version (each replica asked every 10 ms): median and max over the
changes. Also the change call's own duration (validate, commit, swap on the writing replica), and the
load generator's requests: answered and failed. Targets: every replica within poll interval + 1 s;
zero failed requests.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from carddeck.deck import DeckStore, init_deck  # noqa: E402
from carddeck.deck.store import MANIFEST  # noqa: E402

CARD = ROOT / "models" / "extra" / "resnet20-clean-lrr.onnx"
TOKEN = "bench-replicas-admin"
DECK_MODEL = "carddeck"


# -- processes --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server(work: Path) -> Iterator[dict[str, str]]:
    """A moto S3 server (its own process) on a loopback port; yields the environment boto3 reads."""
    port = free_port()
    log = open(work / "moto.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"moto server did not start:\n{(work / 'moto.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "CARDDECK_CACHE_DIR": str(work / "cache"),
        }
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@dataclass
class Replica:
    proc: subprocess.Popen
    port: int
    log: Path


def start_replicas(location: str, n: int, poll: float, env: dict[str, str], work: Path) -> list[Replica]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CARDDECK_", "AWS_"))}
    env = {**base, **env, "PYTHONPATH": str(ROOT), "CARDDECK_ADMIN_TOKEN": TOKEN}
    replicas = []
    for i in range(n):
        log = work / f"replica-{i}.log"
        cmd = [sys.executable, "-m", "carddeck", "serve", "--deck", location, "--port", "0", "--http-port", "-1",
               "--metrics-port", "-1", "--poll-interval-s", str(poll)]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        replicas.append(Replica(proc, 0, log))
    deadline = time.monotonic() + 180
    for r in replicas:
        while not r.port:
            text = r.log.read_text(errors="replace")
            found = re.search(r"serving deck .* on \S+:(\d+)", text)
            if found:
                r.port = int(found.group(1))
            elif r.proc.poll() is not None or time.monotonic() > deadline:
                stop(replicas)
                raise SystemExit(f"replica did not start:\n{text[-3000:]}")
            else:
                time.sleep(0.1)
    return replicas


def stop(replicas: list[Replica]) -> None:
    for r in replicas:
        r.proc.terminate()
    for r in replicas:
        try:
            r.proc.wait(30)
        except subprocess.TimeoutExpired:
            r.proc.kill()


def load_generator(ports: list[int], images: object, stop_event: object, results: object) -> None:
    """(A process of its own.) One thread per replica sends Predict back to back until ``stop_event``."""
    import tritonclient.grpc as tc

    counts = [[0, 0] for _ in ports]  # answered, failed
    errors: list[str] = []

    def drive(i: int, port: int) -> None:
        client = tc.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = tc.InferInput("images", list(images.shape), "UINT8")  # type: ignore[attr-defined]
        tensor.set_data_from_numpy(images)
        while not stop_event.is_set():  # type: ignore[attr-defined]
            try:
                result = client.infer(DECK_MODEL, [tensor], client_timeout=30)
                assert result.as_numpy("labels").shape == (len(images),)  # type: ignore[arg-type]
                counts[i][0] += 1
            except Exception as exc:  # every failure counts, whatever its kind
                counts[i][1] += 1
                if len(errors) < 5:
                    errors.append(f"replica {i}: {type(exc).__name__}: {exc}")
        client.close()

    threads = [threading.Thread(target=drive, args=(i, p)) for i, p in enumerate(ports)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put((counts, errors))  # type: ignore[attr-defined]


# -- observation --------------------------------------------------------------------------------------
class Seen:
    """When each deck version was first seen, by one observer (the store, or one replica)."""

    def __init__(self) -> None:
        self.first: dict[int, float] = {}
        self.cond = threading.Condition()
        self.errors = 0

    def saw(self, version: int) -> None:
        with self.cond:
            if version not in self.first:
                self.first[version] = time.monotonic()
                self.cond.notify_all()

    def wait(self, version: int, timeout: float) -> float | None:
        with self.cond:
            self.cond.wait_for(lambda: version in self.first, timeout)
            return self.first.get(version)


def watch_store(location: str, seen: Seen, stop_event: threading.Event) -> None:
    store = DeckStore(location)  # manifest() re-reads only when the change stamp (mtime, ETag) moved
    while not stop_event.is_set():
        try:
            seen.saw(store.manifest().version)
        except Exception:
            seen.errors += 1
        time.sleep(0.003)


def watch_replica(port: int, seen: Seen, stop_event: threading.Event) -> None:
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(f"127.0.0.1:{port}")
    while not stop_event.is_set():
        try:
            seen.saw(int(client.get_model_metadata(DECK_MODEL, client_timeout=10).versions[0]))
        except Exception:
            seen.errors += 1
        time.sleep(0.01)
    client.close()


# -- one backend --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    backend: str
    poll: float
    lags: list[float] = field(default_factory=list)  # store commit -> last replica serving it
    calls: list[float] = field(default_factory=list)  # the change call's own duration
    missed: int = 0  # changes some replica never served within the timeout
    answered: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    change_errors: list[str] = field(default_factory=list)


def make_deck(backend: str, work: Path, env: dict[str, str]) -> str:
    local = work / "deck"
    init_deck(local)  # a writable copy of the packaged default deck
    if backend == "local":
        return str(local)
    import boto3

    bucket = f"replicas-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip
    client.create_bucket(Bucket=bucket)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name not in (MANIFEST, ".lock"))
    for path in [*files, local / MANIFEST]:  # the manifest last, as a writer would
        client.put_object(Bucket=bucket, Key=f"deck/{path.relative_to(local).as_posix()}", Body=path.read_bytes())
    return f"s3://{bucket}/deck"


def run_backend(backend: str, args: argparse.Namespace, work: Path) -> Outcome:
    import numpy as np
    import tritonclient.grpc as tc

    with contextlib.ExitStack() as stack:
        env = stack.enter_context(moto_server(work)) if backend == "s3" else {}
        for k, v in env.items():  # this process's store watcher reads the store like the replicas do
            os.environ[k] = v
        location = make_deck(backend, work, env)
        store = DeckStore(location)
        images = np.ascontiguousarray(store.calibration_images()[: args.images])  # the deck's own input contract
        card = CARD.read_bytes()
        card_name = CARD.stem
        print(f"[{backend}] deck {location} (version {store.version}); starting {args.replicas} replicas", flush=True)
        t0 = time.monotonic()
        replicas = start_replicas(location, args.replicas, args.poll, env, work)
        stack.callback(stop, replicas)
        print(f"[{backend}] replicas up in {time.monotonic() - t0:.1f} s on ports {[r.port for r in replicas]}",
              flush=True)  # fmt: skip

        stop_watch = threading.Event()
        stack.callback(stop_watch.set)
        store_seen, replica_seen = Seen(), [Seen() for _ in replicas]
        watchers = [threading.Thread(target=watch_store, args=(location, store_seen, stop_watch), daemon=True)]
        watchers += [threading.Thread(target=watch_replica, args=(r.port, s, stop_watch), daemon=True)
                     for r, s in zip(replicas, replica_seen, strict=True)]  # fmt: skip
        for t in watchers:
            t.start()

        ctx = mp.get_context("spawn")
        stop_load, results = ctx.Event(), ctx.Queue()
        loader = ctx.Process(target=load_generator, args=([r.port for r in replicas], images, stop_load, results))
        loader.start()
        time.sleep(2.0)  # the load is running before the first change
        outcome = Outcome(backend, args.poll)
        clients = [tc.InferenceServerClient(f"127.0.0.1:{r.port}") for r in replicas]
        headers = {"authorization": f"Bearer {TOKEN}"}
        version = store.manifest().version
        rng = random.Random(0)
        timeout = args.poll + 30.0
        for k in range(args.changes):
            writer = clients[k % len(clients)]
            start = time.monotonic()
            try:
                if k % 2 == 0:
                    writer.load_model(card_name, headers=headers, files={"file:model.onnx": card}, client_timeout=60)
                else:
                    writer.unload_model(card_name, headers=headers, client_timeout=60)
            except Exception as exc:
                outcome.change_errors.append(f"change {k + 1}: {exc}")
                continue
            outcome.calls.append(time.monotonic() - start)
            version += 1
            committed = store_seen.wait(version, timeout)
            served = [s.wait(version, timeout) for s in replica_seen]
            if committed is None or None in served:
                outcome.missed += 1
                version = store.manifest().version
                print(f"[{backend}] change {k + 1}/{args.changes}: not served everywhere in {timeout:.0f} s",
                      flush=True)  # fmt: skip
                continue
            lag = max(t for t in served if t is not None) - committed
            outcome.lags.append(lag)
            print(f"[{backend}] change {k + 1}/{args.changes} ({'add' if k % 2 == 0 else 'remove'} via replica "
                  f"{k % len(clients)}): deck v{version}, every replica in {lag:.3f} s", flush=True)  # fmt: skip
            time.sleep(rng.uniform(0, args.poll))  # the next change falls at another phase of the poll timers
        stop_load.set()
        counts, outcome.errors = results.get(timeout=120)
        loader.join(30)
        outcome.answered = sum(c[0] for c in counts)
        outcome.failed = sum(c[1] for c in counts)
        for c in clients:
            c.close()
        for k in env:
            os.environ.pop(k, None)
        return outcome


def report(outcomes: list[Outcome], args: argparse.Namespace) -> bool:
    print()
    print(
        f"{args.replicas} replicas, poll interval {args.poll} s, {args.changes} changes "
        f"(add/remove {CARD.name} alternating), Predict of {args.images} images back to back on every replica"
    )
    print(f"{'backend':8} {'changes':>7} {'median s':>9} {'max s':>7} {'target s':>8} {'call p50 s':>10} "
          f"{'requests':>8} {'failed':>6}  targets")  # fmt: skip
    ok = True
    for o in outcomes:
        target = o.poll + 1.0
        converged = len(o.lags) == args.changes and not o.missed and max(o.lags, default=float("inf")) <= target
        no_fail = o.failed == 0 and not o.change_errors
        ok &= converged and no_fail
        med = statistics.median(o.lags) if o.lags else float("nan")
        call = statistics.median(o.calls) if o.calls else float("nan")
        print(f"{o.backend:8} {len(o.lags):>7} {med:>9.3f} {max(o.lags, default=float('nan')):>7.3f} {target:>8.2f} "
              f"{call:>10.3f} {o.answered:>8} {o.failed:>6}  converge {'met' if converged else 'MISSED'}, "
              f"zero failed {'met' if no_fail else 'MISSED'}")  # fmt: skip
        for line in [*o.change_errors, *o.errors]:
            print(f"  {o.backend}: {line}")
    print("(seconds from the new manifest in the store to every replica serving it; call: the change RPC itself)")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=20, help="deck changes per backend (add, remove, ...)")
    parser.add_argument("--poll", type=float, default=0.5, help="the replicas' --poll-interval-s")
    parser.add_argument("--backend", choices=("local", "s3", "both"), default="both")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--images", type=int, default=4, help="images per Predict of the load generator")
    args = parser.parse_args()
    if args.changes < 1 or args.poll <= 0 or args.replicas < 2 or args.images < 1:
        parser.error("need --changes >= 1, --poll > 0, --replicas >= 2, --images >= 1")
    backends = ["local", "s3"] if args.backend == "both" else [args.backend]
    outcomes = []
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix=f"bench-replicas-{backend}-") as tmp:
            outcomes.append(run_backend(backend, args, Path(tmp)))
    return 0 if report(outcomes, args) else 1


if __name__ == "__main__":
    sys.exit(main())
