"""The routing-policy interface: `select(replicas, request) -> replica | None`.

A policy is a small object owned by one model's replica set. The router calls `select`
for every attempt of every request, on the event loop (no locking needed), with only the
candidates it may use: healthy, not draining, and not already tried by this request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Protocol, TypeVar


class ReplicaView(Protocol):
    """What a policy may read about a replica (replicas.Replica provides it; tests use
    plain records)."""

    @property
    def address(self) -> str: ...

    @property
    def in_flight(self) -> int:
        """Requests this router has sent to the replica and not seen finish."""

    @property
    def reported_load(self) -> int:
        """Running + waiting requests in the replica's last LoadReport (0 before one)."""


R = TypeVar("R", bound=ReplicaView)


@dataclass(frozen=True)
class RouteRequest:
    """The parts of a request a policy may look at."""

    model: str
    session_id: Optional[str] = None


class Policy(Protocol):
    """Chooses the replica for one attempt of a request.

    Contract: `replicas` lists the eligible candidates (possibly none) in a stable order,
    the replica set's; `select` returns one of them, or None only when the list is
    empty. It must not block, must be deterministic given its own state and its
    inputs, and may keep state (a round-robin cursor, session bindings) across calls.
    """

    name: str

    def select(self, replicas: Sequence[R], request: RouteRequest) -> Optional[R]: ...


def load_score(replica: ReplicaView) -> int:
    """Least-loaded score: this router's in-flight requests plus the replica's reported
    queue. The two overlap (our requests are also in the report), which only weights this
    router's own recent choices more; it keeps a burst from piling onto one replica
    before the next load report arrives."""
    return replica.in_flight + replica.reported_load
