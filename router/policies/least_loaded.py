"""Least-loaded routing: the replica with the smallest `load_score` (in-flight + reported
running + waiting). Ties go to the first candidate in the replica set's order, so the
choice is deterministic; in-flight counts rise at once on every choice, which spreads a
burst across equal replicas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from lmfleet.router.policies.base import R, RouteRequest, load_score


class LeastLoadedPolicy:
    name = "least_loaded"

    def select(self, replicas: Sequence[R], request: RouteRequest) -> Optional[R]:
        if not replicas:
            return None
        return min(replicas, key=load_score)  # min keeps the first of equal scores
