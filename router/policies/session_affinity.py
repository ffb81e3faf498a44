"""Session affinity: every turn of a chat session goes to the replica that served it
before, so the replica can reuse the session's KV.

Parameters:
- `fallback`: the policy for a session's first turn, for requests without a session_id,
  and when the bound replica is not a candidate (unhealthy, draining or already tried);
  least-loaded by default. The session is then re-bound to the fallback's choice.
- `max_sessions` (default 100_000) and `ttl_seconds` (default 3600): bindings are kept in
  LRU order; the least recently used is dropped beyond `max_sessions`, and a binding idle
  longer than the TTL is ignored (the replica will have evicted the KV by then anyway).

Bindings live in this router's memory; several routers share them through the state
store (cluster/state.py) instead.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Optional

from lmfleet.router.policies.base import Policy, R, RouteRequest
from lmfleet.router.policies.least_loaded import LeastLoadedPolicy


class SessionAffinityPolicy:
    name = "session_affinity"

    def __init__(self, fallback: Optional[Policy] = None, max_sessions: int = 100_000,
                 ttl_seconds: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_sessions < 1 or ttl_seconds <= 0:
            raise ValueError("max_sessions must be >= 1 and ttl_seconds > 0")
        self.fallback: Policy = fallback or LeastLoadedPolicy()
        self._max_sessions = max_sessions
        self._ttl_seconds = ttl_seconds
        self._clock = clock
        # session_id -> (replica address, time of last use); most recently used last.
        self._bindings: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def bound_address(self, session_id: str) -> Optional[str]:
        """The replica address a live binding points at, if any."""
        binding = self._bindings.get(session_id)
        if binding is None or self._clock() - binding[1] > self._ttl_seconds:
            return None
        return binding[0]

    def select(self, replicas: Sequence[R], request: RouteRequest) -> Optional[R]:
        session_id = request.session_id
        if session_id is None:
            return self.fallback.select(replicas, request)
        address = self.bound_address(session_id)
        chosen = next((r for r in replicas if r.address == address), None)
        if chosen is None:
            chosen = self.fallback.select(replicas, request)
        if chosen is not None:
            self._bindings[session_id] = (chosen.address, self._clock())
            self._bindings.move_to_end(session_id)
            while len(self._bindings) > self._max_sessions:
                self._bindings.popitem(last=False)
        return chosen
