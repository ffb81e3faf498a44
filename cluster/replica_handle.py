"""The controller's side of one replica: its placement group, its Ray actor, its gRPC
channel, and where it is in its life.

    STARTING --ready--> READY --scale-in--> DRAINING --drained--> STOPPED
        \\--failed / timed out--------------------------------------^
    READY --died / unhealthy x N--> STOPPED (the controller starts a replacement)

Every method returns at once (Ray object refs and gRPC futures are polled), so one
controller round can look after many replicas without threads; only `kill()` waits, and
only for Ray's bounded kill.

With $LMFLEET_WORKER_TOKEN set in the controller's process, the replica is handed the
token (an argument of its `start`, so it holds on nodes of a cluster started elsewhere,
whose processes do not share this one's environment) and the controller's own GetLoad
and Drain calls carry it; grpc.health needs none.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from dataclasses import dataclass
from typing import Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmfleet.cluster.fleet_config import ModelDeployment
from lmfleet.proto.v1 import worker_pb2, worker_pb2_grpc
from lmfleet.worker.auth import token_metadata, worker_token_from_env

logger = logging.getLogger(__name__)


# LoadReport fields copied into the replica's record in the state store.
LOAD_FIELDS = ("num_running", "num_waiting", "num_swapped", "kv_cache_usage",
               "host_kv_cache_usage", "num_sessions", "generation_tokens_per_second")


def load_summary(report: worker_pb2.LoadReport) -> dict[str, float]:
    """The numbers of a LoadReport that go into the store (`draining` as 0/1)."""
    summary = {name: float(getattr(report, name)) for name in LOAD_FIELDS}
    summary["draining"] = 1.0 if report.draining else 0.0
    return summary


class ReplicaState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True)
class HealthResult:
    """One health round of a replica: `ok` when grpc.health said SERVING and GetLoad
    answered in time; `load` is that answer."""

    ok: bool
    load: Optional[worker_pb2.LoadReport] = None
    error: str = ""


class ReplicaHandle:
    """One replica as the controller drives it. Construct, then `launch()`."""

    def __init__(self, replica_id: str, deployment: ModelDeployment,
                 clock=time.monotonic) -> None:
        self.replica_id = replica_id
        self.deployment = deployment
        self.model = deployment.name
        self.state = ReplicaState.STARTING
        self.address: Optional[str] = None
        self.pid: Optional[int] = None  # the rank-0 process, once serving
        self.failures = 0  # consecutive failed health checks
        self.last_load: Optional[worker_pb2.LoadReport] = None
        self.stop_reason = ""
        self._clock = clock
        self.started_at = clock()
        self._actor = None
        self._pg = None
        self._start_ref = None
        self._watch_ref = None
        self._channel: Optional[grpc.Channel] = None
        self._checks: Optional[tuple[grpc.Future, grpc.Future]] = None
        self._drain: Optional[grpc.Future] = None
        self._shutdown_ref = None
        self._shutdown_at = 0.0
        self._token = worker_token_from_env()
        self._metadata = token_metadata(self._token)

    def __repr__(self) -> str:
        return f"replica {self.replica_id} ({self.state.value}, {self.address or 'no address'})"

    @property
    def actor(self):
        """The Ray actor handle (tests kill it to simulate a crash)."""
        return self._actor

    # ---- start ---------------------------------------------------------------------------
    def launch(self, replica_host: Optional[str]) -> None:
        """Reserve the placement group and create the rank-0 actor; loading goes on in the
        background (`poll_start`)."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from lmfleet.cluster.replica import replica_actor_class

        placement = self.deployment.placement
        self._pg = placement_group(placement.bundles(), strategy=placement.strategy,
                                   name=f"lmfleet-{self.replica_id}")
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self._pg, placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True)
        self._actor = replica_actor_class().options(
            num_cpus=placement.rank0_resources()["CPU"],
            num_gpus=placement.rank0_resources().get("GPU", 0),
            scheduling_strategy=strategy, max_restarts=0,
        ).remote(self.deployment.path, self.deployment.name,
                 self.deployment.engine_options())
        self._start_ref = self._actor.start.remote(replica_host, self._token)
        self._watch_ref = self._actor.wait_until_stopped.remote()

    def poll_start(self, start_timeout_s: float) -> Optional[str]:
        """While STARTING: becomes READY once the worker serves. Returns an error message
        when the start failed or timed out (the caller stops the replica), else None."""
        import ray

        ready, _ = ray.wait([self._start_ref], timeout=0)
        if not ready:
            waited = self._clock() - self.started_at
            if waited > start_timeout_s:
                return (f"not serving after {waited:.0f} s (is the cluster short of "
                        f"{self.deployment.placement.bundles()[0]} bundles?)")
            return None
        try:
            self.address, self.pid = ray.get(self._start_ref)
        except Exception as error:  # noqa: BLE001 (the actor's own error, reported as is)
            return _actor_error(error)
        self._channel = grpc.insecure_channel(self.address)
        self.state = ReplicaState.READY
        return None

    # ---- watch ---------------------------------------------------------------------------
    def death(self) -> Optional[str]:
        """Why the actor's process died, or None while it lives (or stopped on purpose)."""
        import ray

        if self._watch_ref is None or self.state is ReplicaState.STOPPED:
            return None
        ready, _ = ray.wait([self._watch_ref], timeout=0)
        if not ready:
            return None
        try:
            ray.get(self._watch_ref)
        except Exception as error:  # noqa: BLE001
            return _actor_error(error)
        return None

    def begin_health_check(self, timeout_s: float) -> None:
        """Send grpc.health Check and GetLoad (answers read by `finish_health_check`)."""
        health = health_pb2_grpc.HealthStub(self._channel)
        worker = worker_pb2_grpc.WorkerStub(self._channel)
        self._checks = (
            health.Check.future(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s),
            worker.GetLoad.future(worker_pb2.GetLoadRequest(), timeout=timeout_s,
                                  metadata=self._metadata))

    def finish_health_check(self) -> HealthResult:
        """Waits for the answers of `begin_health_check` (bounded by its timeout) and
        updates the consecutive-failure count."""
        health, load = self._checks
        self._checks = None
        try:
            status = health.result().status
            report = load.result()
        except grpc.RpcError as error:
            result = HealthResult(False, error=f"{error.code().name}: {error.details()}")
        else:
            serving = status == health_pb2.HealthCheckResponse.SERVING
            result = HealthResult(serving, report, "" if serving else "health NOT_SERVING")
        self.failures = 0 if result.ok else self.failures + 1
        if result.load is not None:
            self.last_load = result.load
        return result

    # ---- stop ----------------------------------------------------------------------------
    def begin_drain(self, timeout_s: float) -> None:
        """READY -> DRAINING: the worker stops admitting (new requests get UNAVAILABLE and
        the router retries them elsewhere) and finishes what it has."""
        self.state = ReplicaState.DRAINING
        stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._drain = stub.Drain.future(worker_pb2.DrainRequest(timeout_seconds=timeout_s),
                                        timeout=timeout_s + 10.0, metadata=self._metadata)

    def drained(self) -> bool:
        """While DRAINING: whether the worker has finished (or the drain call ended)."""
        return self._drain is None or self._drain.done()

    def begin_shutdown(self, grace_s: float) -> None:
        """Ask the worker to stop serving (aborting anything left) before the kill."""
        if self._actor is not None and self._shutdown_ref is None:
            self._shutdown_ref = self._actor.shutdown.remote(grace_s)
            self._shutdown_at = self._clock() + grace_s + 5.0

    def shutdown_done(self) -> bool:
        import ray

        if self._shutdown_ref is None:
            return True
        ready, _ = ray.wait([self._shutdown_ref], timeout=0)
        return bool(ready) or self._clock() > self._shutdown_at

    def kill(self, reason: str) -> None:
        """Stop for good: kill the actor, free its placement group (idempotent)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.state is ReplicaState.STOPPED:
            return
        self.state = ReplicaState.STOPPED
        self.stop_reason = reason
        if self._channel is not None:
            self._channel.close()
        with contextlib.suppress(Exception):  # already dead is fine
            ray.kill(self._actor, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(self._pg)


def _actor_error(error: Exception) -> str:
    """A one-line reason from a Ray error (its cause's message, not Ray's boilerplate)."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    message = next((line for line in reversed(text) if line.strip()), type(cause).__name__)
    return f"{type(error).__name__}: {message.strip()}"
