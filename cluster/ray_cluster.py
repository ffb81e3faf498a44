"""Starting or joining the Ray cluster that hosts the replicas.

`lmfleet serve` and `lmfleet controller` either join a running cluster (`--ray-address
HOST:PORT` or "auto") or start a local one for this process. A local cluster declares at
least as many CPUs as the fleet's largest size needs (`cpus_needed`): on a small machine
the replicas then share its cores, as local processes would, instead of waiting forever
for bundles that can never be placed. GPUs are detected by Ray.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from lmfleet.cluster.fleet_config import FleetConfig

# Ray's object store holds nothing big here (tokens travel over gRPC, not Ray).
_LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024
RAY_NAMESPACE = "lmfleet"


def cpus_needed(config: FleetConfig) -> float:
    """CPUs of every model at its max_replicas, plus one for the driver's tasks."""
    return 1.0 + sum(m.autoscaling.max_replicas * m.placement.world_size
                     * m.placement.cpus_per_rank for m in config.models)


def init_ray(config: FleetConfig, address: Optional[str] = None,
             log_to_driver: bool = False) -> bool:
    """Join the cluster at `address`, or start a local one (even when another one runs
    on this machine). Returns True when this call started it (the caller then owns its
    shutdown). When Ray is already initialised in this process it is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    # Ray's start-up chatter goes through logging; keep it to warnings unless asked.
    logging.getLogger("ray").setLevel(logging.INFO if log_to_driver else logging.WARNING)
    if address:
        ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=log_to_driver)
        return False
    # A signal sent to our whole process group (a terminal's, `timeout`'s) also stops the
    # GCS we start; Ray's calls would then wait 60 s for it before giving up. Our own
    # cluster lives and dies with this process, so a short wait is enough.
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "5")
    num_cpus = max(float(os.cpu_count() or 1), cpus_needed(config))
    # address="local": always a cluster of our own. Without it ray.init joins whatever
    # cluster `ray start` left running on this machine (or $RAY_ADDRESS names).
    ray.init(address="local", num_cpus=int(num_cpus + 0.999), namespace=RAY_NAMESPACE,
             include_dashboard=False, object_store_memory=_LOCAL_OBJECT_STORE_BYTES,
             log_to_driver=log_to_driver, configure_logging=False)
    return True


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
