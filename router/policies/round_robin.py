"""Round-robin routing: candidates in turn, one cursor per model.

The cursor counts selections; candidate `cursor % len(candidates)` is chosen. When the
candidate list shrinks (a replica is unhealthy or already tried) the rotation continues
over what is left, so no replica is starved but strict alternation is not promised then.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from lmfleet.router.policies.base import R, RouteRequest


class RoundRobinPolicy:
    name = "round_robin"

    def __init__(self) -> None:
        self._cursor = 0

    def select(self, replicas: Sequence[R], request: RouteRequest) -> Optional[R]:
        if not replicas:
            return None
        chosen = replicas[self._cursor % len(replicas)]
        self._cursor += 1
        return chosen
