"""The Grafana dashboard shipped with the chart queries only series that lmfleet exports:
every `lmfleet:*` and `vllm:*` name in its PromQL is one the routers (router/metrics.py) or
the controller (cluster/controller_metrics.py) expose, read from their collectors, not from
a list kept by hand. A renamed metric fails here until the dashboard follows. vLLM's own
dashboard's series (VLLM_DASHBOARD_SERIES) are exported under vLLM's names too."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from lmfleet.cluster.controller_metrics import ControllerCollector
from lmfleet.router.metrics import RouterMetrics
from tests.deploy import helm_render
from tests.deploy.chart_fixtures import example_objects, find

DASHBOARD = helm_render.CHART_DIR / "files" / "grafana-dashboard.json"
SERIES = re.compile(r"\b((?:lmfleet|vllm):[A-Za-z0-9_:]+)")

# The metric names vLLM's own Grafana dashboard queries (vLLM's repository,
# examples/online_serving/prometheus_grafana/grafana.json), restated by hand. vLLM renamed
# time_per_output_token_seconds to inter_token_latency_seconds; either is accepted.
VLLM_DASHBOARD_SERIES = [
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_bucket",
    ("vllm:time_per_output_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket"),
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
    "vllm:request_success_total",
]


def vllm_dashboard_series_missing(exported: set[str]) -> list:
    """The entries of VLLM_DASHBOARD_SERIES none of whose names is in `exported`."""
    return [entry for entry in VLLM_DASHBOARD_SERIES
            if not set((entry,) if isinstance(entry, str) else entry) & exported]


def _sample_names(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry exposes: counters as NAME_total, histograms as
    NAME_bucket/_sum/_count (what a scrape shows), whether or not samples exist yet."""
    names = set()
    for family in registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def exported_series() -> set[str]:
    # The load-report collector lists models at scrape time; none is needed for its names.
    router = RouterMetrics(SimpleNamespace(models={}))
    controller = CollectorRegistry()
    controller.register(ControllerCollector(SimpleNamespace(snapshot=dict)))
    return _sample_names(router.registry) | _sample_names(controller)


def queries(dashboard: dict) -> list[str]:
    out = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    out += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return out


def test_every_series_the_dashboard_queries_is_exported():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_series()
    assert "vllm:time_to_first_token_seconds_bucket" in exported  # the scan works
    used = {name for expr in queries(dashboard) for name in SERIES.findall(expr)}
    assert used and not used - exported, sorted(used - exported)
    assert any(name.startswith("vllm:") for name in used)


def test_every_series_vllms_own_dashboard_queries_is_exported():
    assert not vllm_dashboard_series_missing(exported_series())


def test_ours_are_lmfleet_and_vllms_are_not_duplicated_under_lmfleet():
    exported = exported_series()
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "time_to_first_token_seconds_bucket", "prompt_tokens_total",
                 "request_success_total", "num_preemptions_total",
                 "prefix_cache_hits_total", "prefix_cache_queries_total"):
        assert f"vllm:{name}" in exported and f"lmfleet:{name}" not in exported
    for name in ("queue_num_waiting", "swap_out_blocks_total", "num_sessions",
                 "fleet_replicas", "autoscaler_desired_replicas"):
        assert f"lmfleet:{name}" in exported


@pytest.mark.parametrize("panel", [
    "Time to first token", "Inter-token latency", "End-to-end request latency",
    "Tokens per second", "Requests running / waiting on replicas",
    "KV cache usage per replica", "Prefix cache hit rate",
    "MLFQ queues: waiting / running requests", "Replicas by state", "Autoscaler decisions",
])
def test_the_dashboard_has_the_panels_operators_look_for(panel):
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert panel in titles


def test_the_dashboard_configmap_carries_the_file_and_the_sidecar_label():
    configmap = find(example_objects("gpu-default"), "ConfigMap", "-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["lmfleet.json"]) == json.loads(DASHBOARD.read_text())


def test_panel_ids_and_positions_do_not_collide():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))


def test_the_keda_and_hpa_example_scales_the_router_on_an_exported_vllm_series():
    import kubernetes_validate
    import yaml

    path = helm_render.EXAMPLES_DIR / "keda-scaledobject.yaml"
    scaled, hpa = list(yaml.safe_load_all(path.read_text()))
    router = find(example_objects("gpu-default"), "Deployment", "-router")["metadata"]["name"]
    assert scaled["kind"] == "ScaledObject" and hpa["kind"] == "HorizontalPodAutoscaler"
    assert scaled["spec"]["scaleTargetRef"]["name"] == router
    assert hpa["spec"]["scaleTargetRef"]["name"] == router
    (trigger,) = scaled["spec"]["triggers"]
    used = SERIES.findall(trigger["metadata"]["query"])
    assert used == ["vllm:num_requests_waiting"]
    assert set(used) <= exported_series()
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "vllm_num_requests_waiting"
    kubernetes_validate.validate(hpa, kubernetes_validate.latest_version(), strict=True)
