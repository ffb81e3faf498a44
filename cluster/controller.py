"""The controller: keeps each model of a fleet at the size its autoscaler wants, with
healthy replicas, published in the state store for the routers.

One round (every `reconcile_interval_s`, on the controller's own thread) does, per model:
1. starting replicas that now serve become READY (and are published); failed or
   timed-out starts are stopped, and the next start waits a back-off;
2. a replica whose actor died (Ray reports it at once through the actor's death watch)
   is withdrawn from the store and dropped; so is one that failed `unhealthy_after`
   health checks (grpc.health + GetLoad) in a row;
3. healthy replicas are heartbeated into the store with their load;
4. draining replicas that finished are shut down and killed;
5. the autoscaler decides from the READY replicas' loads; new replicas are started, or
   the least-loaded READY ones are withdrawn from the store and drained, so no request
   a replica accepted is dropped by a scale-in (one arriving after the drain began is
   refused with UNAVAILABLE before its first token and the router retries it elsewhere).
   Replicas dropped in step 2 were replaced at once (a new one is starting), so the
   autoscaler counts them as starting.

Decisions that change a model's size are logged with their inputs, and every round's
numbers are exported as metrics (cluster/controller_metrics.py).

    controller = Controller(fleet_config, store)      # Ray must be initialised
    controller.start(); controller.wait_ready(timeout_s=600)
    ...
    controller.stop()                                  # drains every replica
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from lmfleet.cluster.autoscaler import Autoscaler, ReplicaLoad, ScalingDecision
from lmfleet.cluster.fleet_config import FleetConfig, ModelDeployment
from lmfleet.cluster.placement import unplaceable_reason
from lmfleet.cluster.replica_handle import ReplicaHandle, ReplicaState, load_summary
from lmfleet.cluster.state import ReplicaRecord, StateStore, StateStoreError

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 30.0
_STOP_GRACE_S = 5.0
# Stop reasons after which a replica is replaced at once, whatever the autoscaler says.
_REPLACED = ("died", "unhealthy")


class FleetStartError(RuntimeError):
    """A model could not get its first replicas running; the message names it and why."""


@dataclass
class _ModelState:
    deployment: ModelDeployment
    autoscaler: Autoscaler
    replicas: list[ReplicaHandle] = field(default_factory=list)
    ids: itertools.count = field(default_factory=itertools.count)
    backoff_s: float = 0.0
    next_start_at: float = 0.0
    last_error: str = ""
    ever_ready: bool = False
    # Why no replica of this model can ever be placed on this (fixed-size) cluster; no
    # start is tried then. On a cluster that may grow it is only warned about, once.
    unplaceable: str = ""
    placement_warned: bool = False
    last_decision: Optional[ScalingDecision] = None
    # Counters for the metrics: replica starts, and stops by reason.
    starts: int = 0
    stops: Counter = field(default_factory=Counter)

    def in_state(self, *states: ReplicaState) -> list[ReplicaHandle]:
        return [r for r in self.replicas if r.state in states]


@dataclass(frozen=True)
class ModelSnapshot:
    """One model's numbers after the last round (for metrics, tests and progress)."""

    name: str
    ready: tuple[str, ...]      # replica ids
    addresses: tuple[str, ...]  # their addresses, same order
    starting: int
    draining: int
    decision: Optional[ScalingDecision]
    starts: int
    stops: dict[str, int]
    last_error: str


class Controller:
    """See the module docstring. `store` receives the replicas (MemoryStore in
    `lmfleet serve`, RedisStore for a shared fleet); `clock` is for tests.
    `cluster_can_grow`: False for a Ray cluster this process started (its nodes are all
    there is), so a model no node can hold fails at once instead of waiting for resources
    a joined, autoscaled cluster might still add."""

    def __init__(self, config: FleetConfig, store: StateStore, clock=time.monotonic,
                 cluster_can_grow: bool = True) -> None:
        self.config = config
        self.cluster_can_grow = cluster_can_grow
        self.settings = config.controller
        self.store = store
        self._clock = clock
        self._models = {d.name: _ModelState(d, Autoscaler(d.name, d.autoscaling, clock))
                        for d in config.models}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()  # guards _snapshot
        self._snapshot: dict[str, ModelSnapshot] = {}
        self._round_done = threading.Condition(self._lock)
        self._store_down = False
        # Models not ready when wait_ready returned ({model: why}); served without.
        self.start_failures: dict[str, str] = {}

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> Controller:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmfleet-controller",
                                            daemon=True)
            self._thread.start()
        return self

    def wait_ready(self, timeout_s: float,
                   on_failure: Callable[[str, str], None] = lambda model, why: None) -> None:
        """Block until every model has min_replicas READY replicas or has failed before
        it ever had one (a replica's start failed, or none can be placed); each failure
        is passed to `on_failure(model, why)` as soon as it is seen. The models not ready
        then are left in `start_failures` ({model: why}, those still starting after
        `timeout_s` included), for the caller to serve without. Raises FleetStartError
        when every model failed, and TimeoutError when none is ready after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        failed: dict[str, str] = {}
        while True:
            snapshot = self.snapshot()
            waiting, ready = [], []
            for state in self._models.values():
                name = state.deployment.name
                model = snapshot.get(name)
                num_ready = len(model.ready) if model else 0
                if num_ready >= state.deployment.autoscaling.min_replicas:
                    ready.append(name)
                elif name in failed:
                    pass
                elif model and model.last_error and not state.ever_ready:
                    failed[name] = model.last_error
                    on_failure(name, model.last_error)
                else:
                    waiting.append(name)
            if not waiting or time.monotonic() > deadline:
                if not ready:
                    if waiting:
                        raise TimeoutError(f"models not ready within {timeout_s:.0f} s: "
                                           f"{', '.join(waiting)}")
                    raise FleetStartError("; ".join(f"model '{name}': {why}"
                                                    for name, why in failed.items()))
                failed.update({name: f"not ready within {timeout_s:.0f} s"
                               for name in waiting})
                self.start_failures = {n: failed[n] for n in failed if n not in ready}
                return
            with self._round_done:
                self._round_done.wait(0.5)

    def stop(self, drain_timeout_s: Optional[float] = None) -> None:
        """Stop the loop, then drain every replica (bounded) and kill them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60.0)
            self._thread = None
        timeout = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        replicas = [r for s in self._models.values() for r in s.replicas
                    if r.state is not ReplicaState.STOPPED]
        for replica in replicas:
            self._withdraw(replica)
            if replica.state is ReplicaState.READY:
                replica.begin_drain(timeout)
        deadline = time.monotonic() + timeout + _STOP_GRACE_S
        while time.monotonic() < deadline and not all(
                r.drained() for r in replicas if r.state is ReplicaState.DRAINING):
            time.sleep(0.05)
        for replica in replicas:
            replica.begin_shutdown(grace_s=1.0)
        deadline = time.monotonic() + _STOP_GRACE_S + 1.0
        while time.monotonic() < deadline and not all(r.shutdown_done() for r in replicas):
            time.sleep(0.05)
        for replica in replicas:
            replica.kill("controller stopped")

    def snapshot(self) -> dict[str, ModelSnapshot]:
        with self._lock:
            return dict(self._snapshot)

    def replicas(self, model: str) -> list[ReplicaHandle]:
        """The model's replicas that are not stopped (for tests: their actors)."""
        return [r for r in self._models[model].replicas if r.state is not ReplicaState.STOPPED]

    def wait_round(self, timeout_s: float = 5.0) -> None:
        """Wait for the end of the next round."""
        with self._round_done:
            self._round_done.wait(timeout_s)

    # ---- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.reconcile_once()
            except Exception:  # a bug must not end the fleet's care
                logger.exception("controller round failed")
            self._stop.wait(max(0.0, self.settings.reconcile_interval_s
                                - (time.monotonic() - started)))

    def reconcile_once(self) -> None:
        """One round over every model (see the module docstring)."""
        for state in self._models.values():
            self._poll_starting(state)
            self._check_live(state)
            self._finish_drains(state)
            self._scale(state)
        self._publish_snapshot()

    def _poll_starting(self, state: _ModelState) -> None:
        for replica in state.in_state(ReplicaState.STARTING):
            error = replica.poll_start(self.settings.start_timeout_s)
            if error is not None:
                logger.error("model %s: replica %s failed to start: %s", state.deployment.name,
                             replica.replica_id, error)
                state.last_error = error
                state.backoff_s = min(_MAX_BACKOFF_S, max(self.settings.restart_backoff_s,
                                                          2 * state.backoff_s))
                state.next_start_at = self._clock() + state.backoff_s
                self._drop(state, replica, "start_failed")
            elif replica.state is ReplicaState.READY:
                logger.info("model %s: replica %s ready on %s (%.1f s)", state.deployment.name,
                            replica.replica_id, replica.address,
                            self._clock() - replica.started_at)
                state.ever_ready, state.backoff_s, state.last_error = True, 0.0, ""

    def _check_live(self, state: _ModelState) -> None:
        live = state.in_state(ReplicaState.READY, ReplicaState.DRAINING)
        for replica in live:
            reason = replica.death()
            if reason is not None:
                logger.warning("model %s: replica %s on %s died: %s", state.deployment.name,
                               replica.replica_id, replica.address, reason)
                # One that was draining was on its way out: it is not replaced.
                self._drop(state, replica, "scale_in" if replica.state is ReplicaState.DRAINING
                           else "died")
        ready = state.in_state(ReplicaState.READY)
        for replica in ready:
            replica.begin_health_check(self.settings.health_check_timeout_s)
        for replica in ready:
            result = replica.finish_health_check()
            if replica.failures >= self.settings.unhealthy_after:
                logger.warning("model %s: replica %s failed %d health checks in a row (%s); "
                               "replacing it", state.deployment.name, replica.replica_id,
                               replica.failures, result.error)
                self._drop(state, replica, "unhealthy")
            else:
                self._heartbeat(replica, result.ok)

    def _finish_drains(self, state: _ModelState) -> None:
        for replica in state.in_state(ReplicaState.DRAINING):
            if replica.drained():
                replica.begin_shutdown(grace_s=1.0)
                if replica.shutdown_done():
                    logger.info("model %s: replica %s drained and stopped",
                                state.deployment.name, replica.replica_id)
                    replica.kill("scaled in")
                    state.stops["scale_in"] += 1
        state.replicas = [r for r in state.replicas if r.state is not ReplicaState.STOPPED]

    def _scale(self, state: _ModelState) -> None:
        if state.unplaceable:
            return
        ready = [r for r in state.in_state(ReplicaState.READY) if r.last_load is not None]
        loads = [ReplicaLoad(r.replica_id, r.last_load.num_running, r.last_load.num_waiting,
                             r.last_load.kv_cache_usage) for r in ready]
        num_starting = len(state.in_state(ReplicaState.STARTING))
        num_unpolled = len(state.in_state(ReplicaState.READY)) - len(ready)
        decision = state.autoscaler.decide(loads, num_starting + num_unpolled)
        state.last_decision = decision
        if decision.num_to_start or decision.num_to_stop:
            fields = decision.as_log_fields()
            logger.info("autoscaler model=%s %s: %s", fields.pop("model"), decision.reason,
                        " ".join(f"{k}={v}" for k, v in fields.items()))
        if decision.num_to_start and self._clock() >= state.next_start_at:
            for _ in range(decision.num_to_start):
                self._start_replica(state)
        for replica in sorted(ready, key=_load_of)[:decision.num_to_stop]:
            logger.info("model %s: draining replica %s (%s)", state.deployment.name,
                        replica.replica_id, decision.reason)
            self._withdraw(replica)
            replica.begin_drain(self.settings.drain_timeout_s)

    # ---- helpers -------------------------------------------------------------------------
    def _start_replica(self, state: _ModelState) -> None:
        if state.unplaceable or not self._placeable(state):
            return
        replica_id = f"{state.deployment.name}-{next(state.ids)}"
        replica = ReplicaHandle(replica_id, state.deployment, self._clock)
        try:
            replica.launch(self.settings.replica_host)
        except Exception as error:  # noqa: BLE001 (Ray refused: reported like a failed start)
            state.last_error = f"could not create the replica: {error}"
            logger.error("model %s: %s", state.deployment.name, state.last_error)
            state.next_start_at = self._clock() + max(self.settings.restart_backoff_s,
                                                      state.backoff_s)
            return
        state.replicas.append(replica)
        state.starts += 1
        logger.info("model %s: starting replica %s", state.deployment.name, replica_id)

    def _placeable(self, state: _ModelState) -> bool:
        """False when no node of this fixed-size cluster can hold a replica (the model is
        then marked unplaceable, with why). On a cluster that can grow, warns once and
        says True: the placement group waits for the resources."""
        import ray

        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        reason = unplaceable_reason(state.deployment.placement, nodes)
        if reason is None:
            return True
        name = state.deployment.name
        if self.cluster_can_grow:
            if not state.placement_warned:
                state.placement_warned = True
                logger.warning("model %s: %s; waiting for the cluster to grow", name, reason)
            return True
        state.unplaceable = state.last_error = reason
        logger.info("model %s: %s", name, reason)  # reported by wait_ready's caller
        return False

    def _drop(self, state: _ModelState, replica: ReplicaHandle, reason: str) -> None:
        self._withdraw(replica)
        replica.kill(reason)
        state.stops[reason] += 1
        if reason in _REPLACED:  # the fleet keeps its size: a replacement starts now
            self._start_replica(state)

    def _heartbeat(self, replica: ReplicaHandle, healthy: bool) -> None:
        load = load_summary(replica.last_load) if replica.last_load is not None else {}
        record = ReplicaRecord(replica.replica_id, replica.model, replica.address,
                               healthy=healthy, load=load)
        self._store_call(self.store.heartbeat, record, self.settings.replica_ttl_s)

    def _withdraw(self, replica: ReplicaHandle) -> None:
        if replica.address is not None:
            self._store_call(self.store.remove, replica.model, replica.replica_id)

    def _store_call(self, method, *args) -> None:
        try:
            method(*args)
        except StateStoreError as error:
            if not self._store_down:
                logger.warning("state store %s unavailable (%s); records expire or are "
                               "republished when it returns", self.store, error)
            self._store_down = True
        else:
            if self._store_down:
                logger.warning("state store %s is back", self.store)
            self._store_down = False

    def _publish_snapshot(self) -> None:
        snapshot = {}
        for name, state in self._models.items():
            ready = state.in_state(ReplicaState.READY)
            snapshot[name] = ModelSnapshot(
                name=name, ready=tuple(r.replica_id for r in ready),
                addresses=tuple(r.address for r in ready),
                starting=len(state.in_state(ReplicaState.STARTING)),
                draining=len(state.in_state(ReplicaState.DRAINING)),
                decision=state.last_decision, starts=state.starts, stops=dict(state.stops),
                last_error=state.last_error)
        with self._round_done:
            self._snapshot = snapshot
            self._round_done.notify_all()


def _load_of(replica: ReplicaHandle) -> int:
    load = replica.last_load
    return 0 if load is None else load.num_running + load.num_waiting
