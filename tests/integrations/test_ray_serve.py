"""CARD-Deck on a real local Ray cluster (``ray.init`` on 127.0.0.1, small CPU fractions).

One cluster for the module (starting Ray takes ~25 s on 2 busy cores), running one deck's application at a time
(:class:`Cluster`): a local-directory deck deployed through the Python API (``ray_deck``), and an S3 deck on moto's
server with two ingress replicas, run by the ``carddeck ray-serve`` command (the class of ``s3_ray_deck``). Each
test asks for the one it needs and leaves it as it found it, so they pass in any order (pytest-randomly keeps a
class together: one switch of application per run). Select them with ``-m ray``.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from carddeck.deck import Deck, DeckStore
from carddeck.errors import CardNotFound, DeckConflict
from carddeck.gating import SIGNATURE_DIM, CalibrationPoint, fit_router
from carddeck.gating.policies import POLICIES
from carddeck.gating.shift import ShiftDetector, Trust
from carddeck.observability.metrics import BATCH_BUCKETS
from tests.deck.test_s3 import AWS_VARS, s3_endpoint  # noqa: F401 - fixtures
from tests.observability.promql import free_port
from tests.servers import ROOT, card, make_deck, noisy_images, smooth_images

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.timeout(900)]


def wait_for(what: str, check: Any, timeout_s: float, every_s: float = 0.25) -> float:
    """Seconds until ``check()`` is truthy; fails after ``timeout_s``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(every_s)
    return time.monotonic() - start


ADMIN_TOKEN = "ray-admin-token"
# labels Ray (its node, worker and exporter) and Serve add to a deployment's series; the rest are the server's
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "application", "deployment",
              "replica", "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"}  # fmt: skip


class LiveDeck:
    def __init__(self, root: Path, handle: Any, http_port: int, grpc_port: int, metrics_url: str) -> None:
        self.root = root
        self.handle = handle
        self.url = f"http://127.0.0.1:{http_port}"
        self.grpc_address = f"127.0.0.1:{grpc_port}"
        self.metrics_url = metrics_url  # the node's Ray metrics export (what Ray's service discovery lists)

    def predict(self, images: np.ndarray, policy: str | None = None, per_sample: bool = False) -> dict[str, Any]:
        return self.handle.predict.remote(images, policy, per_sample).result(timeout_s=60)

    def state(self) -> dict[str, Any]:
        return self.handle.ready.remote().result(timeout_s=60)

    def counts(self) -> dict[str, int]:
        return self.handle.counts.remote().result(timeout_s=60)

    def post(self, path: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        status, _, answer = self.http(path, doc)
        return status, answer

    def http(
        self, path: str, doc: dict[str, Any] | None = None, *, admin: bool = False
    ) -> tuple[int, dict[str, str], Any]:
        """Status, headers and JSON body of a GET (``doc`` None) or a POST of ``doc`` (``admin``: with the token)."""
        data = None if doc is None else json.dumps(doc).encode()
        headers = {"Content-Type": "application/json"}
        if admin:
            headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        req = urllib.request.Request(self.url + path, data, headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, dict(resp.headers), json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")

    def infer(self, x: np.ndarray) -> tuple[str, dict[str, str]]:
        """The deck version and the parameters (the verdict among them) of an OIP REST answer."""
        inputs = [{"name": "images", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}]
        status, doc = self.post("/v2/models/carddeck/infer", {"inputs": inputs})
        assert status == 200, doc
        return doc["model_version"], doc["parameters"]

    def ray_series(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Each ``carddeck_*`` sample name Ray exports (``ray_`` prefix removed) -> (labels, value) of its series."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=30) as resp:
            text = resp.read().decode()
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("ray_carddeck_"):
                    out.setdefault(sample.name.removeprefix("ray_"), []).append((sample.labels, sample.value))
        return out

    def ray_value(self, name: str, **labels: str) -> float:
        """The sum of the exported series of ``name`` with ``labels`` (0 when none)."""
        series = self.ray_series().get(name, [])
        return sum(v for got, v in series if all(got.get(k) == want for k, want in labels.items()))


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, sorted labels) -> value
GATE_SERIES = ("carddeck_gate_", "carddeck_domain_distance", "carddeck_nearest_domain_distance")  # the ingress's
BATCH_SERIES = ("carddeck_batch_size", "carddeck_queue_wait_seconds", "carddeck_card_duration_seconds")  # cards'


def exported_samples(live: LiveDeck, prefixes: tuple[str, ...]) -> Samples:
    """Every exported sample whose name starts with one of ``prefixes``, all its labels (Ray's too) sorted."""
    return {
        (name, tuple(sorted(labels.items()))): value
        for name, series in live.ray_series().items()
        if name.startswith(prefixes)
        for labels, value in series
    }


def settled(live: LiveDeck, prefixes: tuple[str, ...], quiet_s: float = 2.5) -> Samples:
    """:func:`exported_samples` once it stopped moving for ``quiet_s`` (each replica pushes every second and Ray
    exports every second: what was still on its way by then is in)."""
    last, since = exported_samples(live, prefixes), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.25)
        now = exported_samples(live, prefixes)
        if now != last:
            last, since = now, time.monotonic()
    return last


def wait_for_moves(live: LiveDeck, before: Samples, moves: Samples, timeout_s: float) -> None:
    """Until each sample of ``moves`` (name, some of its labels) has moved by exactly its value since ``before``,
    summed over the exported series that carry those labels; fails naming those that did not."""

    def moved(now: Samples, name: str, labels: tuple[tuple[str, str], ...]) -> float:
        # a series gone since (a replica of an earlier application that Ray stopped exporting) moved nothing
        return sum(
            v - before.get((n, got), 0.0) for (n, got), v in now.items() if n == name and set(labels) <= set(got)
        )

    deadline = time.monotonic() + timeout_s
    while True:
        now = exported_samples(live, tuple({name for name, _ in moves}))
        wrong = {key: (moved(now, *key), want) for key, want in moves.items()}
        wrong = {key: got for key, got in wrong.items() if not np.isclose(*got, rtol=1e-6, atol=1e-9)}
        if not wrong:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"moved by (got, wanted) after {timeout_s:g} s: {wrong}")
        time.sleep(0.25)


def stored_detector(root: Path) -> tuple[int, ShiftDetector | None]:
    """The store's deck version and the shift detector it stores for its cards (None: none for these cards)."""
    store = DeckStore(root)
    manifest = store.manifest()
    rel = dict(manifest.gate).get("shift")
    if not rel:
        return manifest.version, None
    detector = ShiftDetector.load(io.BytesIO(store.read_file(rel)), name=rel)
    fits = sorted(detector.notes.get("cards", ())) == sorted(e.key for e in manifest.active())
    return manifest.version, detector if fits else None


def wait_for_refit(ray_deck: LiveDeck, timeout_s: float = 120) -> int:
    """The deck version whose stored detector fits its cards, once every ingress replica serves it."""
    wait_for("a shift detector for the deck's cards in the store", lambda: stored_detector(ray_deck.root)[1], timeout_s)
    version = stored_detector(ray_deck.root)[0]
    wait_for(
        "every ingress replica serving it with its detector",
        lambda: all(s["version"] >= version and s["shift_detector"] for s in ingress_states(ray_deck).values()),
        60,
    )
    return version


def in_process_verdict(root: Path | str, x: np.ndarray) -> tuple[int, Trust]:
    """The deck version and the verdict ``carddeck serve``'s monitor gives ``x`` with the detector the deck stores."""
    from carddeck.observability.shift import ShiftLoader, ShiftMonitor

    local, deck = ShiftMonitor(), Deck.open(root)
    ShiftLoader(local, refit=False)(deck)
    p = deck.predict(x)
    (verdict,) = local.judge([("carddeck", deck.prepare(x), p.routing, p.probabilities)])
    return deck.version, verdict


def assert_same_verdict(got: Trust, want: Trust) -> None:
    assert (got.state, got.scope, got.expected_kind) == (want.state, want.scope, want.expected_kind), (got, want)
    np.testing.assert_allclose(got.out_of_scope, want.out_of_scope, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.expected_accuracy, want.expected_accuracy, rtol=1e-4)


def ingress_states(live: LiveDeck) -> dict[str, dict[str, Any]]:
    """Each running ingress replica's ``ready`` answer, by replica (Ray routes each call to one of them at
    random: asked until every one has answered)."""
    want, states = replicas("ingress", "carddeck"), {}
    for _ in range(100):
        state = live.state()
        states[state["replica"]] = state
        if len(states) >= want:
            break
    return states


def replica_log(deployment: str, live: bool = False) -> str:
    """What the carddeck application's replicas of ``deployment`` logged (Serve's replica log files); ``live``:
    only its replicas running now (not those of an application this module replaced, whose deck versions may
    read alike)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    ids = replica_ids(deployment, "carddeck") if live else ["*"]
    return "".join(p.read_text(errors="replace") for i in ids
                   for p in sorted(logs.glob(f"replica_carddeck_{deployment}_{i}.log")))  # fmt: skip


def replica_ids(deployment: str, app: str) -> list[str]:
    """The live replicas of one deployment: Serve names their actors "SERVE_REPLICA::<app>#<deployment>#<id>",
    and the id is the `replica` label of their series."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a["name"][len(prefix) :] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)]  # fmt: skip


def live_replicas() -> set[str]:
    """The ids (``replica`` labels) of every Serve replica alive now, of any application."""
    import ray

    return {a["name"].rsplit("#", 1)[-1] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::")}  # fmt: skip


def grpc_calls(live: LiveDeck, x: np.ndarray) -> None:
    """Through Ray's gRPC proxy: a carddeck.v1 Predict of ``x`` answered, a RemoveCard without the admin token
    refused (UNAUTHENTICATED)."""
    import grpc

    from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb
    from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2_grpc

    app = (("application", "carddeck"),)  # Ray's proxy picks the application by this metadata
    with grpc.insecure_channel(live.grpc_address) as channel:
        stub = carddeck_pb2_grpc.CardDeckStub(channel)
        images = pb.Tensor(dtype=pb.DTYPE_UINT8, shape=list(x.shape), data=x.tobytes())
        assert len(stub.Predict(pb.PredictRequest(images=images), metadata=app, timeout=60).labels) == len(x)
        with pytest.raises(grpc.RpcError) as refused:
            stub.RemoveCard(pb.RemoveCardRequest(name="g1"), metadata=app, timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value


def replicas(deployment: str, app: str) -> int:
    """RUNNING replicas of one deployment (Serve's own status)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return int(status.deployments[deployment].replica_states.get("RUNNING", 0))


def s3_vars(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint}  # fmt: skip


class Cluster:
    """The module's local Ray cluster and Serve. It runs one deck's application at a time (they share the names
    ``carddeck`` and ``carddeck-card-<name>``): :meth:`serving` deploys the one a test needs if another runs,
    so the tests pass in any order; the S3 group is one class, which pytest-randomly keeps together."""

    def __init__(self, address: str, http_port: int, grpc_port: int, metrics_url: str) -> None:
        self.address = address  # the GCS address `carddeck ray-serve --address` joins
        self.http_port, self.grpc_port, self.metrics_url = http_port, grpc_port, metrics_url
        self.running: str | None = None  # which deck's application runs now
        self.live: LiveDeck | None = None
        self._stop: Any = None  # takes it down

    def serving(self, name: str, start: Any) -> LiveDeck:
        """The application ``name``: the running one, or ``start()`` -> (LiveDeck, stop) after the other's stop."""
        if self.running != name or self.live is None:
            self.release()
            self.live, self._stop = start()
            self.running = name
        return self.live

    def release(self) -> None:
        if self._stop is not None:
            self._stop()
        self.running, self.live, self._stop = None, None, None


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Cluster]:  # noqa: F811
    import os

    import ray
    from ray import serve

    from carddeck.integrations.ray_serve import GRPC_SERVICER

    with pytest.MonkeyPatch.context() as env:
        # the node's environment, which every replica inherits whichever driver deploys it (this process, or
        # `carddeck ray-serve --address`): the code under test, and moto's S3 reached as any boto3 client does
        for name in AWS_VARS:
            env.delenv(name, raising=False)
        env.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
        env.setenv("CARDDECK_CACHE_DIR", str(tmp_path_factory.mktemp("ray-cache")))
        for name, value in s3_vars(s3_endpoint).items():
            env.setenv(name, value)
        ray.init(
            address="local",
            num_cpus=4,  # logical CPUs: the replicas ask for fractions of them; 2 real cores do the work
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            _system_config={"metrics_report_interval_ms": 1000},  # Ray's metrics export every second, not 10
        )
        http_port, grpc_port = free_port(), free_port()
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
        )
        node = ray.nodes()[0]
        metrics_url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        cluster = Cluster(ray.get_runtime_context().gcs_address, http_port, grpc_port, metrics_url)
        try:
            yield cluster
        finally:
            cluster.release()
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def local_deck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local-directory deck with a router and calibration images but no shift detector (the reconciler refits
    one at deploy)."""
    root = make_deck(tmp_path_factory.mktemp("ray") / "deck")
    store = DeckStore(root)
    keys = [e.key for e in store.manifest().active()]
    rng = np.random.default_rng(0)
    points = [
        CalibrationPoint(rng.standard_normal(SIGNATURE_DIM).astype(np.float32),
                         rng.dirichlet(np.ones(10), size=(len(keys), 8)).astype(np.float32), np.arange(8) % 10)
        for _ in range(4)
    ]  # fmt: skip
    store.set_gate(router=fit_router(points, keys))  # so that the 'calibrated' policy serves too
    # the images the reconciler refits the shift detector from; 32 make a refit take a few hundred card calls,
    # so the `unknown` it leaves after AddCard is seen
    store.set_calibration(smooth_images(32, seed=99))
    return root


@pytest.fixture
def ray_deck(ray_cluster: Cluster, local_deck: Path) -> LiveDeck:
    """The application on the local deck, one ingress replica, deployed through the Python API (again, if the S3
    group's replaced it)."""
    from carddeck.integrations.ray_serve import RayDeckConfig, deploy, undeploy

    config = RayDeckConfig(
        deck=str(local_deck),
        poll_interval_s=0.5,
        drain_s=3.0,
        card_num_cpus=0.25,
        target_ongoing_requests=2,
        upscale_delay_s=1.0,
        downscale_delay_s=4.0,
        admin_token=ADMIN_TOKEN,
    )
    c = ray_cluster
    return c.serving("local", lambda: (LiveDeck(local_deck, deploy(config), c.http_port, c.grpc_port, c.metrics_url),
                                       undeploy))  # fmt: skip


def test_predictions_equal_the_in_process_deck_for_every_policy(ray_deck: LiveDeck) -> None:
    deck = Deck.open(ray_deck.root)
    x = np.concatenate([noisy_images(5, seed=1), smooth_images(5, seed=2)])
    for policy in POLICIES.names():
        for per_sample in (False, True):
            ref = deck.predict(x, policy=policy, per_sample=per_sample)
            out = ray_deck.predict(x, policy, per_sample)
            assert out["card_names"] == ref.routing.card_names
            np.testing.assert_array_equal(out["weights"], ref.routing.weights)
            np.testing.assert_allclose(out["probabilities"], ref.probabilities, rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(out["labels"], ref.labels)
    # the OIP REST route of the ingress answers the same (JSON tensors through Serve's HTTP proxy)
    status, doc = ray_deck.post(
        "/v2/models/carddeck/infer",
        {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}],
         "parameters": {"policy": "soft"}},
    )  # fmt: skip
    assert status == 200, doc
    probs = next(o for o in doc["outputs"] if o["name"] == "probabilities")
    ref = deck.predict(x, policy="soft")
    np.testing.assert_allclose(np.reshape(probs["data"], probs["shape"]), ref.probabilities, rtol=1e-6, atol=1e-7)
    # bad input: the same clear 400 as carddeck serve, not a traceback
    status, doc = ray_deck.post(
        "/v2/models/carddeck/infer", {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1], "data": [0]}]}
    )
    assert status == 400 and "not an input of this model; send 'images'" in doc["error"]


def test_the_carddeck_v1_grpc_service_through_rays_grpc_proxy(ray_deck: LiveDeck) -> None:
    import grpc

    from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb
    from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2_grpc

    x = noisy_images(4, seed=8)
    ref = Deck.open(ray_deck.root).predict(x, policy="soft")
    app = (("application", "carddeck"),)  # Ray's proxy picks the application by this metadata
    with grpc.insecure_channel(ray_deck.grpc_address) as channel:
        stub = carddeck_pb2_grpc.CardDeckStub(channel)
        images = pb.Tensor(dtype=pb.DTYPE_UINT8, shape=list(x.shape), data=x.tobytes())
        reply = stub.Predict(pb.PredictRequest(images=images, policy="soft"), metadata=app, timeout=60)
        probs = np.frombuffer(reply.probabilities.data, np.float32).reshape(ref.probabilities.shape)
        np.testing.assert_allclose(probs, ref.probabilities, rtol=1e-6, atol=1e-7)
        assert list(reply.labels) == ref.labels.tolist() and reply.routing.policy == "soft"
        assert {c.name for c in stub.ListCards(pb.ListCardsRequest(), metadata=app, timeout=60).cards} == {"g1", "a1"}
        with pytest.raises(grpc.RpcError) as bad:  # errors keep their status and message
            stub.Predict(pb.PredictRequest(images=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1, 2])), metadata=app)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad.value
        with pytest.raises(grpc.RpcError) as refused:  # admin RPCs need the admin token, as on carddeck serve
            stub.RemoveCard(pb.RemoveCardRequest(name="g1"), metadata=app)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
    assert "g1" in ray_deck.state()["cards"]


def test_the_reconciler_refits_a_missing_detector_and_answers_carry_its_verdict(ray_deck: LiveDeck) -> None:
    """The fixture's deck stores calibration images but no shift detector: the reconciler refits one from them
    through the card deployments (no dataset, no train extra) and stores it in the deck; the ingress then
    answers with the state, expected accuracy and out-of-scope images the in-process monitor gives the same
    request with that detector (kills a Ray deployment that never refits or never stores its refit, and an
    ingress that never judges or loads no detector)."""
    from carddeck.data.datasets import load_dataset

    version = wait_for_refit(ray_deck)
    detector = stored_detector(ray_deck.root)[1]
    assert detector is not None and detector.notes["data"] == "deck calibration images (label-free refit)"
    x = np.concatenate([load_dataset("digits32", "test").images[:12], noisy_images(4, seed=5)])
    local_version, want = in_process_verdict(ray_deck.root, x)
    served, got = ray_deck.infer(x)
    assert served == str(version) == str(local_version)
    assert want.state != "unknown" and got["shift_state"] == want.state and got["shift_scope"] == "batch"
    assert got["expected_accuracy_kind"] == want.expected_kind
    assert got["out_of_scope_images"] == ",".join(str(i) for i in np.flatnonzero(~want.in_scope))


def test_the_series_are_exported_through_rays_metrics_under_carddeck_serves_names(
    ray_deck: LiveDeck, prometheus_tools: dict[str, str], tmp_path: Path
) -> None:
    """Ray's metrics export (each node's port, where Ray's service discovery points Prometheus) carries the
    ingress's request, shift and gate series, the card deployments' batching series and the reconciler's refits
    under the names and labels ``carddeck serve`` gives them (Ray and Serve add only their own labels); one
    request moves the gate and batching series by exactly what ``carddeck serve``'s Metrics counts for it and what
    each card ran; through serve/ray/prometheus.yml a real Prometheus answers the shipped dashboard's and alerts'
    queries on them unchanged. Kills: no export, a series or label renamed or left out, a routing not counted
    (or counted per request rather than per image), a card batch measured in requests, a relabelling that does
    not strip Ray's prefix."""
    from prometheus_client import CollectorRegistry

    from carddeck.deck.deck import routed_rows
    from carddeck.observability.metrics import Metrics
    from carddeck.observability.shift import ShiftLoader, ShiftMonitor
    from carddeck.serving.snapshot import Snapshots
    from tests.observability.promql import (
        RAY_PROMETHEUS_YML,
        alert_rules,
        dashboard_exprs,
        running_prometheus,
        substitute,
    )

    wait_for_refit(ray_deck)  # the detector the deploy's refit stores judges the request
    x = np.concatenate([smooth_images(8, seed=11), noisy_images(8, seed=12)])
    # what carddeck serve's Metrics holds for the same request and detector, and for a refit
    local = Metrics(CollectorRegistry())
    monitor, deck = ShiftMonitor(local), Deck.open(ray_deck.root)
    ShiftLoader(monitor, refit=False)(deck)
    p = deck.predict(x)
    monitor.judge([("carddeck", deck.prepare(x), p.routing, p.probabilities)])
    local.observe_refit("ok", 1.0)
    local.set_deck(deck.version, deck.cards)  # the cards' domains, which label the gate's series
    local.set_default_policy(deck.default_policy, deck.configured_policy)
    local.observe_routing(p.routing)
    samples = [
        sample
        for family in local.registry.collect()
        if family.name.startswith(("carddeck_shift", "carddeck_expected_accuracy", "carddeck_gate"))
        or family.name.endswith(("domain_distance", "default_policy"))
        for sample in family.samples
        if not sample.name.endswith("_created") and not np.isnan(sample.value)  # Ray exports no NaN
    ]
    want = {sample.name: sample.labels for sample in samples}
    # the request's gate series, and each routed card's one run of its rows (a batch of its own, no other traffic)
    moved = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples if s.name.startswith(GATE_SERIES)}
    for _, name, rows in routed_rows(p.routing.weights, p.routing.card_names):
        at = (("deployment", f"card-{name}"),)
        moved |= {("carddeck_batch_size_count", at): 1, ("carddeck_batch_size_sum", at): len(rows),
                  ("carddeck_queue_wait_seconds_count", at): 1,
                  ("carddeck_card_duration_seconds_count", (*at, ("card", name))): 1}  # fmt: skip
        for le in BATCH_BUCKETS:
            moved[("carddeck_batch_size_bucket", (*at, ("le", f"{float(le)}")))] = float(len(rows) <= le)
    # the card changes carddeck serve counts for: a card added again (already_present), a card whose version is
    # stored with other bytes and one that is not there removed (rejected), done by its snapshot holder on a copy
    store = DeckStore(ray_deck.root)
    g1 = store.read_model(next(e for e in store.manifest().active() if e.name == "g1"))
    other = card("g1", "gaussian", seed=5)  # g1/1 with other bytes
    shutil.copytree(ray_deck.root, tmp_path / "copy")
    held = Snapshots(tmp_path / "copy", poll_interval_s=0, reserved_names=("carddeck",), metrics=local)
    held.start()
    held.add_card(g1)
    with pytest.raises(DeckConflict):
        held.add_card(other)
    with pytest.raises(CardNotFound):
        held.remove_card("nope")
    held.close()
    changes = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in local.registry.collect()
               if f.name == "carddeck_card_changes" for s in f.samples if s.name.endswith("_total")}  # fmt: skip
    assert sorted(changes.values()) == [1, 1, 1], changes
    moved |= changes

    def load(name: str, model: bytes) -> int:
        doc = {"parameters": {"file:model.onnx": base64.b64encode(model).decode()}}
        return ray_deck.http(f"/v2/repository/models/{name}/load", doc, admin=True)[0]

    before = settled(ray_deck, GATE_SERIES + BATCH_SERIES + ("carddeck_card_changes",))
    ray_deck.infer(x)  # one tested batch
    assert load("g1", g1) == 200 and load("g1", other) == 409  # the same changes through the ingress
    assert ray_deck.http("/v2/repository/models/nope/unload", {}, admin=True)[0] == 404
    wait_for_moves(ray_deck, before, moved, 30)
    tested = {k: want["carddeck_shift_batches_total"][k] for k in ("model", "unit")}
    tested["state"] = next(
        s.labels["state"] for f in local.registry.collect() for s in f.samples
        if s.name == "carddeck_shift_batches_total" and s.value == 1
    )  # fmt: skip

    def exported() -> bool:
        series = ray_deck.ray_series()
        return set(want) <= set(series) and ray_deck.ray_value("carddeck_shift_batches_total", **tested) >= 1

    wait_for("the shift series in Ray's metrics export", exported, 30)
    series = ray_deck.ray_series()
    for name, labels in want.items():
        for got, _ in series[name]:
            assert set(got) - RAY_LABELS == set(labels), (name, got)
            assert got["application"] == "carddeck" and got["deployment"] in ("ingress", "reconciler"), (name, got)
    for name in ("carddeck_batch_size_count", "carddeck_queue_wait_seconds_count", "carddeck_queue_depth"):
        for got, _ in series[name]:  # the card deployments', with no label of the server's own
            assert set(got) - RAY_LABELS == set() and got["application"] == f"carddeck-{got['deployment']}", got
    live = live_replicas()  # (an earlier application's replicas may still be exported a while)
    assert sum(v for got, v in series["carddeck_queue_depth"] if got["replica"] in live) == 0  # nothing waits now
    me = ray_deck.state()["replica"]
    assert ray_deck.ray_value("carddeck_shift_detector_fitted", deployment="ingress", replica=me) == 1
    assert ray_deck.ray_value("carddeck_shift_refits_total", outcome="ok", deployment="reconciler") >= 1
    # every request the ingress answers, counted and timed as carddeck serve's transports do: OIP REST answered
    # and refused, carddeck.v1 through Ray's gRPC proxy answered and refused
    assert ray_deck.post("/v2/models/carddeck/infer", {"inputs": [{"name": "pixels", "datatype": "UINT8",
                                                                   "shape": [1], "data": [0]}]})[0] == 400  # fmt: skip
    grpc_calls(ray_deck, x)
    infer = {"service": "http", "rpc": "/v2/models/{model}/infer"}
    grpc_ = {"service": "carddeck.v1.CardDeck"}
    calls = {("http", "200"): dict(infer, code="200"), ("http", "400"): dict(infer, code="400"),
             ("grpc", "OK"): dict(grpc_, rpc="Predict", code="OK"),
             ("grpc", "UNAUTHENTICATED"): dict(grpc_, code="UNAUTHENTICATED")}  # fmt: skip
    wait_for(
        "the request series in Ray's metrics export",
        lambda: all(ray_deck.ray_value("carddeck_requests_total", **labels) >= 1 for labels in calls.values()),
        30,
    )
    assert ray_deck.ray_value("carddeck_request_duration_seconds_count", **infer) >= ray_deck.ray_value(
        "carddeck_requests_total", **calls["http", "200"]
    )
    assert ray_deck.ray_value("carddeck_requests_in_flight", replica=me, **infer) == 0

    # the shipped dashboard and alerts, unchanged, on what Ray exports (the ray_ prefix stripped)
    target = ray_deck.metrics_url.removeprefix("http://").removesuffix("/metrics")
    names = set(series) | {n.rsplit("_", 1)[0] for n in series if n.endswith(("_bucket", "_sum", "_count"))}
    with running_prometheus(prometheus_tools["prometheus"], target, tmp_path, config_file=RAY_PROMETHEUS_YML) as prom:
        prom.wait_for('carddeck_shift_batches_total{deployment="ingress"}')
        assert not prom.query('{__name__=~"ray_carddeck_.*"}')["data"]["result"]  # renamed, not copied
        panels = [(t, substitute(e)) for t, e in dashboard_exprs() if set(re.findall(r"carddeck_\w+", e)) <= names]
        for family in ("shift_batches", "expected_accuracy", "gate_weight", "gate_selections", "gate_images",
                       "domain_distance", "nearest_domain_distance", "batch_size", "queue_depth", "queue_wait_seconds",
                       "card_duration_seconds", "card_changes"):  # fmt: skip
            assert any(f"carddeck_{family}_" in e or f"carddeck_{family}{{" in e for _, e in panels), family
        for _, expr in panels:
            prom.wait_for(expr, timeout=30)  # rate() needs two scrapes
        for rule in alert_rules():
            if set(re.findall(r"carddeck_\w+", rule["expr"])) <= names:
                assert prom.query(rule["expr"])["status"] == "success", rule["alert"]


def test_ready_reports_the_store_and_statistics_count_what_the_ingress_served(ray_deck: LiveDeck) -> None:
    """The OIP health and statistics routes work on Ray as on ``carddeck serve`` (the transports' data plane
    Protocol): ready carries the store's state, through an outage and back; each model's statistics count the
    requests this ingress answered and failed."""

    def stats(model: str) -> dict[str, Any]:
        status, _, doc = ray_deck.http(f"/v2/models/{model}/stats")
        assert status == 200, doc
        (entry,) = doc["model_stats"]
        assert entry["name"] == model
        return entry

    def infer(model: str, x: np.ndarray, **parameters: Any) -> int:
        inputs = [{"name": "images", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}]
        return ray_deck.post(f"/v2/models/{model}/infer", {"inputs": inputs, "parameters": parameters})[0]

    def batches(entry: dict[str, Any], size: int) -> int:
        return sum(b["compute_infer"]["count"] for b in entry["batch_stats"] if b["batch_size"] == size)

    def store_line() -> str:
        status, headers, doc = ray_deck.http("/v2/health/ready")
        assert status == 200, doc  # ready while it serves, even from a stale snapshot
        return headers["carddeck-store"]

    status, _, doc = ray_deck.http("/v2/models/stats")
    assert status == 200, doc
    assert {s["name"] for s in doc["model_stats"]} == {"carddeck", "g1", "a1"}
    deck0, card0 = stats("carddeck"), stats("g1")
    x = noisy_images(3, seed=9)
    ray_deck.predict(x, "soft")  # through the handle
    assert infer("carddeck", x) == 200  # through HTTP
    assert infer("carddeck", x, policy="no-such-policy") == 400  # refused by the data plane: a failed request
    assert infer("g1", x[:2]) == 200  # a card as a model of its own
    deck1, card1 = stats("carddeck"), stats("g1")
    assert deck1["inference_count"] - deck0["inference_count"] == 6
    assert deck1["execution_count"] - deck0["execution_count"] == 2
    assert deck1["inference_stats"]["success"]["count"] - deck0["inference_stats"]["success"]["count"] == 2
    assert deck1["inference_stats"]["fail"]["count"] - deck0["inference_stats"]["fail"]["count"] == 1
    assert deck1["inference_stats"]["success"]["ns"] > deck0["inference_stats"]["success"]["ns"]
    assert deck1["last_inference"] >= time.time() * 1000 - 120_000
    assert batches(deck1, 3) - batches(deck0, 3) == 2
    assert card1["inference_count"] - card0["inference_count"] == 2  # run_card's, not the deck's card calls
    assert card1["inference_stats"]["success"]["count"] - card0["inference_stats"]["success"]["count"] == 1

    assert store_line() == "reachable"
    away = ray_deck.root.with_name(ray_deck.root.name + "-away")
    ray_deck.root.rename(away)  # the store is gone
    try:
        wait_for("ready to report the store unreachable", lambda: store_line().startswith("unreachable"), 60)
        assert "serving the snapshot last in sync at" in store_line()
        assert ray_deck.predict(x, "soft")["labels"].shape == (3,)  # still serving its last snapshot
    finally:
        away.rename(ray_deck.root)
    wait_for("ready to report the store reachable again", lambda: store_line() == "reachable", 60)


def test_a_popular_card_scales_from_1_to_2_replicas_and_back(ray_deck: LiveDeck) -> None:
    """Under load only the card the gate picks scales up, and back down after. Meanwhile the ingress exports the
    images it works on (``carddeck_images_in_flight``, as carddeck serve): several requests' images at once, and
    none once they are answered (kills a gauge not exported, counted per request, or never given back)."""
    wait_for(
        "cards at 1 replica", lambda: all(replicas(f"card-{c}", f"carddeck-card-{c}") == 1 for c in ("g1", "a1")), 60
    )
    x = noisy_images(9, seed=4)  # the gate sends noise to g1 only (nearest-domain)
    me = ray_deck.state()["replica"]
    seen: list[float] = []

    def in_flight() -> float:
        return ray_deck.ray_value("carddeck_images_in_flight", deployment="ingress", replica=me)

    def several() -> bool:  # a multiple of the request's images, more than 16 requests could count as
        seen.append(in_flight())
        return seen[-1] > 16 and seen[-1] % len(x) == 0

    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            ray_deck.predict(x, "nearest-domain")

    with ThreadPoolExecutor(16) as pool:
        clients = [pool.submit(client) for _ in range(16)]
        try:
            # 180 s: Ray's autoscaler on a loaded 2-core machine once took over 90 s (session 12's CI, 38 s alone)
            up = wait_for("card g1 at 2 replicas", lambda: replicas("card-g1", "carddeck-card-g1") == 2, 180)
            assert replicas("card-a1", "carddeck-card-a1") == 1  # the unpopular card stays at its minimum
            wait_for(f"several requests' images in flight in Ray's metrics (seen {seen[-8:]})", several, 30)
        finally:
            stop.set()
        for c in clients:
            c.result()
    wait_for("no image in flight in Ray's metrics", lambda: in_flight() == 0, 30)
    down = wait_for("card g1 back at 1 replica", lambda: replicas("card-g1", "carddeck-card-g1") == 1, 90)
    print(f"scaled up after {up:.1f} s of load, down {down:.1f} s after it stopped")


def test_a_killed_card_replica_fails_no_request_silently_and_is_replaced(ray_deck: LiveDeck) -> None:
    import ray

    from carddeck.integrations.ray_serve import CardUnavailable

    (victim,) = replica_ids("card-a1", "carddeck-card-a1")
    before = ray_deck.counts()
    # the gate sends smooth blobs to a1; large requests (12 MiB) keep the replica busy when it is killed
    x = np.repeat(smooth_images(8, seed=5), 128, axis=0)
    ok, unavailable = 0, 0
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        nonlocal ok, unavailable
        while not stop.is_set():
            try:
                ray_deck.predict(x, "nearest-domain")
                with lock:
                    ok += 1
            except CardUnavailable as exc:  # the only failure allowed: clear, and counted by the ingress
                assert "retry" in str(exc)
                with lock:
                    unavailable += 1

    with ThreadPoolExecutor(16) as pool:
        clients = [pool.submit(client) for _ in range(16)]
        wait_for("card calls in flight", lambda: ray_deck.counts()["in_flight"] >= 4, 30, every_s=0.02)
        with lock:
            ok_at_kill = ok
        ray.kill(ray.get_actor(f"SERVE_REPLICA::carddeck-card-a1#card-a1#{victim}", namespace="serve"), no_restart=True)
        wait_for(
            "a replacement replica",
            lambda: (
                any(a != victim for a in replica_ids("card-a1", "carddeck-card-a1"))
                and replicas("card-a1", "carddeck-card-a1") >= 1
            ),
            60,
        )
        time.sleep(1)
        stop.set()
        for c in clients:
            c.result()  # no other exception type escaped
    after = ray_deck.counts()
    retried = after["retried"] - before["retried"]
    counted_unavailable = after["unavailable"] - before["unavailable"]
    print(f"killed replica: {ok} answered, {retried} retried, {unavailable} UNAVAILABLE")
    assert counted_unavailable == unavailable  # every UNAVAILABLE a client saw was counted
    # the >= 4 card calls in flight at the kill ended: answered (retried by Ray Serve's router or by the
    # ingress, which counts its own retries) or UNAVAILABLE; none hung, none failed another way
    assert ok - ok_at_kill + unavailable >= 4
    out = ray_deck.predict(x, "nearest-domain")  # served again by the new replica
    assert out["labels"].shape == (len(x),)  # (the load may have scaled a1 up: the scaling test waits for 1)


def test_a_card_added_to_and_removed_from_a_local_directory_deck_serves_and_is_refitted_for(
    ray_deck: LiveDeck,
) -> None:
    """AddCard and RemoveCard (OIP repository load and unload through Ray's proxy) on a local-directory deck: the
    card gets its application and is served, the reconciler refits the detector for the new cards and stores it
    in the directory, and the answers carry that detector's verdict; once removed, the card is no longer served,
    its application goes and the deck is refitted for again; the ingress counts both changes in
    ``carddeck_card_changes_total`` (outcome ok). Kills: a local store the ingress or the reconciler does not
    follow, no refit stored in a directory, a removed card's application left running, changes not counted."""
    live = ray_deck
    wait_for_refit(live)
    me = live.state()["replica"]
    count0 = {op: live.ray_value("carddeck_card_changes_total", op=op, outcome="ok", replica=me)
              for op in ("add", "remove")}  # fmt: skip
    x = np.concatenate([noisy_images(8, seed=13), smooth_images(8, seed=14)])
    model = base64.b64encode(card("g2", "gaussian", seed=7)).decode()
    status, _, doc = live.http("/v2/repository/models/g2/load", {"parameters": {"file:model.onnx": model}}, admin=True)
    assert status == 200, doc
    took = wait_for("card g2 served", lambda: "g2" in live.state()["cards"], 60)
    refitted = wait_for_refit(live)
    out, ref = live.predict(x), Deck.open(live.root).predict(x)
    assert "g2" in out["card_names"] and out["version"] == refitted
    np.testing.assert_allclose(out["probabilities"], ref.probabilities, rtol=1e-6, atol=1e-7)
    _, want = in_process_verdict(live.root, x)  # the refitted detector's, read from the directory
    assert want.state != "unknown"
    assert_same_verdict(out["verdict"], want)

    status, _, doc = live.http("/v2/repository/models/g2/unload", {}, admin=True)
    assert status == 200, doc
    wait_for("card g2 no longer served", lambda: "g2" not in live.state()["cards"], 60)
    final = wait_for_refit(live)
    assert final > refitted and sorted(live.state()["cards"]) == ["a1", "g1"]  # as it was found
    assert "g2" not in live.predict(x, "soft")["card_names"]
    wait_for("card g2's application deleted", lambda: replicas("card-g2", "carddeck-card-g2") == 0, 60)
    wait_for(
        "both changes counted in Ray's metrics",
        lambda: all(live.ray_value("carddeck_card_changes_total", op=op, outcome="ok", replica=me) == n + 1
                    for op, n in count0.items()),
        30,
    )  # fmt: skip
    print(f"local deck: card added -> served in {took:.1f} s, refitted at version {refitted}, removed at {final}")


def test_the_serve_config_file_builds_the_application_and_bad_args_are_named() -> None:
    import yaml

    from carddeck.errors import InvalidInput
    from carddeck.integrations.ray_serve import app_builder

    (app,) = yaml.safe_load((ROOT / "serve" / "ray" / "carddeck.yaml").read_text())["applications"]
    assert app["import_path"] == "carddeck.integrations.ray_serve:app_builder"
    assert app_builder(app["args"]) is not None
    with pytest.raises(InvalidInput, match="unknown replicas; accepted: .*deck"):
        app_builder({"deck": "models", "replicas": 3})


def test_image_limits_reach_the_ingress_and_limits_that_do_not_fit_are_refused_before_a_cluster_starts(
    tmp_path: Path,
) -> None:
    """``max_inflight_images`` bounds each ingress replica as ``--max-inflight-images`` bounds carddeck serve
    (kills a config field not passed to the replica's settings); limits that contradict each other are named
    by the config file's builder and by ``carddeck ray-serve`` before any cluster starts."""
    import subprocess
    import sys

    from carddeck.errors import InvalidInput, NotReady, Overloaded
    from carddeck.integrations.ray_plane import RayDataplane
    from carddeck.integrations.ray_serve import RayDeckConfig, app_builder

    deck = make_deck(tmp_path / "deck")
    plane = RayDataplane(RayDeckConfig(deck=str(deck), max_request_images=4, max_inflight_images=6), None)  # type: ignore[arg-type]
    try:
        x = smooth_images(4, seed=1)
        with pytest.raises(NotReady):  # within the budget: on to the deck (not deployed here)
            plane.predict(x)
        with plane.budget.hold(3), pytest.raises(Overloaded, match="at most 6 at once"):
            plane.predict(x)  # 3 + 4 images do not fit
        assert plane.budget.used == 0
    finally:
        plane.close()
    with pytest.raises(InvalidInput, match="max_inflight_images.*at least max_request_images"):
        app_builder({"deck": str(deck), "max_request_images": 40, "max_inflight_images": 8})
    cli = subprocess.run(
        [sys.executable, "-m", "carddeck", "ray-serve", "--deck", str(deck), "--max-request-images", "40",
         "--max-inflight-images", "8"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode != 0 and "max_inflight_images" in cli.stderr, cli.stderr[-2000:]
    assert "Traceback" not in cli.stderr and "Started a local Ray instance" not in cli.stderr


# -- the S3 group: `carddeck ray-serve --ingress-replicas 2` on an S3 deck -----------------------------------------
@pytest.fixture(scope="class")
def s3_ray_deck(ray_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDeck]:
    """The application on an S3 deck (moto's server) that stores calibration images and no shift detector,
    with two ingress replicas (the deck several replicas share, as users scale the ingress), run as users run
    it: the ``carddeck ray-serve`` command, here joining the module's cluster (``--address``), the admin token
    from the environment. It replaces the local deck's application while its class runs."""
    import os
    import signal
    import subprocess
    import sys
    import uuid

    import boto3
    from ray import serve

    from carddeck.integrations.ray_serve import APP

    bucket = f"ray-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)  # this process reaches moto as the replicas do (ray_cluster)
    location = f"s3://{bucket}/decks/ray"
    store = DeckStore.create(location)
    store.add_card(card("g1", "gaussian", seed=1))
    store.add_card(card("a1", "augmix", seed=2))
    store.set_calibration(smooth_images(32, seed=99))  # enough for the `unknown` of a refit to be seen

    def start() -> tuple[LiveDeck, Any]:
        log_path = tmp_path_factory.mktemp("ray-serve-cli") / "carddeck-ray-serve.log"
        command = [sys.executable, "-m", "carddeck", "ray-serve", "--address", ray_cluster.address,
                   "--deck", location, "--ingress-replicas", "2", "--http-port", str(ray_cluster.http_port),
                   "--poll-interval-s", "0.5", "--drain-s", "3", "--card-num-cpus", "0.25"]  # fmt: skip
        with log_path.open("wb") as out:
            cli = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN})  # fmt: skip

        def stop() -> None:  # as a user stops it: SIGTERM, and the command deletes its applications
            cli.send_signal(signal.SIGTERM)
            assert cli.wait(timeout=120) == 0, log_path.read_text()[-3000:]

        def deployed() -> bool:
            assert cli.poll() is None, log_path.read_text()[-3000:]
            return "Ray Serve: deck " in log_path.read_text()  # its deploy() returned: the deck serves

        try:
            wait_for("carddeck ray-serve serving the S3 deck", deployed, 180)
            c = ray_cluster
            live = LiveDeck(location, serve.get_app_handle(APP), c.http_port, c.grpc_port, c.metrics_url)  # type: ignore[arg-type]
            wait_for("two ingress replicas serving", lambda: len(ingress_states(live)) == 2, 60)
        except BaseException:
            stop()
            raise
        return live, stop

    yield ray_cluster.serving("s3", start)
    ray_cluster.release()


def answers_of_every_replica(live: LiveDeck, x: np.ndarray) -> dict[str, dict[str, Any]]:
    """An answer to ``x`` from each running ingress replica (Ray picks one per request: asked until all have)."""
    want, answers = replicas("ingress", "carddeck"), {}
    for _ in range(100):
        out = live.predict(x)
        answers.setdefault(out["replica"], out)
        if len(answers) >= want:
            break
    return answers


class TestTwoIngressReplicasOnAnS3Deck:
    """Run by `carddeck ray-serve --ingress-replicas 2` on a shared S3 deck."""

    def test_an_s3_deck_serves_the_shift_signal_through_ray_serve(self, s3_ray_deck: LiveDeck) -> None:
        """The reconciler reads the S3 deck's cards and calibration images through the store, refits the detector
        and stores it in S3; every ingress replica loads it from there: answers carry the verdict the in-process
        monitor gives with that detector, whichever replica answers. Kills a loader that builds a local path from
        the s3:// location, and a refit kept out of the store."""
        live = s3_ray_deck
        version = wait_for_refit(live)
        x = np.concatenate([noisy_images(8, seed=6), smooth_images(8, seed=7)])
        local_version, want = in_process_verdict(live.root, x)
        assert local_version == version and want.state != "unknown"
        served, got = live.infer(x)
        assert served == str(version)
        assert got["shift_state"] == want.state and got["shift_scope"] == "batch"
        assert got["out_of_scope_images"] == ",".join(str(i) for i in np.flatnonzero(~want.in_scope))
        answers = answers_of_every_replica(live, x)
        assert len(answers) == 2
        for out in answers.values():
            assert out["version"] == version
            assert_same_verdict(out["verdict"], want)
        log = replica_log("reconciler", live=True)
        assert f"refitted shift detector stored as deck version {version}" in log, log[-3000:]

    def test_a_card_added_through_one_of_two_ingress_replicas_is_judged_by_the_refit_on_both(
        self, s3_ray_deck: LiveDeck
    ) -> None:
        """AddCard (the OIP repository load, through Ray's proxy, taken by one ingress replica) on the shared deck
        of two: the card serves on both within 30 s, with the state `unknown` (never the old cards' detector, never
        silently off) until the reconciler has refitted a detector for the new cards and stored it; then both
        replicas answer with that detector's verdict, at the same deck version, and say so in their own exported
        series; the refit is counted in Ray's metrics. Removing the card fails no request either, and is refitted
        for too, and the replicas agree on the deck version again. Kills: no refit after a change, a refit that is
        not stored, an ingress replica that keeps the old detector or never loads the new one, a replica left on
        an older deck version."""
        live = s3_ray_deck
        x = np.concatenate([noisy_images(8, seed=3), smooth_images(8, seed=4)])  # a tested batch
        answers: list[dict[str, Any]] = []  # the verdict and the replica of each, in order (Ray picks the replica)
        failures: list[BaseException] = []
        stop = threading.Event()

        def traffic() -> None:  # requests all through the change; none may fail
            while not stop.is_set():
                try:
                    answers.append(live.predict(x))
                except BaseException as exc:
                    failures.append(exc)

        wait_for_refit(live)  # the deploy's own refit is over, and counted, before the change
        (reconciler,) = replica_ids("reconciler", "carddeck")  # (the replaced application's may still be exported)
        wait_for(
            "the deploy's refit counted in Ray's metrics",
            lambda: live.ray_value("carddeck_shift_refits_total", outcome="ok", replica=reconciler) >= 1,
            30,
        )
        refits = live.ray_value("carddeck_shift_refits_total", outcome="ok", replica=reconciler)
        client = threading.Thread(target=traffic)
        client.start()
        try:
            model = base64.b64encode(card("g2", "gaussian", seed=7)).decode()
            status, _, doc = live.http("/v2/repository/models/g2/load", {"parameters": {"file:model.onnx": model}},
                                       admin=True)  # fmt: skip
            assert status == 200, doc
            took = wait_for(
                "card g2 served by both ingress replicas",
                lambda: all("g2" in s["cards"] for s in ingress_states(live).values()),
                30,
            )
            refitted = wait_for_refit(live)
            both = set(ingress_states(live))
            wait_for(
                "answers of both replicas from the refitted deck",
                lambda: {a["replica"] for a in list(answers) if a["version"] >= refitted} == both,
                30,
            )
            _, want = in_process_verdict(live.root, x)  # the refitted detector's
            added = [a for a in list(answers) if "g2" in a["card_names"]]
            assert any(a["verdict"].state == "unknown" for a in added)  # the refit's wait was served `unknown`
            for replica in both:
                # in the order they came: unknown until judged, then judged for good, by the refitted detector (a
                # request of the added deck version may be judged by it, loaded while it ran: same cards); a replica
                # that polled only after the refit was stored may never have said `unknown`
                mine = [a for a in added if a["replica"] == replica]
                judged = next((i for i, a in enumerate(mine) if a["verdict"].state != "unknown"), len(mine))
                assert all(a["verdict"].state != "unknown" for a in mine[judged:]), [a["verdict"].state for a in mine]
                for a in mine[judged:]:
                    assert_same_verdict(a["verdict"], want)
                assert all(a["verdict"].state != "unknown" for a in mine if a["version"] >= refitted)
            assert "state unknown until" in replica_log("ingress", live=True)
            log = replica_log("reconciler", live=True)
            assert "refitting the shift detector from the deck's calibration images" in log, log[-3000:]
            assert f"refitted shift detector stored as deck version {refitted}" in log, log[-3000:]
            out = live.predict(x, "soft")
            ref = Deck.open(live.root).predict(x, policy="soft")
            assert "g2" in out["card_names"]
            np.testing.assert_allclose(out["probabilities"], ref.probabilities, rtol=1e-6, atol=1e-7)
            print(f"card added -> served by both ingress replicas in {took:.1f} s, refitted at deck version {refitted}")

            status, _, doc = live.http("/v2/repository/models/g2/unload", {}, admin=True)
            assert status == 200, doc
            wait_for(
                "card g2 dropped by both ingress replicas",
                lambda: all("g2" not in s["cards"] for s in ingress_states(live).values()),
                30,
            )
            final = wait_for_refit(live)  # a detector for the cards left, on both replicas
            assert {s["version"] for s in ingress_states(live).values()} == {final}
            wait_for("card g2's application deleted", lambda: replicas("card-g2", "carddeck-card-g2") == 0, 60)
            # each replica's own series say so too, through Ray's export (their `replica` label is the one its answers
            # carry), and both refits are counted
            for replica in both:
                wait_for(
                    f"replica {replica}'s deck version and detector in Ray's metrics",
                    lambda r=replica: (
                        live.ray_value("carddeck_deck_version", deployment="ingress", replica=r) == final
                        and live.ray_value("carddeck_shift_detector_fitted", deployment="ingress", replica=r) == 1
                    ),
                    30,
                )
            wait_for(
                "both refits counted in Ray's metrics",
                lambda: live.ray_value("carddeck_shift_refits_total", outcome="ok", replica=reconciler) == refits + 2,
                30,
            )
        finally:
            stop.set()
            client.join()
        assert not failures, failures[:3]

    def test_each_ingress_replica_judges_small_requests_over_a_window_of_its_own(self, s3_ray_deck: LiveDeck) -> None:
        """Requests under 16 images are judged over a window of the last 32 images *their* ingress replica
        served (carddeck serve's --shift-window), so with two replicas the first window verdict comes after about
        twice as many small requests (README, --ingress-replicas help). Each replica says `unknown` ("none") to its
        first 31 one-image requests and judges its 32nd on its window, and every one after. Kills: windows not
        fed on Ray, or of another size than the settings', or a replica that never reports its window's state."""
        from carddeck.serving.settings import Settings

        live, window = s3_ray_deck, Settings().shift_window
        wait_for_refit(live)
        want = replicas("ingress", "carddeck")
        mine: dict[str, list[str]] = {}  # each replica's answers' verdict scope, in order
        judged: dict[str, int] = {}  # the request (of all) that filled each replica's window
        total = 0
        while len(mine) < want or min(len(m) for m in mine.values()) < window + 2:
            out = live.predict(smooth_images(1, seed=total))
            scopes = mine.setdefault(out["replica"], [])
            scopes.append(out["verdict"].scope)
            total += 1
            if len(scopes) == window:
                judged[out["replica"]] = total
            assert total < 50 * window, {r: len(m) for r, m in mine.items()}
        for replica, scopes in mine.items():
            assert scopes[: window - 1] == ["none"] * (window - 1), (replica, scopes)
            assert set(scopes[window - 1 :]) == {"window"}, (replica, scopes)
        print(f"{want} ingress replicas, one-image requests: windows judged from requests {sorted(judged.values())}")
