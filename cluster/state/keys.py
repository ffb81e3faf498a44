"""Key layout of the state store, shared by both implementations.

Every key of a cluster starts with `lmfleet:{CLUSTER}:`. The braces are literal: they are
a Redis Cluster hash tag, so all keys of one lmfleet cluster live in one slot and the
store's Lua scripts (which touch several keys) stay legal on a sharded Redis. Each
variable part (cluster, model, replica id, session id) is percent-encoded (`:`, `{`, `}`,
`%`, `/`, spaces ...), so names that contain `:` can never make two keys collide.

    lmfleet:{C}:models                  SET  of encoded model names that have had replicas
    lmfleet:{C}:replicas:M              SET  of encoded replica ids of model M (an index)
    lmfleet:{C}:replica:M:R             STRING  the ReplicaRecord as JSON, with the TTL
    lmfleet:{C}:session:M:S             STRING  replica id of session S, with the TTL
    lmfleet:{C}:kvhint:M:S              STRING  replica id holding S's KV, with the TTL

Only the record and session keys expire (Redis key TTLs); the two index sets do not, and
are pruned whenever they are read: an id whose record key has expired is dropped from
its model's set, and a model whose set is empty from `models`.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from lmfleet.cluster.state.base import check_name

PREFIX = "lmfleet"


def encode(part: str) -> str:
    return quote(part, safe="")


def decode(part: str) -> str:
    return unquote(part)


class KeyLayout:
    """The keys of one cluster."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.namespace = f"{PREFIX}:{{{encode(cluster)}}}:"

    @property
    def models(self) -> str:
        return self.namespace + "models"

    def replica_index(self, model: str) -> str:
        return f"{self.namespace}replicas:{encode(model)}"

    def replica(self, model: str, replica_id: str) -> str:
        return f"{self.namespace}replica:{encode(model)}:{encode(replica_id)}"

    def session(self, model: str, session_id: str) -> str:
        """Validates both names (ValueError), as every per-session key does."""
        check_name("model", model)
        check_name("session_id", session_id)
        return f"{self.namespace}session:{encode(model)}:{encode(session_id)}"

    def kv_hint(self, model: str, session_id: str) -> str:
        check_name("model", model)
        check_name("session_id", session_id)
        return f"{self.namespace}kvhint:{encode(model)}:{encode(session_id)}"
