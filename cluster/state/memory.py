"""`MemoryStore`: the state store inside one process (the embedded default).

Everything lives in dictionaries keyed by the same keys `RedisStore` uses (keys.py), each
entry with its expiry time on the store's clock; expired entries are dropped when they are
read and, for sessions and hints, by a sweep every `SWEEP_EVERY` writes, so memory stays
bounded by what is live. One lock makes every call atomic and the store thread-safe.

`clock` (default `time.time`) is injectable so tests can move time by hand. Stores for
other clusters over the same data: `store.for_cluster(name)`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Optional

from lmfleet.cluster.state.base import (
    DEFAULT_CLUSTER,
    ReplicaRecord,
    StateStore,
    check_name,
    check_ttl,
)
from lmfleet.cluster.state.keys import KeyLayout, encode

Clock = Callable[[], float]
SWEEP_EVERY = 1024


class _Keyspace:
    """The data shared by the MemoryStores of every cluster of one process."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        # key -> (value, expires_at on `clock`)
        self.records: dict[str, tuple[ReplicaRecord, float]] = {}
        self.values: dict[str, tuple[str, float]] = {}
        self.writes_since_sweep = 0


class MemoryStore(StateStore):
    """A thread-safe in-process StateStore; see the module docstring."""

    def __init__(self, cluster: str = DEFAULT_CLUSTER, clock: Clock = time.time,
                 _keyspace: Optional[_Keyspace] = None) -> None:
        check_name("cluster", cluster)
        self.cluster = cluster
        self._keys = KeyLayout(cluster)
        self._space = _keyspace or _Keyspace(clock)

    def for_cluster(self, cluster: str) -> MemoryStore:
        """A store of another cluster over the same data (and clock)."""
        return MemoryStore(cluster, _keyspace=self._space)

    def __repr__(self) -> str:
        return f"MemoryStore(cluster={self.cluster!r})"

    # ---- replicas -----------------------------------------------------------------------
    def register(self, record: ReplicaRecord, ttl_s: float) -> ReplicaRecord:
        if not isinstance(record, ReplicaRecord):
            raise ValueError(f"expected a ReplicaRecord, got {type(record).__name__}")
        ttl_s = check_ttl(ttl_s)
        space = self._space
        with space.lock:
            now = space.clock()
            stored = record.stamped(now, ttl_s)
            space.records[self._keys.replica(record.model, record.replica_id)] = (
                stored, now + ttl_s)
        return stored

    def remove(self, model: str, replica_id: str) -> bool:
        check_name("model", model)
        check_name("replica_id", replica_id)
        space = self._space
        with space.lock:
            entry = space.records.pop(self._keys.replica(model, replica_id), None)
            return entry is not None and entry[1] > space.clock()

    def list_replicas(self, model: Optional[str] = None) -> list[ReplicaRecord]:
        prefix = self._keys.namespace + "replica:"
        if model is not None:
            check_name("model", model)
            prefix += encode(model) + ":"
        space = self._space
        live: list[ReplicaRecord] = []
        with space.lock:
            now = space.clock()
            for key, (record, expires_at) in list(space.records.items()):
                if not key.startswith(prefix):
                    continue
                if expires_at <= now:
                    del space.records[key]
                else:
                    live.append(record)
        return sorted(live, key=lambda r: (r.model, r.replica_id))

    # ---- sessions and KV hints ----------------------------------------------------------
    def set_session(self, model: str, session_id: str, replica_id: str,
                    ttl_s: float) -> None:
        self._put(self._keys.session(model, session_id), replica_id, ttl_s)

    def get_session(self, model: str, session_id: str) -> Optional[str]:
        return self._get(self._keys.session(model, session_id))

    def put_kv_hint(self, model: str, session_id: str, replica_id: str,
                    ttl_s: float) -> None:
        self._put(self._keys.kv_hint(model, session_id), replica_id, ttl_s)

    def get_kv_hint(self, model: str, session_id: str) -> Optional[str]:
        return self._get(self._keys.kv_hint(model, session_id))

    def _put(self, key: str, replica_id: str, ttl_s: float) -> None:
        check_name("replica_id", replica_id)
        ttl_s = check_ttl(ttl_s)
        space = self._space
        with space.lock:
            now = space.clock()
            space.values[key] = (replica_id, now + ttl_s)
            space.writes_since_sweep += 1
            if space.writes_since_sweep >= SWEEP_EVERY:
                space.writes_since_sweep = 0
                for stale in [k for k, (_, t) in space.values.items() if t <= now]:
                    del space.values[stale]

    def _get(self, key: str) -> Optional[str]:
        space = self._space
        with space.lock:
            entry = space.values.get(key)
            if entry is None:
                return None
            if entry[1] <= space.clock():
                del space.values[key]
                return None
            return entry[0]
