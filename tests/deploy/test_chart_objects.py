"""What matters in the rendered objects: GPUs = tp x pp per replica's pod, the autoscaler's
bounds, probes, secrets passed by reference only, selectors that match their pods, a fleet
YAML the controller's own loader accepts, and container commands that lmfleet's own
argument parser accepts (a misspelt flag would crash-loop the pod)."""

from __future__ import annotations

import base64
import json
import shlex
from typing import Any

import pytest
import yaml

from lmfleet.cli.main import build_parser
from lmfleet.cluster import fleet_config
from lmfleet.worker.options import check_options
from tests.deploy import helm_render
from tests.deploy.chart_fixtures import EXAMPLES, example_objects, find, find_all

KUBERAY = [n for n in EXAMPLES if "kuberay-off" not in n and "standalone" not in n]
STANDALONE = [n for n in EXAMPLES if n not in KUBERAY]


def values(name: str) -> dict[str, Any]:
    merged = helm_render.chart().merge_values(helm_render.example_values(name))
    return merged


def pod_templates(objects) -> list[tuple[str, dict]]:
    """(owner name, pod template) of every workload, RayCluster groups included."""
    out = []
    for obj in objects:
        if obj["kind"] == "Deployment":
            out.append((obj["metadata"]["name"], obj["spec"]["template"]))
        elif obj["kind"] == "RayCluster":
            out.append(("head", obj["spec"]["headGroupSpec"]["template"]))
            out += [(g["groupName"], g["template"]) for g in obj["spec"]["workerGroupSpecs"]]
    return out


def head_argv(cluster: dict) -> list[str]:
    """The `lmfleet controller ...` line the KubeRay head's shell script execs."""
    [container] = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/bash", "-c", "--"]
    [script] = container["args"]
    [line] = [ln for ln in script.splitlines() if ln.strip().startswith("exec lmfleet ")]
    return shlex.split(line.strip())[1:]


def controller_argv(objects) -> list[str]:
    clusters = find_all(objects, "RayCluster")
    if clusters:
        return head_argv(clusters[0])
    container = find(objects, "Deployment", "-controller")["spec"]["template"]["spec"][
        "containers"][0]
    return container["command"] + container["args"]


def router_container(objects) -> dict:
    return find(objects, "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", KUBERAY)
def test_each_model_gets_a_worker_group_of_tp_x_pp_gpus_within_its_bounds(name):
    v = values(name)
    cluster = find(example_objects(name), "RayCluster")
    groups = cluster["spec"]["workerGroupSpecs"]
    assert len(groups) == len(v["models"])
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    for model, group in zip(v["models"], groups, strict=True):
        world = model.get("tp", 1) * model.get("pp", 1)
        low = model.get("replicas", model.get("minReplicas", 1))
        high = model.get("replicas", model.get("maxReplicas", low))
        assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (low, low, high)
        [container] = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        params = group["rayStartParams"]
        if v["gpu"]["enabled"]:
            assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == str(world)
            assert params["num-gpus"] == str(world)
            assert group["template"]["spec"]["tolerations"]
        else:
            assert "nvidia.com/gpu" not in limits and params["num-gpus"] == "0"
        # Ray's CPUs: exactly one replica's bundles, so one replica per pod.
        cpus = world * model.get("cpusPerRank", 1)
        assert params["num-cpus"] == str(-(-cpus // 1))
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/dev/shm" in mounts
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    # KubeRay binds the autoscaler's RBAC to the head's own service account and token.
    assert "serviceAccountName" not in head["template"]["spec"]
    assert "automountServiceAccountToken" not in head["template"]["spec"]


def test_worker_scheduling_settings_reach_the_worker_pods():
    cluster = find(example_objects("two-models-tp2"), "RayCluster")
    for group in cluster["spec"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert "podAntiAffinity" in spec["affinity"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == ["llm-weights"]
    qwen = cluster["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    assert qwen["resources"]["requests"] == {"cpu": "16", "memory": "96Gi",
                                             "nvidia.com/gpu": "2"}


def test_cpu_only_renders_no_gpu_request_and_the_cpu_image():
    for name in ("cpu-only", "cpu-standalone"):
        text = helm_render.golden_path(name).read_text()
        assert "nvidia.com/gpu:" not in text.replace("key: nvidia.com/gpu", "")
        images = {c["image"] for _, t in pod_templates(example_objects(name))
                  for c in t["spec"]["containers"] if "lmfleet" in c["image"]}
        assert images == {"lmfleet:0.1.0-cpu"}


def test_without_kuberay_one_pod_holds_every_replicas_gpus():
    objects = example_objects("kuberay-off")
    assert not find_all(objects, "RayCluster")
    deployment = find(objects, "Deployment", "-controller")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two controllers
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "3"  # chat 2 + default 1
    assert "--ray-address" not in container["args"]  # it starts its own Ray cluster
    assert {"startupProbe", "livenessProbe"} <= container.keys()
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "models", "hostPath": {"path": "/mnt/models", "type": "Directory"}} in volumes


@pytest.mark.parametrize("name", EXAMPLES)
def test_container_commands_parse_with_lmfleets_own_parser(name):
    objects = example_objects(name)
    parser = build_parser()
    router = router_container(objects)
    assert router["command"] == ["lmfleet"]
    args = parser.parse_args(router["args"])
    assert (args.command, args.host, args.port) == ("router", "0.0.0.0", 8000)
    assert args.redis.startswith(("redis://", "rediss://")) and args.api_key is None
    argv = controller_argv(objects)
    assert argv[0] == "lmfleet"
    args = parser.parse_args(argv[1:])
    assert (args.command, args.config, args.metrics_host) == (
        "controller", "/etc/lmfleet/fleet.yaml", "0.0.0.0")
    assert args.ray_address == ("auto" if name in KUBERAY else None)
    assert args.redis == parser.parse_args(router["args"]).redis


@pytest.mark.parametrize("name", EXAMPLES)
def test_router_probes_gate_traffic_on_health_and_restart_only_a_dead_router(name):
    router = router_container(example_objects(name))
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert ports == {"http": 8000, "grpc": 50051}
    probes = {kind: router[f"{kind}Probe"]["httpGet"] for kind in
              ("startup", "liveness", "readiness")}
    assert probes["readiness"] == {"path": "/health", "port": "http"}
    # /health is 503 while no replica is ready: liveness on it would restart every router
    # during a cold start or a fleet outage.
    assert probes["liveness"]["path"] != "/health" and probes["startup"]["path"] != "/health"


SECRET_CASES = {
    "two-models-tp2": ("lmfleet-api-key", "api-key", "change-me"),
    "existing-secret": ("lmfleet-api-keys", "openai-key", None),
    "gpu-default": None,
}


@pytest.mark.parametrize("name", sorted(SECRET_CASES))
def test_the_api_key_reaches_routers_only_through_a_secret(name):
    objects = example_objects(name)
    env = {e["name"]: e for e in router_container(objects).get("env", [])}
    expected = SECRET_CASES[name]
    if expected is None:
        assert "LMFLEET_API_KEY" not in env and not find_all(objects, "Secret")
        return
    secret_name, key, value = expected
    assert env["LMFLEET_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret_name,
                                                                   "key": key}
    secrets = find_all(objects, "Secret")
    if value is None:  # an existing Secret: the chart must not create or overwrite it
        assert secrets == []
    else:
        [secret] = secrets
        assert secret["metadata"]["name"] == secret_name
        assert base64.b64decode(secret["data"][key]).decode() == value
        others = [o for o in objects if o["kind"] != "Secret"]
        assert value not in json.dumps(others)


@pytest.mark.parametrize(("name", "secret_name", "value"), [
    ("existing-secret", "lmfleet-worker-token", None),
    ("kuberay-off", "lmfleet-worker-token", "a-worker-token"),
])
def test_the_worker_token_reaches_routers_and_controller_only_through_a_secret(
        name, secret_name, value):
    objects = example_objects(name)
    raycluster = find_all(objects, "RayCluster")
    if raycluster:
        controller = raycluster[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    else:
        [deployment] = [o for o in find_all(objects, "Deployment")
                        if o["metadata"]["name"].endswith("-controller")]
        controller = deployment["spec"]["template"]["spec"]["containers"][0]
    for container in (router_container(objects), controller):
        [env] = [e for e in container["env"] if e["name"] == "LMFLEET_WORKER_TOKEN"]
        assert env["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": "worker-token"}
    secrets = [s for s in find_all(objects, "Secret")
               if s["metadata"]["name"] == secret_name]
    if value is None:  # managed outside the chart: never created or overwritten here
        assert secrets == []
    else:
        [secret] = secrets
        assert base64.b64decode(secret["data"]["worker-token"]).decode() == value
        others = [o for o in objects if o["kind"] != "Secret"]
        assert value not in json.dumps(others)


def test_the_redis_password_comes_from_its_secret_for_routers_and_controller():
    objects = example_objects("external-redis")
    assert not [o for o in objects if o["metadata"]["name"].endswith("-redis")]
    head = find(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    for container in (router_container(objects), head["containers"][0]):
        [env] = [e for e in container["env"] if e["name"] == "LMFLEET_REDIS_PASSWORD"]
        assert env["valueFrom"]["secretKeyRef"] == {"name": "lmfleet-redis", "key": "password"}
    assert "rediss://redis.example.internal:6380/2" in router_container(objects)["args"]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", EXAMPLES)
def test_selectors_match_the_labels_of_what_they_select(name):
    objects = example_objects(name)
    templates = pod_templates(objects)
    services = find_all(objects, "Service")
    for obj in find_all(objects, "Deployment"):
        assert _matches(obj["spec"]["selector"]["matchLabels"],
                        obj["spec"]["template"]["metadata"]["labels"])
    for service in services:
        selected = [t for _, t in templates if _matches(service["spec"]["selector"],
                                                        t["metadata"]["labels"])]
        assert selected, service["metadata"]["name"]
        ports = {p["name"] for t in selected for c in t["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)
    for pdb in find_all(objects, "PodDisruptionBudget"):
        assert _matches(pdb["spec"]["selector"]["matchLabels"],
                        find(objects, "Deployment", "-router")["spec"]["template"]
                        ["metadata"]["labels"])
    for monitor in find_all(objects, "ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        [service] = [s for s in services if _matches(monitor["spec"]["selector"]["matchLabels"],
                                                      s["metadata"]["labels"])]
        names = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= names
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
    for monitor in find_all(objects, "PodMonitor"):
        selected = [t for _, t in templates if _matches(
            monitor["spec"]["selector"]["matchLabels"], t["metadata"]["labels"])]
        ports = {p["name"] for t in selected for c in t["spec"]["containers"]
                 for p in c.get("ports", [])}
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    for hpa in find_all(objects, "HorizontalPodAutoscaler"):
        assert find(objects, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
    router_service = find(objects, "Service", "-router")
    for ingress in find_all(objects, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend == {"name": router_service["metadata"]["name"],
                                   "port": {"name": "http"}}


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_redis_url_names_the_built_in_redis_service(name):
    objects = example_objects(name)
    if not values(name)["redis"]["enabled"]:
        return
    url = build_parser().parse_args(router_container(objects)["args"]).redis
    service = find(objects, "Service", "-redis")
    port = service["spec"]["ports"][0]["port"]
    assert url == f"redis://{service['metadata']['name']}:{port}/0"


def _load_fleet(text: str, monkeypatch, mount_path: str):
    """The fleet YAML through cluster/fleet_config.py's loader. Model paths live on the
    cluster's volume, so only their place is checked here (absolute, under the mount)."""

    def model_path(path: str) -> str:
        if path in ("default", "SmolLM2-135M-Instruct"):
            return path
        assert path.startswith(mount_path + "/"), path
        return path

    monkeypatch.setattr(fleet_config, "model_path", model_path)
    return fleet_config.fleet_config_from_dict(yaml.safe_load(text), source="configmap")


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_fleet_configmap_loads_with_the_controllers_own_loader(name, monkeypatch):
    v = values(name)
    objects = example_objects(name)
    configmap = find(objects, "ConfigMap", "-fleet")
    text = configmap["data"]["fleet.yaml"]
    fleet = _load_fleet(text, monkeypatch, v["modelStorage"]["mountPath"])
    assert fleet.cluster == v["cluster"]
    assert [m.name for m in fleet.models] == [m["name"] for m in v["models"]]
    for model, deployment in zip(v["models"], fleet.models, strict=True):
        low = model.get("replicas", model.get("minReplicas", 1))
        high = model.get("replicas", model.get("maxReplicas", low))
        scaling = deployment.autoscaling
        assert (scaling.min_replicas, scaling.max_replicas) == (low, high)
        assert (deployment.tp, deployment.pp) == (model.get("tp", 1), model.get("pp", 1))
        assert deployment.placement.use_gpu is v["gpu"]["enabled"]
        # What the values set, parsed as the controller parses it (the chart adds device).
        engine = check_options(model.get("engine") or {}, "engine")
        assert engine.items() <= dict(deployment.engine).items()
        for key, value in (model.get("autoscaling") or {}).items():
            assert getattr(scaling, key) == value
    # Mounted where --config points, from this ConfigMap.
    for _, template in pod_templates(objects):
        for volume in template["spec"].get("volumes", []):
            if volume["name"] == "fleet-config":
                assert volume["configMap"]["name"] == configmap["metadata"]["name"]
