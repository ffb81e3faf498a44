"""`RedisStore`: the state store shared by several routers and the controller, on Redis.

Key layout and expiry: keys.py. In short, each replica is one key holding its record as
JSON with the heartbeat TTL as the key's own TTL (SET ... PX), listed through a per-model
set of replica ids and a set of models; sessions and KV hints are one key each, with
their TTL. Expiry is therefore Redis's clock alone: publishers and readers on machines
with skewed clocks still agree on what is live.

Atomicity: `register` writes the record and both index entries in one MULTI/EXEC, and
listing runs as one Lua script that reads the records and prunes expired ids (and empty
models) from the indexes, so a listing never races a concurrent heartbeat into dropping
a live replica from its index.

Failure: every call is bounded by `socket_timeout` / `socket_connect_timeout` and retried
once at once (a pooled connection goes stale when Redis restarts); after that a connection
problem raises StateStoreUnavailable and other Redis errors StateStoreError. Redis may
come and go: the client reconnects on the next call, and heartbeats republish replicas
into a Redis that restarted empty.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Optional, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lmfleet.cluster.state.base import (
    DEFAULT_CLUSTER,
    ReplicaRecord,
    StateStore,
    StateStoreError,
    StateStoreUnavailable,
    check_name,
    check_ttl,
)
from lmfleet.cluster.state.keys import KeyLayout, encode

logger = logging.getLogger(__name__)

URL_SCHEMES = ("redis://", "rediss://", "unix://")
# The password when the URL carries none: in Kubernetes it comes from a Secret as an
# environment variable, so it is neither in the pod's command line nor in logged URLs.
PASSWORD_ENV = "LMFLEET_REDIS_PASSWORD"
T = TypeVar("T")

# KEYS[1]: the models set. ARGV[1]: the cluster namespace; ARGV[2]: one encoded model name,
# or "" for every model. Returns the JSON of every live record; drops expired ids from
# their model's index and models without ids from the models set.
_LIST_SCRIPT = """
local namespace = ARGV[1]
local models
if ARGV[2] ~= '' then models = {ARGV[2]} else models = redis.call('SMEMBERS', KEYS[1]) end
local records = {}
for _, model in ipairs(models) do
  local index = namespace .. 'replicas:' .. model
  for _, id in ipairs(redis.call('SMEMBERS', index)) do
    local record = redis.call('GET', namespace .. 'replica:' .. model .. ':' .. id)
    if record then
      records[#records + 1] = record
    else
      redis.call('SREM', index, id)
    end
  end
  if redis.call('SCARD', index) == 0 then redis.call('SREM', KEYS[1], model) end
end
return records
"""


class RedisStore(StateStore):
    """A StateStore on the Redis server at `url` ("redis://HOST:PORT[/DB]", "rediss://..."
    with TLS, "unix:///path.sock"); see the module docstring. Connects lazily: creating
    one never fails for an unreachable server, the first call does."""

    def __init__(self, url: str, cluster: str = DEFAULT_CLUSTER, socket_timeout: float = 1.0,
                 socket_connect_timeout: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        check_name("cluster", cluster)
        if not isinstance(url, str) or not url.startswith(URL_SCHEMES):
            raise ValueError(f"Redis URL {url!r} must start with one of "
                             f"{', '.join(URL_SCHEMES)}")
        if socket_timeout <= 0 or socket_connect_timeout <= 0:
            raise ValueError("socket timeouts must be positive")
        self.url = url
        self.cluster = cluster
        self._keys = KeyLayout(cluster)
        self._clock = clock
        # A password in the URL wins over the environment's (redis-py's from_url order).
        self._client = redis.Redis.from_url(
            url, password=os.environ.get(PASSWORD_ENV) or None,
            decode_responses=True, socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            retry=Retry(NoBackoff(), retries=1))
        self._list_script = self._client.register_script(_LIST_SCRIPT)

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, cluster={self.cluster!r})"

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise StateStoreUnavailable(f"Redis at {self.url} is unavailable ({what}): "
                                        f"{error}") from error
        except redis.RedisError as error:
            raise StateStoreError(f"Redis at {self.url} failed ({what}): {error}") from error

    def ping(self) -> None:
        """Raises StateStoreUnavailable unless the server answers."""
        self._call("ping", self._client.ping)

    # ---- replicas -----------------------------------------------------------------------
    def register(self, record: ReplicaRecord, ttl_s: float) -> ReplicaRecord:
        if not isinstance(record, ReplicaRecord):
            raise ValueError(f"expected a ReplicaRecord, got {type(record).__name__}")
        ttl_ms = _milliseconds(check_ttl(ttl_s))
        stored = record.stamped(self._clock(), float(ttl_s))

        def write() -> None:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._keys.replica(record.model, record.replica_id),
                         stored.to_json(), px=ttl_ms)
                pipe.sadd(self._keys.replica_index(record.model), encode(record.replica_id))
                pipe.sadd(self._keys.models, encode(record.model))
                pipe.execute()

        self._call("register", write)
        return stored

    def remove(self, model: str, replica_id: str) -> bool:
        check_name("model", model)
        check_name("replica_id", replica_id)

        def delete() -> int:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._keys.replica(model, replica_id))
                pipe.srem(self._keys.replica_index(model), encode(replica_id))
                return pipe.execute()[0]

        return self._call("remove", delete) > 0

    def list_replicas(self, model: Optional[str] = None) -> list[ReplicaRecord]:
        if model is not None:
            check_name("model", model)
        args = [self._keys.namespace, "" if model is None else encode(model)]
        values = self._call("list", lambda: self._list_script(keys=[self._keys.models],
                                                               args=args))
        records = []
        for value in values:
            try:
                records.append(ReplicaRecord.from_json(value))
            except ValueError as error:  # written by something else; never fatal
                logger.warning("skipping a malformed replica record in %s: %s", self, error)
        return sorted(records, key=lambda r: (r.model, r.replica_id))

    # ---- sessions and KV hints ----------------------------------------------------------
    def set_session(self, model: str, session_id: str, replica_id: str,
                    ttl_s: float) -> None:
        self._put("set_session", self._keys.session(model, session_id), replica_id, ttl_s)

    def get_session(self, model: str, session_id: str) -> Optional[str]:
        key = self._keys.session(model, session_id)
        return self._call("get_session", lambda: self._client.get(key))

    def put_kv_hint(self, model: str, session_id: str, replica_id: str,
                    ttl_s: float) -> None:
        self._put("put_kv_hint", self._keys.kv_hint(model, session_id), replica_id, ttl_s)

    def get_kv_hint(self, model: str, session_id: str) -> Optional[str]:
        key = self._keys.kv_hint(model, session_id)
        return self._call("get_kv_hint", lambda: self._client.get(key))

    def _put(self, what: str, key: str, replica_id: str, ttl_s: float) -> None:
        check_name("replica_id", replica_id)
        ttl_ms = _milliseconds(check_ttl(ttl_s))
        self._call(what, lambda: self._client.set(key, replica_id, px=ttl_ms))

    def close(self) -> None:
        self._client.close()


def _milliseconds(ttl_s: float) -> int:
    # Never 0: PX 0 is an error in Redis, and a positive TTL must keep the key a moment.
    return max(1, round(ttl_s * 1000))
