"""Prometheus metrics of the router: vLLM's own series under vLLM's names, and lmfleet's.

vLLM-compatible series (names, types, buckets and the `model_name` label as vLLM's
`vllm/v1/metrics/loggers.py`, so vLLM's Grafana dashboards and KEDA/HPA triggers written
for vLLM work unchanged). Measured here for every completion (label `model_name`):
  vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
  vllm:request_time_per_output_token_seconds, vllm:e2e_request_latency_seconds,
  vllm:request_queue_time_seconds (the router's admission wait, see docs/metrics.md),
  vllm:request_prompt_tokens, vllm:request_generation_tokens (buckets 1-2-5 up to the
  model's max_model_len), vllm:prompt_tokens_total, vllm:generation_tokens_total,
  vllm:request_success_total{finished_reason}
Mirrored from the workers' last LoadReports at scrape time (labels model_name, replica;
`replica` plays the part of vLLM's `engine` label):
  vllm:num_requests_running|waiting, vllm:kv_cache_usage_perc, vllm:num_preemptions_total,
  vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total

lmfleet's own series (label `model_name`: a served model's name, or "" for a request
whose model was never resolved, e.g. an unknown name; a name a client sent is never a
label, which keeps the series bounded and every label encodable):
  lmfleet:router_requests_total{api,status}   answered client requests: api "http" with
      the HTTP status ("499": client gone first), api "grpc" with the gRPC code name
  lmfleet:router_requests_in_flight, lmfleet:router_requests_queued
  from the LoadReports (labels model_name, replica):
  lmfleet:num_requests_swapped, lmfleet:queue_num_running|waiting{queue} (MLFQ),
  lmfleet:swap_out|in_blocks_total, lmfleet:swap_out|in_bytes_total,
  lmfleet:host_kv_cache_usage_perc, lmfleet:num_sessions, lmfleet:replica_healthy
Each Router has its own CollectorRegistry, so several routers in one process (tests,
`lmfleet serve`) never share or clash.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lmfleet.router.replicas import ReplicaRegistry

PREFIX = "lmfleet:"
VLLM = "vllm:"
# model_name of requests whose model was never resolved (bad input, unknown model, 401).
UNRESOLVED = ""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# vLLM's FinishReason values; anything else a worker sends is counted as "abort".
FINISH_REASONS = ("stop", "length", "abort")

# Buckets as vLLM's (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... while <= max_value."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class RouterMetrics:
    """The router's metrics; `render()` is the /metrics body."""

    def __init__(self, replicas: ReplicaRegistry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}router_requests", "Finished client requests.",
                                ["model_name", "api", "status"], registry=r)
        self.success = Counter(f"{VLLM}request_success",
                               "Count of successfully processed requests.",
                               ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram(f"{VLLM}time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", ["model_name"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{VLLM}inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.",
                             ["model_name"], buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram(f"{VLLM}request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.",
                              ["model_name"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{VLLM}e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", ["model_name"],
                             buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram(f"{VLLM}request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request "
                                    "(the router's admission queue).",
                                    ["model_name"], buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{VLLM}prompt_tokens",
                                     "Number of prefill tokens processed.",
                                     ["model_name"], registry=r)
        self.generation_tokens = Counter(f"{VLLM}generation_tokens",
                                         "Number of generation tokens processed.",
                                         ["model_name"], registry=r)
        self.request_prompt_tokens = TokenHistogram(
            f"{VLLM}request_prompt_tokens", "Number of prefill tokens processed.", replicas)
        self.request_generation_tokens = TokenHistogram(
            f"{VLLM}request_generation_tokens", "Number of generation tokens processed.",
            replicas)
        r.register(self.request_prompt_tokens)
        r.register(self.request_generation_tokens)
        r.register(_LoadReportCollector(replicas))
        self._replicas = replicas

    def record_request(self, model: Optional[str], api: str, status: str) -> None:
        """Count one answered request (`model` None/"" when it was never resolved; a name
        that is not a served model's counts as unresolved too)."""
        label = model if model and model in self._replicas.models else UNRESOLVED
        self.requests.labels(model_name=label, api=api, status=status).inc()

    def record_success(self, model: str, finish_reason: str) -> None:
        """Count one finished completion by vLLM's finished_reason."""
        reason = finish_reason if finish_reason in FINISH_REASONS else "abort"
        self.success.labels(model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TokenHistogram(Collector):
    """A histogram of token counts whose buckets are vLLM's `build_1_2_5_buckets` of each
    model's max_model_len (vLLM has one model per server; a router serves several with
    different lengths, so each model's series gets its own `le` set)."""

    def __init__(self, name: str, documentation: str, replicas: ReplicaRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self._replicas = replicas
        self._lock = threading.Lock()
        # model name -> (upper bounds, counts per bucket incl. +Inf, sum)
        self._series: dict[str, tuple[list[int], list[int], list[float]]] = {}

    def observe(self, model: str, max_model_len: int, value: float) -> None:
        with self._lock:
            series = self._series.get(model)
            if series is None:
                bounds = build_1_2_5_buckets(max(int(max_model_len), 1))
                series = self._series[model] = (bounds, [0] * (len(bounds) + 1), [0.0])
            bounds, counts, total = series
            counts[bisect.bisect_left(bounds, value)] += 1
            total[0] += value

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=["model_name"])]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model_name"])
        with self._lock:
            snapshot = {model: (list(b), list(c), t[0])
                        for model, (b, c, t) in self._series.items()}
        for model, (bounds, counts, total) in sorted(snapshot.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*map(float, bounds), float("inf")], counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric([model], buckets, total)
        yield family


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
            # vLLM's names (help texts as vLLM's).
            "vllm:num_requests_running": "Number of requests in model execution batches.",
            "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
            "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
            # lmfleet's own.
            "lmfleet:num_requests_swapped": "Requests whose KV is swapped to host memory.",
            "lmfleet:host_kv_cache_usage_perc": "Fraction of host-memory KV blocks in use (0-1).",
            "lmfleet:num_sessions": "Chat sessions whose KV the replica keeps.",
            "lmfleet:replica_healthy": "1 if the replica answered its last load poll.",
        }
        counters = {
            "vllm:num_preemptions": "Cumulative number of preemption from the engine.",
            "vllm:prefix_cache_queries":
                "Prefix cache queries, in terms of number of queried tokens.",
            "vllm:prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
            "lmfleet:swap_out_blocks": "KV blocks swapped out to host memory.",
            "lmfleet:swap_in_blocks": "KV blocks swapped in from host memory.",
            "lmfleet:swap_out_bytes": "Bytes of KV swapped out to host memory.",
            "lmfleet:swap_in_bytes": "Bytes of KV swapped in from host memory.",
        }
        families = {n: GaugeMetricFamily(n, h, labels=labels) for n, h in gauges.items()}
        families.update({n: CounterMetricFamily(n, h, labels=labels)
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
                healthy = 1.0 if replica.healthy else 0.0
                families["lmfleet:replica_healthy"].add_metric(values, healthy)
                load = replica.load
                if load is None:
                    continue
                for name, value in (
                        ("vllm:num_requests_running", load.num_running),
                        ("vllm:num_requests_waiting", load.num_waiting),
                        ("vllm:kv_cache_usage_perc", load.kv_cache_usage),
                        ("vllm:num_preemptions", load.num_preemptions),
                        ("vllm:prefix_cache_queries", load.prefix_cache_queries),
                        ("vllm:prefix_cache_hits", load.prefix_cache_hits),
                        ("lmfleet:num_requests_swapped", load.num_swapped),
                        ("lmfleet:host_kv_cache_usage_perc", load.host_kv_cache_usage),
                        ("lmfleet:num_sessions", load.num_sessions),
                        ("lmfleet:swap_out_blocks", load.num_swap_out_blocks),
                        ("lmfleet:swap_in_blocks", load.num_swap_in_blocks),
                        ("lmfleet:swap_out_bytes", load.swap_out_bytes),
                        ("lmfleet:swap_in_bytes", load.swap_in_bytes)):
                    families[name].add_metric(values, value)
                for queue in load.queues:
                    queue_running.add_metric([*values, queue.name], queue.num_running)
                    queue_waiting.add_metric([*values, queue.name], queue.num_waiting)
        yield from families.values()
        yield from (queue_running, queue_waiting, in_flight, queued)
