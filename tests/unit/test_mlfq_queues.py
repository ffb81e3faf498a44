"""MLFQ queue mechanics on a fake clock: skip-join, priority, demotion, last-queue order,
starvation, order (set-up in scheduler_helpers.py)."""

from __future__ import annotations

import pytest

from lmfleet.worker.scheduler.cost_model import CostModel
from tests.unit.scheduler_helpers import (
    ids,
    level,
    make_request,
    make_scheduler,
    plan,
    run_step,
)

# ---- skip-join and priority ----------------------------------------------------------------


@pytest.mark.parametrize("num_tokens, expected", [
    (1, 0), (4, 0), (5, 1), (8, 1), (9, 2), (16, 2), (17, 3), (500, 3)])
def test_skip_join_starts_in_the_first_queue_whose_quantum_covers_the_prefill(
        num_tokens, expected):
    scheduler, _ = make_scheduler()
    request = make_request("a", num_tokens)
    assert scheduler.initial_level(request) == expected
    scheduler.add(request)
    assert level(scheduler, "a") == expected


def test_skip_join_counts_the_fixed_prefill_cost():
    cost = CostModel(prefill_base_s=3.0, prefill_per_token_s=1.0)
    scheduler, _ = make_scheduler(cost_model=cost)
    # 3 + 1 = 4 s fits Q0's quantum; 3 + 2 = 5 s does not.
    assert scheduler.initial_level(make_request("a", 1)) == 0
    assert scheduler.initial_level(make_request("b", 2)) == 1


def test_skip_join_counts_the_images_still_to_encode():
    from lmfleet.worker.model.vision.vision_info import ImageSpan

    cost = CostModel(prefill_base_s=0.0, prefill_per_token_s=0.1, image_encode_s=4.0)
    scheduler, _ = make_scheduler(cost_model=cost)
    request = make_request("a", 10)  # 1 s of tokens: Q0
    assert scheduler.initial_level(request) == 0
    request.image_spans = [ImageSpan(0, 4, b"x"), ImageSpan(5, 4, b"y")]
    assert scheduler.initial_level(request) == 2  # 1 + 2 x 4 = 9 s: past Q1's 8 s
    request.num_computed_tokens = 6  # the first image's KV is there (a prefix hit)
    assert scheduler.initial_level(request) == 1  # 0.4 + 4 s: past Q0's 4 s


def test_skip_join_estimates_only_the_tokens_not_computed_yet():
    scheduler, _ = make_scheduler()
    request = make_request("a", 14)
    request.num_computed_tokens = 12
    assert scheduler.initial_level(request) == 0


@pytest.mark.parametrize("priority, expected", [(0, 2), (1, 1), (2, 0), (5, 0), (-1, 3), (-9, 3)])
def test_priority_shifts_the_starting_queue_and_is_clamped(priority, expected):
    scheduler, _ = make_scheduler()
    scheduler.add(make_request("a", 10, priority=priority))  # 10 s of prefill: Q2
    assert level(scheduler, "a") == expected


def test_base_quantum_defaults_to_a_decode_step_of_a_half_full_batch():
    scheduler, _ = make_scheduler(base_quantum_s=None, max_num_seqs=8)
    # decode_base 0.5 + 4 sequences * 0.25 = 1.5 s
    assert [scheduler.quantum(i) for i in range(4)] == [1.5, 3.0, 6.0, 12.0]


# ---- demotion, round-robin, starvation, order --------------------------------------------------


def test_a_job_is_demoted_exactly_when_its_quantum_is_spent():
    scheduler, _ = make_scheduler()
    a = make_request("a", 3)
    scheduler.add(a)
    levels = []
    for seconds in (3, 1, 7, 1, 15, 1):
        scheduler.charge(a, seconds)
        levels.append(level(scheduler, "a"))
    # Q0 4 s: 3, then 4 -> Q1; Q1 8 s: 7, then 8 -> Q2; Q2 16 s: 15, then 16 -> Q3.
    assert levels == [0, 1, 1, 2, 2, 3]


def test_demotion_moves_one_queue_and_drops_the_excess_service():
    scheduler, _ = make_scheduler()
    a = make_request("a", 3)
    scheduler.add(a)
    scheduler.charge(a, 30)
    assert (level(scheduler, "a"), scheduler.entries["a"].service_s) == (1, 0.0)


def test_a_demoted_job_goes_to_the_back_of_the_next_queue():
    scheduler, _ = make_scheduler()
    a, b, c = make_request("a", 3), make_request("b", 5), make_request("c", 6)
    for request in (a, b, c):
        scheduler.add(request)
    assert ids(scheduler.priority_order()) == ["a", "b", "c"]
    scheduler.charge(a, 4)
    assert ids(scheduler.priority_order()) == ["b", "c", "a"]
    assert level(scheduler, "a") == 1


def test_with_arrival_order_the_last_queue_keeps_its_order_by_default():
    scheduler, _ = make_scheduler(queue_order="arrival")
    x, y = make_request("x", 20), make_request("y", 30)
    scheduler.add(x)
    scheduler.add(y)
    assert (level(scheduler, "x"), level(scheduler, "y")) == (3, 3)
    scheduler.charge(x, 32)  # Q3's 32 s spent: x keeps its place ahead of y
    assert ids(scheduler.priority_order()) == ["x", "y"]
    scheduler.charge(x, 40)
    assert ids(scheduler.priority_order()) == ["x", "y"]
    assert scheduler.entries["x"].service_s == 0.0 and level(scheduler, "x") == 3


def test_with_arrival_order_the_last_queue_can_be_round_robin():
    scheduler, _ = make_scheduler(queue_order="arrival", last_queue="round_robin")
    x, y = make_request("x", 20), make_request("y", 30)
    scheduler.add(x)
    scheduler.add(y)
    assert (level(scheduler, "x"), level(scheduler, "y")) == (3, 3)
    scheduler.charge(x, 31)
    assert ids(scheduler.priority_order()) == ["x", "y"]
    scheduler.charge(x, 1)  # Q3's 32 s spent: to the back of Q3
    assert ids(scheduler.priority_order()) == ["y", "x"]
    scheduler.charge(y, 32)
    assert ids(scheduler.priority_order()) == ["x", "y"]
    assert (level(scheduler, "x"), level(scheduler, "y")) == (3, 3)


def test_priority_order_is_by_queue_then_position():
    scheduler, _ = make_scheduler()
    for request_id, num_tokens in (("q", 2), ("s", 10), ("r", 3), ("t", 6), ("u", 1)):
        scheduler.add(make_request(request_id, num_tokens))
    assert ids(scheduler.priority_order()) == ["q", "r", "u", "t", "s"]


def test_within_a_queue_the_least_attained_job_runs_first_by_default():
    scheduler, _ = make_scheduler()
    x, y, z = make_request("x", 20), make_request("y", 30), make_request("z", 40)
    for request in (x, y, z):
        scheduler.add(request)  # all Q3, in this order
    assert ids(scheduler.priority_order()) == ["x", "y", "z"]  # none has run: ties by arrival
    scheduler.charge(x, 5)
    scheduler.charge(y, 2)
    assert ids(scheduler.priority_order()) == ["z", "y", "x"]
    scheduler.charge(z, 2)  # a tie with y: y got to Q3 first
    assert ids(scheduler.priority_order()) == ["y", "z", "x"]
    # The queue still comes first: a Q0 job with more service goes ahead of Q3's.
    scheduler.add(make_request("q", 2))
    scheduler.charge(scheduler.jobs["q"], 3)
    assert ids(scheduler.priority_order()) == ["q", "y", "z", "x"]


def test_attained_service_counts_across_demotions_and_boosts():
    scheduler, now = make_scheduler(starvation_s=100.0)
    a, b = make_request("a", 3), make_request("b", 3)
    scheduler.add(a)
    scheduler.add(b)
    for seconds in (4, 8):  # a: Q0's quantum, then Q1's -> Q2 with 12 s attained
        scheduler.charge(a, seconds)
    for seconds in (4, 6):  # b: Q0's, then 6 of Q1's 8 s
        scheduler.charge(b, seconds)
    scheduler.charge(b, 2)  # b -> Q2 with 12 s, behind a (tie: a got there first)
    assert [level(scheduler, r) for r in "ab"] == [2, 2]
    assert ids(scheduler.priority_order()) == ["a", "b"]
    now[0] = 100.0
    scheduler.entries["b"].last_run = 50.0  # only a has starved
    assert scheduler.promote_starved() == [a]
    assert ids(scheduler.priority_order()) == ["a", "b"]  # boosted: Q0
    scheduler.charge(a, 4)  # the boost's Q0 quantum: back to Q2 with 16 s attained
    assert level(scheduler, "a") == 2 and scheduler.entries["a"].attained_s == 16.0
    assert ids(scheduler.priority_order()) == ["b", "a"]


def test_a_boosted_job_goes_ahead_of_q0_jobs_with_less_service():
    scheduler, now = make_scheduler(starvation_s=100.0)
    s = make_request("s", 10)
    scheduler.add(s)  # Q2, at t=0
    scheduler.charge(s, 1)
    now[0] = 150.0
    scheduler.add(make_request("q", 2))  # Q0, no service yet
    assert scheduler.promote_starved() == [s]
    assert ids(scheduler.priority_order()) == ["s", "q"]


def test_a_starved_job_is_promoted_to_the_front_of_q0_at_the_bound_not_before():
    scheduler, now = make_scheduler(starvation_s=100.0)
    s, q = make_request("s", 10), make_request("q", 2)
    scheduler.add(s)  # Q2, at t=0
    now[0] = 50.0
    scheduler.add(q)  # Q0, at t=50
    now[0] = 99.5
    assert scheduler.promote_starved() == []
    assert ids(scheduler.priority_order()) == ["q", "s"]
    now[0] = 100.0
    assert scheduler.promote_starved() == [s]
    assert level(scheduler, "s") == 0
    assert ids(scheduler.priority_order()) == ["s", "q"]


def test_a_boost_lasts_one_q0_quantum_then_the_job_returns_to_its_place():
    scheduler, now = make_scheduler(starvation_s=100.0, queue_order="arrival")
    x, y, z = make_request("x", 20), make_request("y", 30), make_request("z", 2)
    for request in (x, y):
        scheduler.add(request)  # both Q3, x ahead of y
    now[0] = 10.0
    scheduler.charge(x, 5)  # x has 5 s of Q3 service; y has not run since t=0
    now[0] = 100.0
    assert scheduler.promote_starved() == [y]
    scheduler.add(z)  # Q0, behind the boosted y
    assert ids(scheduler.priority_order()) == ["y", "z", "x"]
    scheduler.charge(y, 3)
    assert level(scheduler, "y") == 0  # Q0's quantum (4 s) not spent yet
    scheduler.charge(y, 1)
    # Back in Q3 at its old place (behind x, which got there first), not demoted to Q1.
    assert ids(scheduler.priority_order()) == ["z", "x", "y"]
    assert (level(scheduler, "y"), scheduler.entries["y"].service_s) == (3, 0.0)
    assert scheduler.entries["x"].service_s == 5.0


def test_a_job_waiting_in_q0_is_protected_from_starvation_too():
    scheduler, now = make_scheduler(starvation_s=100.0)
    q = make_request("q", 2)
    scheduler.add(q)  # Q0, at t=0
    now[0] = 50.0
    scheduler.charge(q, 1.0)  # ran at t=50 (1 s of Q0's 4 s)
    now[0] = 60.0
    scheduler.add(make_request("p", 2))  # Q0, no service: ahead of q (least attained)
    now[0] = 149.0
    assert ids(scheduler.priority_order()) == ["p", "q"]
    now[0] = 150.0
    # q has not run for 100 s although it sits in Q0: boosted, it goes ahead of p.
    assert scheduler.promote_starved() == [q]
    assert ids(scheduler.priority_order()) == ["q", "p"]


def test_boosted_jobs_run_in_the_order_they_were_boosted():
    scheduler, now = make_scheduler(starvation_s=100.0)
    s, q = make_request("s", 10), make_request("q", 2)
    scheduler.add(s)  # Q2, at t=0
    now[0] = 50.0
    scheduler.add(q)  # Q0, at t=50
    now[0] = 100.0
    assert scheduler.promote_starved() == [s]
    now[0] = 150.0
    assert scheduler.promote_starved() == [q]
    assert ids(scheduler.priority_order()) == ["s", "q"]  # s was boosted first
    now[0] = 200.0
    # s has waited another 100 s since its boost: still first, not moved anywhere.
    assert scheduler.promote_starved() == [s]
    assert ids(scheduler.priority_order()) == ["s", "q"]
    position = scheduler.entries["s"].position
    now[0] = 250.0
    scheduler.promote_starved()
    assert scheduler.entries["s"].position == position


def test_running_restarts_the_starvation_clock():
    scheduler, now = make_scheduler(starvation_s=100.0)
    s = make_request("s", 10)
    scheduler.add(s)
    now[0] = 50.0
    scheduler.charge(s, 1.0)  # ran at t=50; 1 s of Q2's 16 s
    now[0] = 149.0
    assert scheduler.promote_starved() == []
    now[0] = 150.0
    assert scheduler.promote_starved() == [s]


def test_jobs_starved_together_are_promoted_longest_waiting_first():
    scheduler, now = make_scheduler(starvation_s=100.0)
    a = make_request("a", 10)
    scheduler.add(a)  # last ran (arrived) at t=0
    now[0] = 10.0
    b = make_request("b", 6)
    scheduler.add(b)  # t=10
    now[0] = 110.0
    scheduler.promote_starved()
    assert ids(scheduler.priority_order()) == ["a", "b"]
    assert (level(scheduler, "a"), level(scheduler, "b")) == (0, 0)


def test_schedule_promotes_starved_jobs_before_choosing():
    scheduler, now = make_scheduler(max_num_seqs=1, starvation_s=100.0)
    scheduler.add(make_request("s", 10))  # Q2
    scheduler.add(make_request("q", 2))  # Q0
    assert plan(run_step(scheduler, now, 1.0)) == [("q", 2)]
    now[0] = 100.0
    assert plan(run_step(scheduler, now, 1.0)) == [("s", 10)]


def test_queue_sizes_count_running_and_waiting_per_queue():
    scheduler, now = make_scheduler(max_num_seqs=1)
    for request_id, num_tokens in (("q", 2), ("r", 3), ("s", 10)):
        scheduler.add(make_request(request_id, num_tokens))
    scheduler.schedule()
    assert scheduler.queue_sizes() == [(1, 1), (0, 0), (0, 1), (0, 0)]
    assert (scheduler.num_running, scheduler.num_waiting, scheduler.num_swapped) == (1, 2, 0)


def test_only_jobs_still_known_are_charged():
    scheduler, now = make_scheduler()
    a, b = make_request("a", 2), make_request("b", 3)
    scheduler.add(a)
    scheduler.add(b)
    output = scheduler.schedule()
    scheduler.finish(a)  # the engine finishes requests before charging the step
    scheduler.on_step_finished(output, 4.0)
    assert "a" not in scheduler.entries
    assert level(scheduler, "b") == 1
