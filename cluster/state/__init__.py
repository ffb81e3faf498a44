"""The state store shared by routers and the controller.

    from lmfleet.cluster.state import open_store
    store = open_store("redis://127.0.0.1:6379", cluster="prod")   # or "memory://"

See base.py for the contract, keys.py for the key layout, memory.py and redis_store.py
for the two implementations.
"""

from __future__ import annotations

from lmfleet.cluster.state.base import (
    DEFAULT_CLUSTER,
    ReplicaRecord,
    StateStore,
    StateStoreError,
    StateStoreUnavailable,
)
from lmfleet.cluster.state.memory import MemoryStore
from lmfleet.cluster.state.redis_store import URL_SCHEMES, RedisStore

MEMORY_URL = "memory://"


def open_store(url: str, cluster: str = DEFAULT_CLUSTER) -> StateStore:
    """A store from a URL: "memory://" (a new in-process MemoryStore) or a Redis URL
    ("redis://HOST:PORT[/DB]", "rediss://...", "unix:///path"). ValueError otherwise."""
    if url == MEMORY_URL:
        return MemoryStore(cluster)
    if isinstance(url, str) and url.startswith(URL_SCHEMES):
        return RedisStore(url, cluster)
    raise ValueError(f"state store URL {url!r} must be {MEMORY_URL} or start with "
                     f"{', '.join(URL_SCHEMES)}")


__all__ = ["DEFAULT_CLUSTER", "MEMORY_URL", "MemoryStore", "RedisStore", "ReplicaRecord",
           "StateStore", "StateStoreError", "StateStoreUnavailable", "open_store"]
