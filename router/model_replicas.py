"""One model's replicas as the router sees them: each worker (`Replica`: address, model
info, stub, in-flight count, last load, health), the model they serve together
(`ModelReplicas`: tokenizer, routing policy, admission) and how the next attempt of a
request picks one, keeping a session on its replica through a shared `SessionDirectory`.
The registry that keeps these up to date is router/replicas.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Protocol

from lmfleet.proto.v1 import worker_pb2, worker_pb2_grpc
from lmfleet.router.admission import Admission
from lmfleet.router.policies import Policy, RouteRequest, SessionAffinityPolicy
from lmfleet.router.tokenizer import ModelTokenizer

logger = logging.getLogger(__name__)


@dataclass
class Replica:
    """One worker as the router sees it.

    replica_id: its name in the state store (the address for static workers).
    published_healthy: health as its publisher last reported it in the store (True for
        static workers); the router's own load polls set `healthy`.
    """

    address: str
    info: worker_pb2.ModelInfo
    stub: worker_pb2_grpc.WorkerStub
    in_flight: int = 0
    load: Optional[worker_pb2.LoadReport] = None
    healthy: bool = True
    replica_id: str = ""
    published_healthy: bool = True

    def __post_init__(self) -> None:
        self.replica_id = self.replica_id or self.address

    @property
    def model_name(self) -> str:
        return self.info.model_name

    @property
    def reported_load(self) -> int:
        return 0 if self.load is None else self.load.num_running + self.load.num_waiting

    @property
    def eligible(self) -> bool:
        """May take new requests: healthy (by our polls and its publisher) and not
        draining."""
        return (self.healthy and self.published_healthy
                and not (self.load is not None and self.load.draining))


class SessionDirectory(Protocol):
    """Session -> replica bindings shared by several routers (the state store). Both
    calls are best effort: a lookup that cannot be answered returns None."""

    async def get_session(self, model: str, session_id: str) -> Optional[str]:
        """The replica_id the session is bound to, or None."""

    async def set_session(self, model: str, session_id: str, replica_id: str) -> None:
        """Bind the session to the replica (restarting the binding's TTL)."""


@dataclass
class ModelReplicas:
    """The replicas serving one model name, with the model's tokenizer, policy and
    admission control."""

    name: str
    tokenizer: ModelTokenizer
    policy: Policy
    admission: Admission
    replicas: list[Replica] = field(default_factory=list)
    max_model_len: int = 0
    vocab_size: int = 0
    sessions: Optional[SessionDirectory] = None

    def __post_init__(self) -> None:
        # A session_id always routes with affinity; the model's policy picks a session's
        # first replica and serves requests without a session.
        self.affinity = (self.policy if isinstance(self.policy, SessionAffinityPolicy)
                         else SessionAffinityPolicy(fallback=self.policy))

    def add(self, replica: Replica) -> None:
        if self.replicas and replica.info.max_model_len != self.max_model_len:
            logger.warning("replicas of %s disagree on max_model_len (%d vs %d); using the "
                           "smaller", self.name, replica.info.max_model_len, self.max_model_len)
        lengths = [r.info.max_model_len for r in self.replicas] + [replica.info.max_model_len]
        self.max_model_len = min(lengths)
        self.vocab_size = replica.info.vocab_size
        self.replicas.append(replica)

    def remove(self, replica: Replica) -> None:
        """Stop routing to `replica` (requests it serves now finish normally)."""
        self.replicas = [r for r in self.replicas if r is not replica]
        if self.replicas:
            self.max_model_len = min(r.info.max_model_len for r in self.replicas)

    @property
    def num_healthy(self) -> int:
        return sum(1 for r in self.replicas if r.eligible)

    def select(self, request: RouteRequest, exclude: Sequence[str] = ()) -> Optional[Replica]:
        """The replica for the next attempt of `request`, skipping addresses in `exclude`
        (already tried); None when no eligible replica is left."""
        candidates = [r for r in self.replicas if r.eligible and r.address not in exclude]
        policy = self.affinity if request.session_id is not None else self.policy
        return policy.select(candidates, request)

    async def select_for(self, request: RouteRequest,
                         exclude: Sequence[str] = ()) -> Optional[Replica]:
        """`select`, with a session's binding read from and written to the shared
        `sessions` directory when one is attached: the replica bound there wins if it is
        a candidate; otherwise this router's own choice (local affinity, then the policy)
        is bound there. Without a directory or a session_id this is `select`."""
        session_id = request.session_id
        if self.sessions is None or session_id is None:
            return self.select(request, exclude)
        bound_id = await self.sessions.get_session(self.name, session_id)
        chosen = next((r for r in self.replicas if r.replica_id == bound_id and r.eligible
                       and r.address not in exclude), None)
        if chosen is None:
            chosen = self.select(request, exclude)
        if chosen is not None:
            await self.sessions.set_session(self.name, session_id, chosen.replica_id)
        return chosen
