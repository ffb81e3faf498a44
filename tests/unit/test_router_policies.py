"""Routing policies on plain replica records: exact choices."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lmfleet.proto.v1 import worker_pb2
from lmfleet.router.admission import Admission
from lmfleet.router.model_replicas import ModelReplicas, Replica
from lmfleet.router.policies import (
    LeastLoadedPolicy,
    RoundRobinPolicy,
    RouteRequest,
    SessionAffinityPolicy,
    make_policy,
)


@dataclass
class Rec:
    address: str
    in_flight: int = 0
    reported_load: int = 0


def request(session_id=None):
    return RouteRequest(model="m", session_id=session_id)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_least_loaded_picks_the_smallest_in_flight_plus_reported_load():
    a, b, c = Rec("a", in_flight=2, reported_load=1), Rec("b", 1, 1), Rec("c", 0, 4)
    assert LeastLoadedPolicy().select([a, b, c], request()) is b


def test_least_loaded_breaks_ties_by_order():
    a, b = Rec("a", 1, 0), Rec("b", 0, 1)
    assert LeastLoadedPolicy().select([a, b], request()) is a
    assert LeastLoadedPolicy().select([b, a], request()) is b


def test_policies_return_none_without_candidates():
    for policy in (LeastLoadedPolicy(), RoundRobinPolicy(), SessionAffinityPolicy()):
        assert policy.select([], request("s")) is None


def test_round_robin_cycles_through_candidates():
    a, b, c = Rec("a"), Rec("b"), Rec("c")
    policy = RoundRobinPolicy()
    chosen = [policy.select([a, b, c], request()).address for _ in range(5)]
    assert chosen == ["a", "b", "c", "a", "b"]


def test_affinity_keeps_a_session_on_its_replica_even_when_busier():
    a, b = Rec("a"), Rec("b")
    policy = SessionAffinityPolicy()
    assert policy.select([a, b], request("s1")) is a
    a.in_flight = 10
    assert policy.select([a, b], request("s1")) is a
    assert policy.select([a, b], request("s2")) is b  # a new session goes least-loaded


def test_affinity_rebinds_when_the_bound_replica_is_not_a_candidate():
    a, b = Rec("a"), Rec("b")
    policy = SessionAffinityPolicy()
    assert policy.select([a, b], request("s")) is a
    assert policy.select([b], request("s")) is b  # a unhealthy or already tried
    assert policy.select([a, b], request("s")) is b  # now bound to b
    assert policy.bound_address("s") == "b"


def test_affinity_bindings_expire_after_the_ttl():
    clock = FakeClock()
    a, b = Rec("a"), Rec("b", in_flight=0)
    policy = SessionAffinityPolicy(ttl_seconds=10, clock=clock)
    policy.select([a, b], request("s"))
    a.in_flight = 5
    clock.now = 9
    assert policy.select([a, b], request("s")) is a  # use refreshes the binding
    clock.now = 9 + 10.5
    assert policy.bound_address("s") is None
    assert policy.select([a, b], request("s")) is b


def test_affinity_drops_the_least_recently_used_session_beyond_its_capacity():
    a = Rec("a")
    policy = SessionAffinityPolicy(max_sessions=2)
    for session in ("s1", "s2", "s1", "s3"):
        policy.select([a], request(session))
    assert policy.bound_address("s1") == "a"
    assert policy.bound_address("s2") is None
    assert policy.bound_address("s3") == "a"


def test_affinity_without_a_session_uses_its_fallback():
    a, b = Rec("a"), Rec("b")
    policy = SessionAffinityPolicy(fallback=RoundRobinPolicy())
    assert [policy.select([a, b], request()).address for _ in range(3)] == ["a", "b", "a"]


def test_make_policy_knows_the_three_names_and_rejects_others():
    assert make_policy("least_loaded").name == "least_loaded"
    assert make_policy("round_robin").name == "round_robin"
    assert make_policy("session_affinity").name == "session_affinity"
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random")


def _model(policy) -> ModelReplicas:
    model = ModelReplicas(name="m", tokenizer=None, policy=policy,
                          admission=Admission("m"))
    for address in ("a", "b", "c"):
        info = worker_pb2.ModelInfo(model_name="m", max_model_len=64)
        model.add(Replica(address=address, info=info, stub=None))
    return model


def test_model_replicas_offer_only_healthy_not_draining_untried_replicas():
    model = _model(RoundRobinPolicy())
    model.replicas[0].healthy = False
    model.replicas[1].load = worker_pb2.LoadReport(draining=True)
    assert model.select(request()).address == "c"
    assert model.select(request(), exclude=["c"]) is None
    assert model.num_healthy == 1


def test_model_replicas_route_sessions_with_affinity_over_the_models_policy():
    model = _model(RoundRobinPolicy())
    assert model.select(request("chat-1")).address == "a"  # the round-robin's first pick
    assert [model.select(request("chat-1")).address for _ in range(3)] == ["a"] * 3
    assert [model.select(request()).address for _ in range(2)] == ["b", "c"]
