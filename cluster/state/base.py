"""The state store: what several routers and the controller share.

Three kinds of state, all scoped to one *cluster* (a namespace, so several fleets can
share one Redis) and all expiring on their own, so a crashed writer leaves nothing behind:

- **Replicas per model.** A replica is published with `register(record, ttl_s)` and kept
  alive by calling `heartbeat(record, ttl_s)` more often than `ttl_s`; one not heartbeated
  within its TTL disappears from `list_replicas()` and `models()`. `remove()` withdraws it
  at once (after draining it, normally).
- **Session -> replica affinity** with a TTL: the replica a chat session was routed to, so
  every router sends the session's next turn to the same replica (whose KV it holds).
- **KV-location hints** with a TTL: the replica that holds a session's KV (for example
  after it was parked in host memory or moved), for placement decisions.

Implementations: `MemoryStore` (in-process, the embedded default) and `RedisStore` (the
shared one). Both are thread-safe; every call is synchronous and bounded (the Redis one
by its socket timeouts). A store that cannot be reached raises `StateStoreUnavailable`;
callers are expected to carry on from their last view and retry.
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Optional

DEFAULT_CLUSTER = "default"


class StateStoreError(Exception):
    """Base class of the store's own errors (bad input is a ValueError)."""


class StateStoreUnavailable(StateStoreError):
    """The store could not be reached (connection refused, timed out, lost)."""


@dataclass(frozen=True)
class ReplicaRecord:
    """One replica of a model as published in the store.

    replica_id: unique within the model; stable across heartbeats (and restarts of the
        same replica, if the publisher wants its sessions to follow it).
    model: the model name clients use (the worker's --model-name).
    address: the worker's gRPC address, "HOST:PORT".
    healthy: the publisher's last health check of the replica succeeded.
    load: a small summary of the replica's last LoadReport (num_running, num_waiting,
        kv_cache_usage, ...); numbers only, for the controller and for display.
    heartbeat_at: wall-clock time (time.time()) of the last register/heartbeat, set by the
        store's writer; informational (expiry does not compare clocks across machines).
    ttl_s: the TTL of the last register/heartbeat, set by the store.
    """

    replica_id: str
    model: str
    address: str
    healthy: bool = True
    load: Mapping[str, float] = field(default_factory=dict)
    heartbeat_at: float = 0.0
    ttl_s: float = 0.0

    def __post_init__(self) -> None:
        check_name("replica_id", self.replica_id)
        check_name("model", self.model)
        host, _, port = str(self.address).rpartition(":")
        if not isinstance(self.address, str) or not host or not port.isdigit():
            raise ValueError(f"replica address {self.address!r} is not HOST:PORT")
        load = dict(self.load)
        for key, value in load.items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"load[{key!r}] must be a finite number, got {value!r}")
        object.__setattr__(self, "load", load)
        object.__setattr__(self, "healthy", bool(self.healthy))

    def stamped(self, heartbeat_at: float, ttl_s: float) -> ReplicaRecord:
        return replace(self, heartbeat_at=heartbeat_at, ttl_s=ttl_s)

    def to_json(self) -> str:
        return json.dumps({"replica_id": self.replica_id, "model": self.model,
                           "address": self.address, "healthy": self.healthy,
                           "load": dict(self.load), "heartbeat_at": self.heartbeat_at,
                           "ttl_s": self.ttl_s}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ReplicaRecord:
        """Raises ValueError for anything but a record written by `to_json`."""
        try:
            data = json.loads(text)
            return cls(replica_id=data["replica_id"], model=data["model"],
                       address=data["address"], healthy=data["healthy"],
                       load=data.get("load", {}), heartbeat_at=float(data["heartbeat_at"]),
                       ttl_s=float(data["ttl_s"]))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
            raise ValueError(f"not a replica record: {error}") from None


def check_name(what: str, value: object) -> None:
    """Model names, replica ids, session ids and cluster names: non-empty strings."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def check_ttl(ttl_s: object) -> float:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not (
            math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")
    return float(ttl_s)


class StateStore(abc.ABC):
    """The shared state of one cluster. See the module docstring for the model.

    Contract common to every method: names (model, replica_id, session_id) are non-empty
    strings, TTLs positive seconds, else ValueError before any I/O; a store that cannot be
    reached raises StateStoreUnavailable and changes nothing it reports as done. Expiry is
    exact to the store's clock granularity (milliseconds for Redis): an entry written with
    `ttl_s` is visible for `ttl_s` seconds after the write and never after that.
    """

    cluster: str

    # ---- replicas -----------------------------------------------------------------------
    @abc.abstractmethod
    def register(self, record: ReplicaRecord, ttl_s: float) -> ReplicaRecord:
        """Publish (or replace) `record` under (record.model, record.replica_id) for
        `ttl_s` seconds. Returns the stored record, with heartbeat_at and ttl_s set."""

    def heartbeat(self, record: ReplicaRecord, ttl_s: float) -> ReplicaRecord:
        """Refresh a replica: the same upsert as `register` (health and load replaced, the
        TTL restarted), so a heartbeat after expiry, or after the store lost its data,
        publishes the replica again."""
        return self.register(record, ttl_s)

    @abc.abstractmethod
    def remove(self, model: str, replica_id: str) -> bool:
        """Withdraw a replica now. True if it was listed."""

    @abc.abstractmethod
    def list_replicas(self, model: Optional[str] = None) -> list[ReplicaRecord]:
        """Live replicas (of `model`, or of every model), sorted by (model, replica_id)."""

    def models(self) -> list[str]:
        """Names of the models with at least one live replica, sorted."""
        return sorted({record.model for record in self.list_replicas()})

    # ---- session affinity ---------------------------------------------------------------
    @abc.abstractmethod
    def set_session(self, model: str, session_id: str, replica_id: str,
                    ttl_s: float) -> None:
        """Bind a session of `model` to a replica for `ttl_s` seconds (replacing any
        binding; every call restarts the TTL)."""

    @abc.abstractmethod
    def get_session(self, model: str, session_id: str) -> Optional[str]:
        """The replica_id the session is bound to, or None (never bound or expired). The
        replica may have gone since: callers check it against the live replicas."""

    # ---- KV-location hints --------------------------------------------------------------
    @abc.abstractmethod
    def put_kv_hint(self, model: str, session_id: str, replica_id: str,
                    ttl_s: float) -> None:
        """Record that `replica_id` holds the KV of a session of `model`, for `ttl_s`."""

    @abc.abstractmethod
    def get_kv_hint(self, model: str, session_id: str) -> Optional[str]:
        """The replica_id last recorded as holding the session's KV, or None."""

    # ---- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 (optional hook: only networked stores need it)
        """Release connections (idempotent). The in-memory store keeps its contents."""

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
