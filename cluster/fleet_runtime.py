"""Running a fleet in this process: Ray (started or joined), the controller, and a clean
stop; shared by `lmfleet serve` and `lmfleet controller`.

    with running_fleet(fleet, store, ray_address=None, start_timeout_s=600,
                       progress=print) as controller:
        ...   # every model has its min_replicas serving here, except those in
              # controller.start_failures (failed, unplaceable or late: reported)

On exit (normal, exception or signal) the replicas are drained and stopped, and a Ray
cluster this call started is shut down; a second Ctrl-C cannot cut that short (it is
bounded anyway).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Optional

from lmfleet.cluster.controller import Controller
from lmfleet.cluster.fleet_config import FleetConfig
from lmfleet.cluster.ray_cluster import init_ray, shutdown_ray
from lmfleet.cluster.state import StateStore


@contextlib.contextmanager
def running_fleet(fleet: FleetConfig, store: StateStore, ray_address: Optional[str],
                  start_timeout_s: float, progress: Callable[[str], None],
                  verbose: bool = False) -> Iterator[Controller]:
    """Start the fleet and wait for its first replicas; yield the running controller
    once every model is ready or has failed (each failure reported through `progress`
    when seen: a model no node of a local cluster can hold fails at once), with at
    least one ready (else FleetStartError / TimeoutError); stop everything on exit."""
    controller: Optional[Controller] = None
    started_ray = False
    try:
        progress(f"joining Ray at {ray_address}" if ray_address else "starting Ray")
        started_ray = init_ray(fleet, ray_address, log_to_driver=verbose)
        # A cluster this call started has all the nodes it will ever have.
        controller = Controller(fleet, store, cluster_can_grow=not started_ray).start()
        for deployment in fleet.models:
            scaling = deployment.autoscaling
            progress(f"model '{deployment.name}' ({deployment.path}): "
                     f"{scaling.min_replicas}..{scaling.max_replicas} replica(s)")
        def failed(name: str, why: str) -> None:
            # With one model its failure is the command's error; with several, the
            # others may still be served, so each failure is said when seen.
            if len(fleet.models) > 1:
                progress(f"error: model '{name}': {why}")

        controller.wait_ready(start_timeout_s, failed)
        if controller.start_failures:
            progress(f"serving without {', '.join(map(repr, controller.start_failures))}")
        for deployment in fleet.models:
            for replica in controller.replicas(deployment.name):
                if replica.address is not None:
                    progress(f"  replica {replica.replica_id} of '{replica.model}' ready on "
                             f"{replica.address} (pid {replica.pid})")
        yield controller
    finally:
        with signals_ignored():
            if controller is not None:
                progress("stopping replicas")
                controller.stop()
            if started_ray:
                shutdown_ray()


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT/SIGTERM ignored inside the block (restored after)."""
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
