"""MLFQ's deadline lane: the learnt deadline, who is urgent, and the order it makes (on a
fake clock; set-up in scheduler_helpers.py: 4 queues, quanta 4/8/16/32 s, prefill 1 s per
token, so a 20-token prompt joins the deep Q3 and a 2-token one the young Q0)."""

from __future__ import annotations

import math

import pytest

from lmfleet.worker.scheduler.deadline_lane import HISTORY, MIN_HISTORY, DeadlineLane
from tests.unit.scheduler_helpers import ids, make_request, make_scheduler

NO_STARVATION = 1e6


def _teach(lane: DeadlineLane, jcts: list[float], start: int = 0) -> None:
    """Jobs 100 s apart, each of service < 100 s: FCFS would run each alone, so its JCT is
    its service and the replay hands back exactly `jcts`."""
    for index, jct in enumerate(jcts, start=start):
        lane.job_arrived(f"j{index}", 100.0 * index)
        lane.job_finished(f"j{index}", jct)


def test_learnt_deadline_is_slack_times_the_nearest_rank_p99_of_fcfs_jcts():
    lane = DeadlineLane(fixed_deadline_s=None, slack=1.5, num_servers=2)
    _teach(lane, [float(jct) for jct in range(1, MIN_HISTORY)])  # 1..99 s: too few
    assert lane.deadline_s is None
    _teach(lane, [99.5], start=MIN_HISTORY)
    # 100 values 1..99, 99.5: the 99th percentile by nearest rank is the 99th value.
    assert lane.deadline_s == 1.5 * 99.0


def test_learnt_deadline_waits_for_fcfs_order_and_counts_the_wait():
    # One server: FCFS runs "long" (arrived first, 50 s) before "short" (arrived at 1 s,
    # 2 s of service), whichever finished first here; short's FCFS JCT is 49 + 2 = 51 s.
    lane = DeadlineLane(fixed_deadline_s=None, slack=1.0, num_servers=1)
    lane.job_arrived("long", 0.0)
    lane.job_arrived("short", 1.0)
    lane.job_finished("short", 2.0)
    assert list(lane._jct_s) == []  # short waits (in FCFS) for long
    lane.job_finished("long", 50.0)
    assert list(lane._jct_s) == [50.0, 51.0]


def test_learnt_deadline_forgets_all_but_the_last_history_jobs():
    lane = DeadlineLane(fixed_deadline_s=None, slack=1.0, num_servers=1)
    _teach(lane, [90.0] * HISTORY)
    _teach(lane, [10.0] * HISTORY, start=HISTORY)
    assert lane.deadline_s == 10.0


def test_learnt_deadline_matches_the_p99_of_the_window_for_any_order_of_values():
    lane = DeadlineLane(fixed_deadline_s=None, slack=2.0, num_servers=1)
    values = [float((index * 7919) % 97) for index in range(HISTORY + 537)]
    for count, value in enumerate(values, start=1):
        _teach(lane, [value], start=count)
        if count >= MIN_HISTORY and count % 997 == 0:
            window = sorted(values[max(0, count - HISTORY):count])
            assert lane.deadline_s == 2.0 * window[math.ceil(0.99 * len(window)) - 1]


def test_a_fixed_deadline_is_kept_and_slack_zero_turns_the_lane_off():
    fixed = DeadlineLane(fixed_deadline_s=60.0, slack=1.5, num_servers=1)
    off = DeadlineLane(fixed_deadline_s=None, slack=0.0, num_servers=1)
    for lane in (fixed, off):
        _teach(lane, [50.0] * (2 * MIN_HISTORY))
        assert not lane.learns and list(lane._jct_s) == []
    assert fixed.deadline_s == 60.0
    assert off.deadline_s is None
    assert not off.is_urgent(1e9)


@pytest.mark.parametrize("age_s, urgent", [
    (0.0, False), (24.9, False), (25.0, True), (99.9, True), (100.0, False), (500.0, False)])
def test_urgent_from_a_quarter_of_the_deadline_until_the_deadline(age_s, urgent):
    assert DeadlineLane(fixed_deadline_s=100.0, slack=1.5, num_servers=1).is_urgent(
        age_s) is urgent


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


def test_finished_jobs_teach_the_deadline_and_aborted_ones_only_unblock_it():
    scheduler, now = make_scheduler(starvation_s=NO_STARVATION)
    early = make_request("early", 2)  # arrives first and is still running
    scheduler.add(early)
    for index in range(MIN_HISTORY):  # 100 s apart, each alone in FCFS: JCT = service
        now[0] = 100.0 * (index + 1)
        request = make_request(f"r{index}", 2)
        scheduler.add(request)
        scheduler.entries[request.request_id].attained_s = float(index + 1)
        scheduler.finish(request)
    # FCFS would not have served anyone before "early": nothing can be replayed yet.
    assert scheduler.deadline_lane.deadline_s is None
    scheduler.entries["early"].attained_s = 1e6
    assert scheduler.abort("early") is early
    # Aborted: it takes no FCFS time and teaches nothing; the 100 behind it are replayed.
    assert scheduler.deadline_lane.deadline_s == 1.0 * 99.0
