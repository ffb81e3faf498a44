"""Publishing a replica into the state store: `ReplicaPublisher`, used by whatever runs
replicas (the controller, a launcher, a test).

    store = RedisStore("redis://127.0.0.1:6379", cluster="prod")
    with ReplicaPublisher(store, "default", "10.0.0.7:50061", replica_id="default-0"):
        ...   # routers on that store route to the replica meanwhile

Every `interval_s` a background thread asks the worker for its load (GetLoad) and
heartbeats a `ReplicaRecord` with `ttl_s` (default three intervals, so one late or lost
heartbeat never makes the replica flap): `healthy` is whether GetLoad answered, `load`
a summary of the report (LOAD_FIELDS, plus `draining` as 0/1). An unhealthy replica is
still heartbeated, so routers see it as unhealthy rather than gone; if the publisher
itself dies, the record expires after `ttl_s`.

A store that is unavailable is retried on the next beat (one warning per outage); a
heartbeat after the store restarted empty publishes the replica again. `stop()` ends the
thread within one GetLoad/store call timeout and, by default, removes the record.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

import grpc

from lmfleet.cluster.state import ReplicaRecord, StateStore, StateStoreError
from lmfleet.proto.v1 import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)

# LoadReport fields copied into ReplicaRecord.load.
LOAD_FIELDS = ("num_running", "num_waiting", "num_swapped", "kv_cache_usage",
               "host_kv_cache_usage", "num_sessions", "generation_tokens_per_second")
_JOIN_TIMEOUT_S = 30.0


def load_summary(report: worker_pb2.LoadReport) -> dict[str, float]:
    """The numbers of a LoadReport that go into the store."""
    summary = {name: float(getattr(report, name)) for name in LOAD_FIELDS}
    summary["draining"] = 1.0 if report.draining else 0.0
    return summary


class ReplicaPublisher:
    """Keeps one replica published in `store` while it runs; see the module docstring.

    model: the model name the replica serves (its worker's --model-name).
    address: the worker's gRPC address, "HOST:PORT".
    replica_id: its name in the store (default: the address); unique within the model.
    """

    def __init__(self, store: StateStore, model: str, address: str,
                 replica_id: Optional[str] = None, interval_s: float = 1.0,
                 ttl_s: Optional[float] = None, rpc_timeout_s: float = 2.0) -> None:
        if interval_s <= 0 or rpc_timeout_s <= 0:
            raise ValueError("interval_s and rpc_timeout_s must be positive")
        ttl_s = 3 * interval_s if ttl_s is None else ttl_s
        if ttl_s <= interval_s:
            raise ValueError(f"ttl_s ({ttl_s}) must exceed interval_s ({interval_s}), or the "
                             "replica expires between heartbeats")
        # Validates model, address and replica_id before anything starts.
        ReplicaRecord(replica_id or address, model, address)
        self.store = store
        self.model = model
        self.address = address
        self.replica_id = replica_id or address
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.rpc_timeout_s = rpc_timeout_s
        self.last_record: Optional[ReplicaRecord] = None
        self._channel: Optional[grpc.Channel] = None
        self._lock = threading.Lock()  # publish_once may run beside the thread
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._store_down = False

    def __repr__(self) -> str:
        return f"ReplicaPublisher({self.model!r}, {self.replica_id!r} at {self.address})"

    def publish_once(self) -> ReplicaRecord:
        """Check the worker and heartbeat its record now; returns the stored record.
        Raises StateStoreUnavailable (or StateStoreError) when the store fails."""
        with self._lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(self.address)
            stub = worker_pb2_grpc.WorkerStub(self._channel)
        try:
            report = stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=self.rpc_timeout_s)
            record = ReplicaRecord(self.replica_id, self.model, self.address, healthy=True,
                                   load=load_summary(report))
        except grpc.RpcError as error:
            logger.debug("%s: GetLoad failed: %s", self, error)
            record = ReplicaRecord(self.replica_id, self.model, self.address, healthy=False)
        self.last_record = self.store.heartbeat(record, self.ttl_s)
        return self.last_record

    def start(self) -> ReplicaPublisher:
        """Publish once in the background and keep heartbeating (idempotent)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"publisher-{self.replica_id}")
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish_once()
                if self._store_down:
                    logger.warning("%s: state store %s is back", self, self.store)
                self._store_down = False
            except StateStoreError as error:
                if not self._store_down:
                    logger.warning("%s: cannot heartbeat (%s); retrying every %.1f s", self,
                                   error, self.interval_s)
                self._store_down = True
            except Exception:  # a bug must not silently end the heartbeats
                logger.exception("%s: heartbeat failed", self)
            self._stop.wait(self.interval_s)

    def stop(self, remove: bool = True) -> None:
        """Stop heartbeating; with `remove`, withdraw the record now (if the store is
        unavailable it simply expires after its TTL). Idempotent; `start()` may follow."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT_S)
            self._thread = None
        if remove:
            try:
                self.store.remove(self.model, self.replica_id)
            except StateStoreError as error:
                logger.warning("%s: could not remove the record (%s); it expires in %.1f s",
                               self, error, self.ttl_s)
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def __enter__(self) -> ReplicaPublisher:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
