"""The controller's numbers as Prometheus metrics, read from its last round's snapshot at
scrape time (label `model_name`):

  lmfleet:fleet_replicas{state}                 ready / starting / draining replicas
  lmfleet:fleet_replica_starts_total            replicas started
  lmfleet:fleet_replica_stops_total{reason}     scale_in, died, unhealthy, start_failed
  lmfleet:autoscaler_desired_replicas           where the autoscaler is taking the model
  lmfleet:autoscaler_load_desired_replicas      what the load alone asks for now
  lmfleet:autoscaler_total_load                 running + waiting requests on ready replicas
  lmfleet:autoscaler_mean_kv_cache_usage        mean KV usage of ready replicas (0..1)

`lmfleet serve` registers the collector in its router's registry (one /metrics for
both); `lmfleet controller` serves it on --metrics-port.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "lmfleet:"


class ControllerCollector(Collector):
    def __init__(self, controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        replicas = GaugeMetricFamily(f"{PREFIX}fleet_replicas", "Replicas by state.",
                                     labels=["model_name", "state"])
        starts = CounterMetricFamily(f"{PREFIX}fleet_replica_starts", "Replicas started.",
                                     labels=["model_name"])
        stops = CounterMetricFamily(f"{PREFIX}fleet_replica_stops", "Replicas stopped.",
                                    labels=["model_name", "reason"])
        gauges = {name: GaugeMetricFamily(f"{PREFIX}autoscaler_{name}", help_text,
                                          labels=["model_name"])
                  for name, help_text in (
                      ("desired_replicas", "Replicas the autoscaler is taking the model to."),
                      ("load_desired_replicas", "Replicas the current load asks for."),
                      ("total_load", "Running + waiting requests on ready replicas."),
                      ("mean_kv_cache_usage", "Mean KV-cache usage of ready replicas."))}
        for name, model in sorted(self.controller.snapshot().items()):
            for state, count in (("ready", len(model.ready)), ("starting", model.starting),
                                 ("draining", model.draining)):
                replicas.add_metric([name, state], count)
            starts.add_metric([name], model.starts)
            for reason, count in sorted(model.stops.items()):
                stops.add_metric([name, reason], count)
            decision = model.decision
            if decision is not None:
                gauges["desired_replicas"].add_metric([name], decision.desired)
                gauges["load_desired_replicas"].add_metric([name], decision.raw_desired)
                gauges["total_load"].add_metric([name], decision.total_load)
                gauges["mean_kv_cache_usage"].add_metric([name], decision.mean_kv_usage)
        yield replicas
        yield starts
        yield stops
        yield from gauges.values()
