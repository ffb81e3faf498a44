"""MLFQ's deadline lane: the learnt deadline, who is urgent, and the order it makes (on a
fake clock; set-up in scheduler_helpers.py: 4 queues, quanta 4/8/16/32 s, prefill 1 s per
token, so a 20-token prompt joins the deep Q3 and a 2-token one the young Q0)."""

from __future__ import annotations

import math

import pytest

from lmfleet.worker.scheduler.deadline_lane import HISTORY, MIN_HISTORY, DeadlineLane
from tests.unit.scheduler_helpers import ids, make_request, make_scheduler

NO_STARVATION = 1e6


def test_learnt_deadline_is_slack_times_the_nearest_rank_p99_of_finished_service():
    lane = DeadlineLane(fixed_deadline_s=None, slack=1.5)
    for service in range(1, MIN_HISTORY):  # 1..99 s: too few to learn from
        lane.record_finished(float(service))
    assert lane.deadline_s is None
    lane.record_finished(100.0)
    # 100 values 1..100: the 99th percentile by nearest rank is the 99th value.
    assert lane.deadline_s == 1.5 * 99.0


def test_learnt_deadline_forgets_all_but_the_last_history_jobs():
    lane = DeadlineLane(fixed_deadline_s=None, slack=1.0)
    for _ in range(HISTORY):
        lane.record_finished(1000.0)
    for _ in range(HISTORY):
        lane.record_finished(10.0)
    assert lane.deadline_s == 10.0


def test_learnt_deadline_matches_the_p99_of_the_window_for_any_order_of_values():
    lane = DeadlineLane(fixed_deadline_s=None, slack=2.0)
    values = [float((index * 7919) % 1237) for index in range(HISTORY + 537)]
    for count, value in enumerate(values, start=1):
        lane.record_finished(value)
        if count >= MIN_HISTORY and count % 97 == 0:
            window = sorted(values[max(0, count - HISTORY):count])
            assert lane.deadline_s == 2.0 * window[math.ceil(0.99 * len(window)) - 1]


def test_a_fixed_deadline_is_kept_and_slack_zero_turns_the_lane_off():
    fixed = DeadlineLane(fixed_deadline_s=60.0, slack=1.5)
    off = DeadlineLane(fixed_deadline_s=None, slack=0.0)
    for _ in range(2 * MIN_HISTORY):
        fixed.record_finished(500.0)
        off.record_finished(500.0)
    assert fixed.deadline_s == 60.0
    assert off.deadline_s is None
    assert not off.is_urgent(1e9)


@pytest.mark.parametrize("age_s, urgent", [
    (0.0, False), (24.9, False), (25.0, True), (99.9, True), (100.0, False), (500.0, False)])
def test_urgent_from_a_quarter_of_the_deadline_until_the_deadline(age_s, urgent):
    assert DeadlineLane(fixed_deadline_s=100.0, slack=1.5).is_urgent(age_s) is urgent


def _three_jobs(deadline_s, deadline_slack=1.5):
    """old (deep, arrived at 0, 5 s attained), mid (deep, arrived at 10, none) and new
    (young, arrived at 30); the clock at 30."""
    scheduler, now = make_scheduler(starvation_s=NO_STARVATION, deadline_s=deadline_s,
                                    deadline_slack=deadline_slack, max_num_seqs=2)
    scheduler.add(make_request("old", 20))
    now[0] = 10.0
    scheduler.add(make_request("mid", 20))
    scheduler.entries["old"].attained_s = 5.0
    now[0] = 30.0
    scheduler.add(make_request("new", 2))
    assert [scheduler.entries[i].level for i in ("old", "mid", "new")] == [3, 3, 0]
    return scheduler, now


def test_without_a_deadline_the_least_attained_deep_job_goes_first():
    scheduler, _ = _three_jobs(deadline_s=None, deadline_slack=0.0)
    assert ids(scheduler.priority_order()) == ["new", "mid", "old"]
    assert scheduler.deadline_lane_sizes() is None


def test_urgent_jobs_pass_the_deep_queues_oldest_first_until_their_deadline():
    scheduler, now = _three_jobs(deadline_s=100.0)
    # At 30 s old (age 30) is urgent, mid (age 20) not yet; the young job stays first.
    assert ids(scheduler.priority_order()) == ["new", "old", "mid"]
    assert scheduler.deadline_lane_sizes() == (0, 1)
    scheduler.schedule()  # two slots: new and old
    assert scheduler.deadline_lane_sizes() == (1, 0)
    now[0] = 40.0  # both urgent: the older first, whatever their service
    scheduler.entries["old"].attained_s = 50.0
    assert ids(scheduler.priority_order()) == ["new", "old", "mid"]
    now[0] = 100.0  # old's deadline has passed: it drops back behind the urgent mid
    assert ids(scheduler.priority_order()) == ["new", "mid", "old"]
    now[0] = 110.0  # both past: the queues' own order (least attained first)
    assert ids(scheduler.priority_order()) == ["new", "mid", "old"]


def test_a_job_boosted_against_starvation_stays_ahead_of_urgent_ones():
    # One queue: no level is young, so only being boosted keeps a job ahead of the lane.
    scheduler, now = make_scheduler(starvation_s=35.0, deadline_s=100.0, num_queues=1)
    assert scheduler.young_levels == 0
    scheduler.add(make_request("old", 20))
    now[0] = 10.0
    scheduler.add(make_request("mid", 20))
    now[0] = 40.0
    scheduler.entries["old"].last_run = 40.0  # old just ran; mid has waited 30 s
    scheduler.entries["mid"].last_run = 0.0
    assert ids(scheduler.promote_starved()) == ["mid"]
    # Both are urgent (ages 40 and 30), and old is older; mid is boosted, so it is first.
    assert ids(scheduler.priority_order()) == ["mid", "old"]


def test_finished_jobs_teach_the_deadline_and_aborted_ones_do_not():
    scheduler, _ = make_scheduler(starvation_s=NO_STARVATION)
    for index in range(MIN_HISTORY):
        request = make_request(f"r{index}", 2)
        scheduler.add(request)
        scheduler.entries[request.request_id].attained_s = float(index + 1)
        if index == MIN_HISTORY - 1:
            assert scheduler.deadline_lane.deadline_s is None
        scheduler.finish(request)
    assert scheduler.deadline_lane.deadline_s == 1.5 * 99.0
    aborted = make_request("aborted", 2)
    scheduler.add(aborted)
    scheduler.entries["aborted"].attained_s = 1e6
    assert scheduler.abort("aborted") is aborted
    assert scheduler.deadline_lane.deadline_s == 1.5 * 99.0
