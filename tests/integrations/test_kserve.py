"""serve/kserve/ validated offline: core kinds against the Kubernetes schemas (kubernetes-validate), the
KServe kinds loaded strictly into the KServe SDK's generated models, the autoscaling PromQL on a real
Prometheus scraping a live ``carddeck serve``.

The KServe SDK's package ``__init__`` starts its model-server stack (pandas, fastapi, the kubernetes
client...); only its generated API models are needed here, so ``kserve`` is installed without its
dependencies and the models are imported without running that ``__init__`` (:func:`kserve_models`).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "serve" / "kserve"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests target (grpc probes are GA since 1.27)


def docs() -> dict[str, dict[str, Any]]:
    """Every manifest by kind."""
    out = {}
    for path in sorted(KSERVE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            out[doc["kind"]] = doc
    return out


def kserve_models() -> types.ModuleType:
    """``kserve.models`` without ``kserve/__init__.py`` (see the module docstring)."""
    spec = importlib.util.find_spec("kserve")
    if spec is None or spec.submodule_search_locations is None:
        pytest.fail("the KServe SDK is not installed: pip install --no-deps 'kserve>=0.15'")
    saved = {k: v for k, v in sys.modules.items() if k == "kserve" or k.startswith("kserve.")}
    package = types.ModuleType("kserve")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["kserve"] = package
    try:
        return importlib.import_module("kserve.models")
    finally:
        for name in [k for k in sys.modules if k == "kserve" or k.startswith("kserve.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def load_strictly(models: types.ModuleType, klass: str, data: Any, where: str) -> Any:
    """``data`` as an instance of the generated model ``klass``: every field must be one the model
    declares, with a value of its declared type. Kubernetes core types (V1Container, V1ObjectMeta...)
    are checked by kubernetes-validate instead and are returned as they are."""
    if klass.startswith("list["):
        assert isinstance(data, list), f"{where}: expected a list, got {data!r}"
        return [load_strictly(models, klass[5:-1], v, f"{where}[{i}]") for i, v in enumerate(data)]
    if klass.startswith("dict("):
        assert isinstance(data, dict), f"{where}: expected a mapping, got {data!r}"
        value_type = re.match(r"dict\(([^,]*), (.*)\)", klass).group(2)  # type: ignore[union-attr]
        return {k: load_strictly(models, value_type, v, f"{where}.{k}") for k, v in data.items()}
    native = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if klass in native:
        assert isinstance(data, native[klass]), f"{where}: expected {klass}, got {data!r}"
        return data
    model = getattr(models, klass, None)
    if model is None:  # a Kubernetes core type
        assert klass.startswith("V1"), f"{where}: unknown type {klass}"
        return data
    assert isinstance(data, dict), f"{where}: expected a {klass} object, got {data!r}"
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    assert not unknown, f"{where}: {klass} has no field {unknown}; fields: {sorted(by_json)}"
    kwargs = {
        by_json[k]: load_strictly(models, model.openapi_types[by_json[k]], v, f"{where}.{k}") for k, v in data.items()
    }
    return model(**kwargs)  # the generated setters check required fields and enums


def test_core_kinds_match_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    manifests = docs()
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"):
        kubernetes_validate.validate(manifests[kind], K8S_VERSION, strict=True)
    # the runtime's containers (probes, ports, resources) are core Pod content: validated as a Pod
    runtime = manifests["ServingRuntime"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "carddeck-predictor"},
        "spec": {"containers": runtime["spec"]["containers"]},
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    # and a broken one is refused, so the validation above means something
    broken = {**pod, "spec": {"containers": [{**runtime["spec"]["containers"][0], "readinessProbe": {"grpc": {}}}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.kserve
def test_kserve_kinds_load_into_the_sdk_models() -> None:
    models = kserve_models()
    manifests = docs()
    runtime = load_strictly(models, "V1alpha1ServingRuntime", manifests["ServingRuntime"], "ServingRuntime")
    isvc = load_strictly(models, "V1beta1InferenceService", manifests["InferenceService"], "InferenceService")
    assert set(runtime.spec.protocol_versions) == {"v2", "grpc-v2"}
    (container,) = runtime.spec.containers
    assert {p["containerPort"] for p in container["ports"]} >= {8000, 8001}
    assert container["readinessProbe"]["grpc"]["port"] == 8001 and container["livenessProbe"]["grpc"]["port"] == 8001
    assert "--deck=/mnt/models" in container["args"]  # where KServe's storage initializer puts storageUri
    model = isvc.spec.predictor.model
    assert model.runtime == runtime.metadata["name"] and model.storage_uri.startswith("s3://")
    assert model.model_format.name in {f.name for f in runtime.spec.supported_model_formats}
    # the HPA scales the Deployment KServe creates for this InferenceService, and the PDB selects its pods
    assert (
        manifests["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == f"{isvc.metadata['name']}-predictor"
    )
    selector = manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert selector == {"serving.kserve.io/inferenceservice": isvc.metadata["name"]}
    with pytest.raises(AssertionError, match="has no field"):  # a misspelt field is caught
        load_strictly(models, "V1beta1InferenceService", {"spec": {"predictor": {"modle": {}}}}, "isvc")


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(docs()["ConfigMap"]["data"]["config.yaml"])["rules"]


def test_every_hpa_metric_has_an_adapter_rule() -> None:
    served = set()
    for rule in adapter_rules():
        series = rule["seriesQuery"].split("{")[0]
        served.add(rule["name"].get("as", series))
    for metric in docs()["HorizontalPodAutoscaler"]["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in served


@pytest.mark.integration
def test_every_autoscaling_promql_answers_on_a_real_prometheus(tmp_path: Path, prometheus_tools) -> None:
    from tests.observability.promql import running_prometheus
    from tests.observability.test_live_server import start, stop

    prometheus = prometheus_tools["prometheus"]
    server = start(tmp_path)
    try:
        with server.client() as client:
            client.predict(server.clean)  # requests_total, in-flight and queue series exist from here on
        labels = {"namespace": "carddeck", "pod": "carddeck-predictor-0"}  # what Kubernetes discovery adds
        with running_prometheus(prometheus, f"127.0.0.1:{server.metrics_port}", tmp_path, labels=labels) as prom:
            for rule in adapter_rules():
                assert prom.wait_for(rule["seriesQuery"]), rule["seriesQuery"]
                series = rule["seriesQuery"].split("{")[0]
                query = (
                    rule["metricsQuery"]
                    .replace("<<.Series>>", series)
                    .replace("<<.LabelMatchers>>", 'namespace="carddeck",pod=~"carddeck-predictor-.*"')
                    .replace("<<.GroupBy>>", "pod")
                )
                (result,) = prom.wait_for(query)
                assert result["metric"] == {"pod": "carddeck-predictor-0"}, (query, result)
    finally:
        stop(server)
