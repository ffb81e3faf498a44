"""The Helm chart renders with the real Helm engine (helm-python-sdk: Helm v4, offline),
lints clean in strict mode, every object it renders is valid for Kubernetes (strict
schemas: unknown fields fail) and the RayCluster for KubeRay's CRD, the committed golden
files are a fresh render, and a wrong value fails before anything is rendered."""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator

from lmfleet.cluster.autoscaler import AutoscalingConfig
from lmfleet.cluster.fleet_config import MODEL_LEVEL_OPTIONS, ControllerConfig
from lmfleet.worker.options import engine_options
from tests.deploy import helm_render
from tests.deploy.chart_fixtures import EXAMPLES, example_objects, rendered_example

CRD = Path(__file__).parent / "schemas" / "kuberay" / "ray.io_rayclusters.yaml"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.25.0", "1.37.0")
# Custom resources: validated against their CRD below (RayCluster) or in test_chart_objects
# (the Prometheus Operator's, whose CRDs are not vendored here).
CUSTOM_KINDS = {"RayCluster", "ServiceMonitor", "PodMonitor"}


def test_the_matrix_covers_the_cases_the_chart_must_handle():
    assert set(EXAMPLES) >= {"gpu-default", "cpu-only", "external-redis", "existing-secret",
                             "two-models-tp2", "kuberay-off", "cpu-standalone"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_lint_is_clean_in_strict_mode(name):
    for kube_version in KUBE_VERSIONS:
        report = helm_python.lint(str(helm_render.CHART_DIR), helm_render.example_values(name),
                                  strict=True, namespace=helm_render.NAMESPACE,
                                  kube_version=f"v{kube_version}")
        assert report["errors"] == [], report
        # Severity 2 = warning, 3 = error; 1 (info) is only "icon is recommended".
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("name", EXAMPLES)
def test_golden_file_is_a_fresh_render(name):
    golden = helm_render.golden_path(name)
    assert golden.exists(), f"{golden} is missing: run `make helm-golden`"
    assert golden.read_text() == helm_render.manifest(rendered_example(name)), (
        f"{golden.name} is stale: run `make helm-golden` and review the diff")


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_object_is_valid_for_kubernetes(name):
    objects = example_objects(name)
    assert objects
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: "
                            f"{error.message} at {list(error.path)}")


def _strict(schema: Any) -> Any:
    """The CRD schema as the API server applies it with strict field validation: an
    object with declared properties and no other escape hatch rejects unknown fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (schema.get("type") == "object" and "properties" in schema
                and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def raycluster_validator() -> Draft202012Validator:
    crd = yaml.safe_load(CRD.read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return Draft202012Validator(_strict(v1["schema"]["openAPIV3Schema"]))


@pytest.mark.parametrize("name", [n for n in EXAMPLES if "kuberay-off" not in n
                                  and "standalone" not in n])
def test_the_raycluster_is_valid_for_the_kuberay_crd(name):
    [cluster] = [o for o in example_objects(name) if o["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    errors = sorted(raycluster_validator().iter_errors(cluster), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def test_the_strict_crd_check_catches_a_misspelt_field():
    cluster = next(o for o in example_objects("gpu-default") if o["kind"] == "RayCluster")
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert list(raycluster_validator().iter_errors(broken))


def test_the_schema_knows_exactly_the_options_lmfleet_accepts():
    """values.schema.json restates the engine options (worker/options.py), the autoscaler's
    and the controller's fields (so `helm install` refuses what the controller would); it
    must follow the code."""
    schema = helm_render.chart().schema
    model = schema["properties"]["models"]["items"]["properties"]
    engine = model["engine"]["properties"]
    options = {o.key: o for o in engine_options() if o.key not in MODEL_LEVEL_OPTIONS}
    assert set(engine) == set(options)
    for name, option in options.items():
        if option.choices is not None:
            assert engine[name]["enum"] == list(option.choices), name
        expected = {"bool": "boolean", "int": "integer", "float": "number", "str": "string",
                    "toggle": "string"}.get(option.kind)
        if expected is not None:
            assert engine[name]["type"] == expected, name
        if option.kind == "toggle":
            assert engine[name]["enum"] == ["auto", "on", "off"], name
    scaling = {f.name for f in dataclasses.fields(AutoscalingConfig)} - {"min_replicas",
                                                                         "max_replicas"}
    assert set(model["autoscaling"]["properties"]) == scaling
    controller = schema["properties"]["fleet"]["properties"]["controller"]["properties"]
    assert set(controller["config"]["properties"]) == {
        f.name for f in dataclasses.fields(ControllerConfig)}


MODEL = {"name": "m", "path": "default", "minReplicas": 1, "maxReplicas": 2}
BAD_VALUES = {
    "unknown top-level key": ({"routers": {"replicas": 3}}, "routers"),
    "misspelt router key": ({"router": {"replica": 3}}, "replica"),
    "replicas as a string": ({"router": {"replicas": "two"}}, "replicas"),
    "no models": ({"models": []}, "models"),
    "tp of zero": ({"models": [dict(MODEL, tp=0)]}, "tp"),
    "replicas with min/max": ({"models": [dict(MODEL, replicas=2)]}, "models"),
    "a relative model path": ({"models": [dict(MODEL, path="models/llama")]}, "path"),
    "a .gguf model path": ({"models": [dict(MODEL, path="/models/llama.gguf")]}, "path"),
    "unknown engine option": ({"models": [dict(MODEL, engine={"max_num_seq": 8})]},
                              "max_num_seq"),
    "engine choice out of range": ({"models": [dict(MODEL, engine={"dtype": "fp8"})]},
                                   "dtype"),
    "YAML `on` read as a boolean": ({"models": [dict(MODEL,
                                                     engine={"cpu_kernels": True})]},
                                    "cpu_kernels"),
    "unknown scheduler": ({"models": [dict(MODEL, scheduler="sjf")]}, "scheduler"),
    "both API key sources": ({"apiKey": {"value": "k", "existingSecret": "s"}}, "apiKey"),
    "no Redis at all": ({"redis": {"enabled": False}}, "url"),
    "password in the Redis URL": ({"redis": {"enabled": False},
                                   "externalRedis": {"url": "redis://:pw@redis:6379"}},
                                  "url"),
    "unknown storage type": ({"modelStorage": {"type": "s3"}}, "type"),
    "unknown autoscaler mode": ({"fleet": {"kuberay": {"autoscalerOptions": {
        "upscalingMode": "Fast"}}}}, "upscalingMode"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_a_wrong_value_fails_on_the_schema(case):
    values, where = BAD_VALUES[case]
    with pytest.raises(helm_python.HelmValuesError) as raised:
        helm_render.render(values)
    assert where in str(raised.value)
    report = helm_python.lint(str(helm_render.CHART_DIR), values, strict=True)
    assert report["errors"], report


FAILS = {
    "min above max": ({"models": [dict(MODEL, minReplicas=3, maxReplicas=2)]},
                      "minReplicas 3 > maxReplicas 2"),
    "standalone fleet too big for a node": (
        {"fleet": {"kuberay": {"enabled": False}},
         "models": [dict(MODEL, maxReplicas=5, tp=2)]}, "10 GPUs"),
    "pvc without a claim": ({"modelStorage": {"type": "pvc"}}, "claimName"),
}


@pytest.mark.parametrize("case", sorted(FAILS))
def test_inconsistent_values_fail_with_a_message(case):
    values, message = FAILS[case]
    with pytest.raises(helm_python.HelmRenderError) as raised:
        helm_render.render(values)
    assert message in str(raised.value)


def test_notes_say_how_to_reach_the_endpoint():
    notes = rendered_example("gpu-default")[helm_render.NOTES]
    assert "port-forward svc/lmfleet-router 8000:80" in notes
    assert "/v1/chat/completions" in notes and "WARNING: no API key" in notes
    notes = rendered_example("existing-secret")[helm_render.NOTES]
    assert "https://llm.example.com/v1" in notes
    assert "get secret lmfleet-api-keys" in notes and "WARNING" not in notes
