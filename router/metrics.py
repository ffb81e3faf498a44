"""Prometheus metrics of the router, with vLLM's names under the `lmfleet:` prefix.

Router-side, measured here for every request (label `model_name`: a served model's name,
or "" for a request whose model was never resolved, e.g. an unknown name; a name a client
sent is never a label, which keeps the series bounded and every label encodable):
  lmfleet:router_requests_total{api,status}   answered client requests: api "http" with
      the HTTP status ("499": client gone first), api "grpc" with the gRPC code name
  lmfleet:request_success_total{finished_reason}
  lmfleet:time_to_first_token_seconds, lmfleet:inter_token_latency_seconds,
  lmfleet:e2e_request_latency_seconds, lmfleet:request_queue_time_seconds (admission)
  lmfleet:prompt_tokens_total, lmfleet:generation_tokens_total
  lmfleet:router_requests_in_flight, lmfleet:router_requests_queued
Mirrored from the workers' last LoadReports at scrape time (labels model_name, replica):
  lmfleet:num_requests_running|waiting|swapped, lmfleet:kv_cache_usage_perc,
  lmfleet:num_preemptions_total, lmfleet:prefix_cache_queries_total,
  lmfleet:prefix_cache_hits_total, lmfleet:queue_num_running|waiting{queue} (MLFQ),
  lmfleet:swap_out|in_blocks_total, lmfleet:swap_out|in_bytes_total,
  lmfleet:host_kv_cache_usage_perc, lmfleet:num_sessions,
  lmfleet:replica_healthy
Each Router has its own CollectorRegistry, so several routers in one process (tests,
`lmfleet serve`) never share or clash.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmfleet.router.replicas import ReplicaRegistry

PREFIX = "lmfleet:"
# model_name of requests whose model was never resolved (bad input, unknown model, 401).
UNRESOLVED = ""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets as vLLM's (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class RouterMetrics:
    """The router's metrics; `render()` is the /metrics body."""

    def __init__(self, replicas: ReplicaRegistry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}router_requests", "Finished client requests.",
                                ["model_name", "api", "status"], registry=r)
        self.success = Counter(f"{PREFIX}request_success", "Finished completions by reason.",
                               ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds",
                              "Time to first token, seen by the router.", ["model_name"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}inter_token_latency_seconds",
                             "Time between streamed token batches, per token.",
                             ["model_name"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}e2e_request_latency_seconds",
                             "Request latency from arrival to the last token.", ["model_name"],
                             buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram(f"{PREFIX}request_queue_time_seconds",
                                    "Time spent waiting for admission in the router.",
                                    ["model_name"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens processed.",
                                     ["model_name"], registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated.",
                                         ["model_name"], registry=r)
        r.register(_LoadReportCollector(replicas))
        self._replicas = replicas

    def record_request(self, model: Optional[str], api: str, status: str) -> None:
        """Count one answered request (`model` None/"" when it was never resolved; a name
        that is not a served model's counts as unresolved too)."""
        label = model if model and model in self._replicas.models else UNRESOLVED
        self.requests.labels(model_name=label, api=api, status=status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LoadReportCollector(Collector):
    """Gauges and counters copied from each replica's latest LoadReport at scrape time
    (worker counters are cumulative, so they are exposed as counters unchanged)."""

    def __init__(self, replicas: ReplicaRegistry) -> None:
        self._replicas = replicas

    def describe(self) -> list[Metric]:
        return []  # dynamic: label sets change as replicas come and go

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "replica"]
        gauges = {
            "num_requests_running": "Requests running on the replica.",
            "num_requests_waiting": "Requests waiting on the replica.",
            "num_requests_swapped": "Requests whose KV is swapped to host memory.",
            "kv_cache_usage_perc": "Fraction of device KV blocks in use (0-1).",
            "host_kv_cache_usage_perc": "Fraction of host-memory KV blocks in use (0-1).",
            "num_sessions": "Chat sessions whose KV the replica keeps.",
            "replica_healthy": "1 if the replica answered its last load poll.",
        }
        counters = {
            "num_preemptions": "Preemptions on the replica.",
            "prefix_cache_queries": "Prefix-cache queried tokens.",
            "prefix_cache_hits": "Prefix-cache hit tokens.",
            "swap_out_blocks": "KV blocks swapped out to host memory.",
            "swap_in_blocks": "KV blocks swapped in from host memory.",
            "swap_out_bytes": "Bytes of KV swapped out to host memory.",
            "swap_in_bytes": "Bytes of KV swapped in from host memory.",
        }
        families = {n: GaugeMetricFamily(PREFIX + n, h, labels=labels) for n, h in gauges.items()}
        families.update({n: CounterMetricFamily(PREFIX + n, h, labels=labels)
                         for n, h in counters.items()})
        queue_running = GaugeMetricFamily(f"{PREFIX}queue_num_running",
                                          "Running requests per scheduler queue.",
                                          labels=[*labels, "queue"])
        queue_waiting = GaugeMetricFamily(f"{PREFIX}queue_num_waiting",
                                          "Waiting requests per scheduler queue.",
                                          labels=[*labels, "queue"])
        in_flight = GaugeMetricFamily(f"{PREFIX}router_requests_in_flight",
                                      "Client requests admitted and not finished.",
                                      labels=["model_name"])
        queued = GaugeMetricFamily(f"{PREFIX}router_requests_queued",
                                   "Client requests waiting for admission.",
                                   labels=["model_name"])
        for model in list(self._replicas.models.values()):
            in_flight.add_metric([model.name], model.admission.num_in_flight)
            queued.add_metric([model.name], model.admission.num_queued)
            for replica in model.replicas:
                values = [model.name, replica.address]
                families["replica_healthy"].add_metric(values, 1.0 if replica.healthy else 0.0)
                load = replica.load
                if load is None:
                    continue
                families["num_requests_running"].add_metric(values, load.num_running)
                families["num_requests_waiting"].add_metric(values, load.num_waiting)
                families["num_requests_swapped"].add_metric(values, load.num_swapped)
                families["kv_cache_usage_perc"].add_metric(values, load.kv_cache_usage)
                families["num_preemptions"].add_metric(values, load.num_preemptions)
                families["prefix_cache_queries"].add_metric(values, load.prefix_cache_queries)
                families["prefix_cache_hits"].add_metric(values, load.prefix_cache_hits)
                families["host_kv_cache_usage_perc"].add_metric(values, load.host_kv_cache_usage)
                families["num_sessions"].add_metric(values, load.num_sessions)
                families["swap_out_blocks"].add_metric(values, load.num_swap_out_blocks)
                families["swap_in_blocks"].add_metric(values, load.num_swap_in_blocks)
                families["swap_out_bytes"].add_metric(values, load.swap_out_bytes)
                families["swap_in_bytes"].add_metric(values, load.swap_in_bytes)
                for queue in load.queues:
                    queue_running.add_metric([*values, queue.name], queue.num_running)
                    queue_waiting.add_metric([*values, queue.name], queue.num_waiting)
        yield from families.values()
        yield from (queue_running, queue_waiting, in_flight, queued)
