"""Routing policies, one file each; `make_policy(name)` builds one by its CLI name."""

from __future__ import annotations

from lmfleet.router.policies.base import Policy, ReplicaView, RouteRequest, load_score
from lmfleet.router.policies.least_loaded import LeastLoadedPolicy
from lmfleet.router.policies.round_robin import RoundRobinPolicy
from lmfleet.router.policies.session_affinity import SessionAffinityPolicy

POLICY_NAMES = ("least_loaded", "round_robin", "session_affinity")
DEFAULT_POLICY = "least_loaded"


def make_policy(name: str) -> Policy:
    """A fresh policy instance; ValueError for an unknown name."""
    if name == "least_loaded":
        return LeastLoadedPolicy()
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "session_affinity":
        return SessionAffinityPolicy()
    raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


__all__ = ["Policy", "ReplicaView", "RouteRequest", "load_score", "LeastLoadedPolicy",
           "RoundRobinPolicy", "SessionAffinityPolicy", "POLICY_NAMES", "DEFAULT_POLICY",
           "make_policy"]
